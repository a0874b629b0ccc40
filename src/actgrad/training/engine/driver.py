"""The driver: minibatches drawn as the lecture draws them, groups of models taking turns, divergence checks,
progress lines and the sensitivity twins' parameter distance."""

from __future__ import annotations

import time

import torch

from actgrad.training.divergence import Divergence, DivergenceRule
from actgrad.training.engine.batch import BatchedModels
from actgrad.training.engine.layout import architecture, check_same
from actgrad.training.engine.state import ModelState
from actgrad.training.engine.workspace import floats_per_model
from actgrad.training.loop import ParameterDistances, TrainResult, learning_rate
from actgrad.training.model import Network
from actgrad.training.progress import ProgressLog
from actgrad.training.stats import StatsRecorder

INDEX_CHUNK = 1000  # steps of minibatch indices drawn (and moved to the device) at a time
GROUP_FLOATS = 3.8e6  # CPU: a group's state and workspace kept to about 15 MB, within the cache


def group_size(arch, batch_size: int, block_size: int, budget: float = GROUP_FLOATS) -> int:
    """How many models to train as one batch on CPU: beyond the cache, bigger batches are slower."""
    per_model = ModelState.floats_per_model(arch) + floats_per_model(arch, batch_size, block_size)
    return max(1, int(budget // per_model))


def _schedule(wanted_steps, k0: int, k1: int) -> dict[int, list]:
    """step -> [(position, what)] for the steps in [k0, k1) that each (position, what, wants) asks for."""
    schedule: dict[int, list] = {}
    cache: dict[int, list[int]] = {}  # id of a wants-function's owner -> its steps (recorders often share a plan)
    for pos, what, wants, owner in wanted_steps:
        steps = cache.get(id(owner))
        if steps is None:
            steps = cache[id(owner)] = [s for s in range(k0, k1) if wants(s)]
        for s in steps:
            schedule.setdefault(s, []).append((pos, what))
    return schedule


class ModelGroup:
    """Models trained together as one :class:`BatchedModels`, with their minibatches and losses of the current
    chunk of steps. ``model_ids``: the models' numbers in :func:`train_batched`'s lists, in batch order."""

    def __init__(self, model_ids: list[int], nets, arch, batch_size, block_size, device, kernels=None):
        self.model_ids = model_ids
        self.batch = BatchedModels([nets[m] for m in model_ids], arch, batch_size, block_size, device, kernels)

    def draw(self, gens, k0: int, k1: int, n_train: int, Xtr_d, Ytr_d) -> None:
        """The minibatch indices of steps [k0, k1) from each model's generator, as the lecture draws them."""
        K, B, Mg, dev = k1 - k0, self.batch.B, len(self.model_ids), self.batch.device
        self.k0 = k0
        self.gen_states = [gens[m].get_state() for m in self.model_ids]
        ix = torch.stack([torch.randint(0, n_train, (K, B), generator=gens[m]) for m in self.model_ids],
                         dim=1).to(dev)  # (K, Mg, B)
        # rows of the flattened embedding tables: model p's characters + p * vocabulary
        offsets = torch.arange(Mg, device=dev) * self.batch.vocab
        rows = torch.index_select(Xtr_d, 0, ix.view(-1)).view(K, Mg, -1)
        self.rows = rows.add_(offsets.view(1, Mg, 1)).view(K, -1)  # (K, Mg*B*T)
        self.targets = torch.index_select(Ytr_d, 0, ix.view(-1)).view(K, Mg, 1, B)
        self.loss_sums = torch.empty(K, Mg, device=dev)  # minibatch sums of log-likelihoods
        self.flushed = k0

    def plan(self, recorders, distances: ParameterDistances | None, k0: int, k1: int) -> None:
        """Which steps of [k0, k1) feed which recorders, and which take the twins' parameter snapshots."""
        wanted = [(p, rec, rec.plan.any, rec.plan) for p, m in enumerate(self.model_ids)
                  if (rec := recorders[m]) is not None]
        self.stats_schedule = _schedule(wanted, k0, k1)
        snapshots = [] if distances is None else [(p, m, distances.wants, distances) for p, m in
                                                  enumerate(self.model_ids) if distances.follows(m)]
        self.snapshot_schedule = _schedule(snapshots, k0, k1)
        self.distances = distances
        self.ids_t = torch.tensor(self.model_ids, dtype=torch.long, device=self.batch.device)

    def run(self, a: int, b: int, lr_schedule) -> None:
        """Steps [a, b)."""
        batch, k0, tap = self.batch, self.k0, self.batch.tap
        for step in range(a, b):
            snapshots = self.snapshot_schedule.get(step)
            if snapshots:  # parameters before this step's update, as the statistics see them
                for p, m in snapshots:
                    self.distances.observe(m, step, batch.state.params.model(p))
            wanting = self.stats_schedule.get(step)
            batch.step(self.rows[step - k0], self.targets[step - k0], learning_rate(lr_schedule, step),
                       self.loss_sums[step - k0], tap.at(step, wanting) if wanting else None)

    def flush(self, losses: torch.Tensor, upto: int) -> None:
        """Mean minibatch losses of the steps run since the last flush, into ``losses`` (steps, all models)."""
        if upto > self.flushed:
            losses[self.flushed:upto, self.ids_t] = (self.loss_sums[self.flushed - self.k0:upto - self.k0]
                                                     * (-1.0 / self.batch.B))
            self.flushed = upto

    def keep_only(self, keep: list[int]) -> None:
        """Carry on with the models at positions ``keep`` (the others diverged)."""
        dev, K, n = self.batch.device, self.rows.shape[0], len(self.model_ids)
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
        self.batch.select(keep_t)
        # the kept models' rows, renumbered to their new places in the embedding tables
        shift = (keep_t - torch.arange(len(keep), device=dev)) * self.batch.vocab
        self.rows = self.rows.view(K, n, -1)[:, keep_t].sub_(shift.view(1, -1, 1)).reshape(K, -1)
        self.targets = self.targets[:, keep_t]
        self.loss_sums = self.loss_sums[:, keep_t]
        self.gen_states = [self.gen_states[p] for p in keep]
        self.model_ids = [self.model_ids[p] for p in keep]


def train_batched(nets: list[Network], gens: list[torch.Generator], Xtr: torch.Tensor, Ytr: torch.Tensor, *,
                  steps: int, batch_size: int, lr_schedule: list[dict],
                  recorders: list[StatsRecorder | None] | None = None, device=torch.device("cpu"),
                  divergence_check_every: int = 100, divergence: DivergenceRule | None = None,
                  progress: ProgressLog | None = None, twins: dict[int, int] | None = None,
                  index_chunk: int = INDEX_CHUNK, max_group: int | None = None,
                  kernels: bool | None = None) -> list[TrainResult]:
    """Train ``nets`` (one architecture, already initialised) together; one TrainResult per model.

    ``gens[i]`` is the generator that drew ``nets[i]``; it draws model i's minibatch indices as
    the lecture does (``torch.randint(0, n, (batch_size,), generator=g)`` per step). Each
    model stops where ``divergence`` (by default :class:`~actgrad.training.divergence.DivergenceRule`)
    says it diverged, checked every ``divergence_check_every`` steps and at the last step,
    exactly as :func:`~actgrad.training.loop.train_reference` does; the others go on. ``recorders[i]``,
    if given, is called at the steps its plan asks for; ``progress`` gets a line every so
    many steps. ``twins`` maps a sensitivity twin's index to its base model's: the base's
    result then carries ``extra['param_distance']``, the (steps, distances) between the two
    models' parameters at its statistics steps (see :class:`~actgrad.training.loop.ParameterDistances`).
    At the end every network holds its trained parameters and BatchNorm running statistics
    (on ``device``).

    On CPU, more models than fit the cache (``max_group``, by default from the architecture's
    size: :func:`group_size`) are trained as several batches, each for a stretch of steps in
    turn. ``seconds`` is the wall time of the whole run, the same for every model;
    ``extra['models_in_batch']`` says how many models shared it, ``extra['kernels']`` what did
    the elementwise work on CPU: ``"C"`` (:mod:`actgrad.training.kernels`) or ``"PyTorch"`` (None on a GPU).
    """
    device = torch.device(device)
    M = len(nets)
    if M == 0:
        return []
    if len(gens) != M:
        raise ValueError(f"{M} networks but {len(gens)} generators")
    recorders = list(recorders) if recorders is not None else [None] * M
    if len(recorders) != M:
        raise ValueError(f"{M} networks but {len(recorders)} recorders")
    arch = architecture(nets[0])
    check_same(nets, arch)
    T = Xtr.shape[1]
    if arch[0].fan_out * T != arch[1].fan_in:
        raise ValueError(f"block size {T} does not fit the first Linear layer ({arch[1].fan_in} inputs)")
    rule = divergence or DivergenceRule()
    distances = ParameterDistances.for_models(twins, recorders, steps) if twins else None
    n_train = Xtr.shape[0]
    for net in nets:
        net.to(device)
        net.train()
    compiled = _kernels_for(device, kernels)

    start = time.perf_counter()
    if max_group is None:
        max_group = group_size(arch, batch_size, T) if device.type == "cpu" else M
    n_groups = -(-M // max(1, max_group))
    bounds = [round(i * M / n_groups) for i in range(n_groups + 1)]  # as equal as can be
    diverged: dict[int, Divergence] = {}
    every = divergence_check_every

    # Inference mode, not just no_grad: its tensors skip the version counters and view tracking
    # that every operation pays for otherwise.
    with torch.inference_mode():
        groups = [ModelGroup(list(range(a, b)), nets, arch, batch_size, T, device, compiled)
                  for a, b in zip(bounds, bounds[1:])]
        Xtr_d, Ytr_d = Xtr.to(device), Ytr.to(device)
        losses = torch.full((steps, M), float("nan"), dtype=torch.float32, device=device)
        k0 = checked = 0
        while k0 < steps and groups:
            k1 = min(steps, k0 + index_chunk)
            for grp in groups:
                grp.draw(gens, k0, k1, n_train, Xtr_d, Ytr_d)
                grp.plan(recorders, distances, k0, k1)
            step = k0
            while step < k1 and groups:
                # each group in turn for a stretch of steps: its workspace stays in cache
                end = min(k1, (step // every + 1) * every, steps)
                for grp in groups:
                    grp.run(step, end, lr_schedule)
                step = end
                if step % every == 0 or step == steps:
                    for grp in groups:
                        grp.flush(losses, step)
                        if _retire_diverged(grp, rule, losses, checked, step, diverged, nets, gens, n_train,
                                            batch_size):
                            grp.plan(recorders, distances, step, k1)
                    groups = [grp for grp in groups if grp.model_ids]
                    if progress is not None:
                        _report_progress(progress, losses, groups, checked, step, lr_schedule)
                    checked = step
            for grp in groups:
                grp.flush(losses, k1)
            k0 = k1
        for grp in groups:
            for p, m in enumerate(grp.model_ids):
                grp.batch.write_back(nets[m], p)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = losses.cpu()
    results = []
    for m in range(M):
        d = diverged.get(m)
        done = steps if d is None else d.step + 1
        extra = {"models_in_batch": M, "kernels": None if device.type != "cpu" else
                 "C" if compiled is not None else "PyTorch"}
        if distances is not None and distances.is_base(m):
            extra["param_distance"] = distances.trace(m)
        results.append(TrainResult(losses=losses[:done, m].clone(), steps_done=done, diverged_at=None if d is None
                                   else d.step, seconds=seconds, extra=extra, diverged_rule=d and d.rule))
    return results


def _kernels_for(device: torch.device, kernels: bool | None):
    """The loaded C kernels where they are to be used (CPU, not switched off), else None."""
    if device.type != "cpu" or kernels is False:
        return None
    from actgrad.training import kernels as c_kernels

    compiled = c_kernels.load()
    if compiled is None and kernels:
        raise RuntimeError(f"the C kernels were asked for but are {c_kernels.status()}")
    return compiled


def _retire_diverged(grp: ModelGroup, rule: DivergenceRule, losses, checked: int, step: int, diverged: dict,
                     nets, gens, n_train: int, batch_size: int) -> bool:
    """Take the models that diverged in steps [checked, step) out of ``grp``, each left as the reference
    loop leaves it: written back, and its generator drawn up to ``step``. Whether any did."""
    first = max(0, checked - rule.history())
    found = rule.first(losses[first:step, grp.ids_t], first, checked)
    if not any(found):
        return False
    keep = []
    for p, (m, d) in enumerate(zip(grp.model_ids, found)):
        if d is None:
            keep.append(p)
            continue
        diverged[m] = d
        grp.batch.write_back(nets[m], p)
        gens[m].set_state(grp.gen_states[p])
        torch.randint(0, n_train, (step - grp.k0, batch_size), generator=gens[m])
    if keep:
        grp.keep_only(keep)
    else:
        grp.model_ids = []
    return True


def _report_progress(progress: ProgressLog, losses, groups, after: int, upto: int, lr_schedule) -> None:
    """A line for each step count in (after, upto] that ``progress`` wants, with the running models' losses."""
    running = sorted(m for grp in groups for m in grp.model_ids)
    if not running:
        return
    for done in progress.due_between(after, upto):
        progress.report(done, losses[done - 1, running].tolist(), learning_rate(lr_schedule, done - 1))
