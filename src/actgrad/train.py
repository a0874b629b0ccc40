"""The reference: the lecture's training loop, run by run, and the evaluation and sampling of a trained net.

The loop is the lecture's, line for line: one generator draws the parameters, then every
minibatch's indices; forward, ``p.grad = None``, backward, ``p.data += -lr * p.grad``.
Statistics and anything else that watches the run are callbacks (see
:mod:`actgrad.stats`); the loop only tells them where it is. :func:`train_reference_runs`
trains several runs this way with the arguments and results of the batched engine
(:func:`actgrad.engine.train_batched`), which must agree with it to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .divergence import Divergence, DivergenceRule
from .model import Network, Scratch, apply_in_chunks, build_network
from .progress import ProgressLog
from .stats import DEAD, SATURATION, NetworkHooks, StatsRecorder


def learning_rate(schedule: list[dict], step: int) -> float:
    """The rate of the last schedule entry whose ``from_step`` has been reached."""
    lr = schedule[0]["lr"]
    for entry in schedule:
        if step >= entry["from_step"]:
            lr = entry["lr"]
    return lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but this machine has no CUDA GPU")
    return torch.device(name)


def init_network(spec: dict, seed: int, block_size: int, w1_perturbation: float = 0.0):
    """Draw the network from a fresh generator; the same generator then draws the minibatches.

    ``w1_perturbation`` scales the first Linear weight by ``1 + w1_perturbation`` after
    drawing: the sensitivity twin of a run.
    """
    g = torch.Generator().manual_seed(seed)
    net = build_network(spec, g, block_size)
    if w1_perturbation:
        with torch.no_grad():
            net.layers["linear1"].weight *= 1 + w1_perturbation
    return net, g


@dataclass
class TrainResult:
    losses: torch.Tensor  # every step's minibatch loss, float32
    steps_done: int
    diverged_at: int | None  # the step where the divergence rule fired
    seconds: float
    extra: dict = field(default_factory=dict)
    diverged_rule: str | None = None  # which rule fired (actgrad.divergence), in words


def train_reference(net: Network, g: torch.Generator, Xtr: torch.Tensor, Ytr: torch.Tensor, *, steps: int,
                    batch_size: int, lr_schedule: list[dict], callbacks=(), device=torch.device("cpu"),
                    divergence_check_every: int = 100, divergence: DivergenceRule | None = None,
                    progress: ProgressLog | None = None) -> TrainResult:
    """The lecture's training loop. Stops where ``divergence`` (by default :class:`DivergenceRule`) says the run
    diverged, checked every ``divergence_check_every`` steps and at the last; ``progress`` gets a line every so
    many steps."""
    rule = divergence or DivergenceRule()
    net.to(device)
    net.train()
    params = list(net.parameters())
    Xtr_d, Ytr_d = Xtr.to(device), Ytr.to(device)
    losses = torch.full((steps,), float("nan"), dtype=torch.float32, device=device)
    diverged: Divergence | None = None
    if progress is not None:
        progress.start_run()
    start = time.perf_counter()
    checked = 0  # steps whose losses the divergence rule has seen
    for step in range(steps):
        # Indices come from the CPU generator, as in the lecture, on every device.
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g).to(device)
        Xb, Yb = Xtr_d[ix], Ytr_d[ix]
        for cb in callbacks:
            cb.before_step(step)
        loss = F.cross_entropy(net(Xb), Yb)
        for p in params:
            p.grad = None
        loss.backward()
        lr = learning_rate(lr_schedule, step)
        for cb in callbacks:
            cb.after_backward(step, lr)
        for p in params:
            p.data += -lr * p.grad
        losses[step] = loss.detach()
        done = step + 1
        if done % divergence_check_every == 0 or done == steps:
            first = max(0, checked - rule.history())
            [diverged] = rule.first(losses[first:done], first, checked)
            if diverged is not None:
                break
            if progress is not None:
                for n in progress.due_between(checked, done):
                    progress.report(n, [losses[n - 1].item()], learning_rate(lr_schedule, n - 1))
            checked = done
    seconds = time.perf_counter() - start
    done = steps if diverged is None else diverged.step + 1
    return TrainResult(losses=losses[:done].cpu(), steps_done=done, diverged_at=diverged and diverged.step,
                       seconds=seconds, diverged_rule=diverged and diverged.rule)


class ParameterDistances:
    """The sensitivity twins' distance ``||theta_twin(t) - theta_base(t)||``: every trained parameter, flattened,
    L2 (in float64), at the steps ``wants`` (a statistics plan's series: step 0 measures the perturbation itself).

    An engine hands in a model's flattened parameters as they are before a wanted step's update; each is kept
    only until the pair's other model reaches that step. The batched engine trains a pair side by side, so at
    most a stretch of steps is in flight; the reference loop trains the base, then its twin
    (:func:`train_reference_runs`), so it holds the base's snapshots of one run: steps x parameters floats
    (201 x 47,551 x 4 B = 38 MB for the deep net at 200,000 steps, statistics every 1,000).
    """

    def __init__(self, twins: dict[int, int], wants: Callable[[int], bool]):
        bases = list(twins.values())
        if len(set(bases)) != len(bases) or set(bases) & set(twins) or any(t == b for t, b in twins.items()):
            raise ValueError(f"twins must map each twin to a base of its own, not {twins}")
        self.wants = wants
        self._partner = {**twins, **{b: t for t, b in twins.items()}}
        self._traces: dict[int, dict[int, float]] = {b: {} for b in bases}
        self._waiting: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def for_models(cls, twins: dict[int, int], recorders: list[StatsRecorder | None], steps: int):
        """At the series steps of the base models' statistics plan."""
        plans = [recorders[b].plan for b in twins.values() if recorders[b] is not None]
        if not plans:
            raise ValueError("the twins' parameter distance is taken at the base models' statistics steps: "
                             "give the base models a recorder")
        return cls(twins, plans[0].series)

    def follows(self, model: int) -> bool:
        return model in self._partner

    def is_base(self, model: int) -> bool:
        return model in self._traces

    def observe(self, model: int, step: int, params: torch.Tensor) -> None:
        """``params``: the model's parameters before the update of ``step``, flattened (a tensor of its own)."""
        other = self._waiting.pop((self._partner[model], step), None)
        if other is None:
            self._waiting[(model, step)] = params
            return
        base = model if self.is_base(model) else self._partner[model]
        self._traces[base][step] = float(torch.linalg.vector_norm(params.double() - other.double()))

    def trace(self, base: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, distances) of the pair of ``base``, for the steps both models reached."""
        steps = sorted(self._traces[base])
        return np.array(steps, dtype=np.int64), np.array([self._traces[base][s] for s in steps], dtype=np.float64)


class _ParameterSnapshots:
    """A reference-loop callback that hands a model's parameters to :class:`ParameterDistances`."""

    def __init__(self, distances: ParameterDistances, model: int, net: Network):
        self.distances, self.model, self.params = distances, model, list(net.parameters())

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int, lr: float) -> None:
        if self.distances.wants(step):
            self.distances.observe(self.model, step, torch.cat([p.detach().reshape(-1) for p in self.params]))


def train_reference_runs(nets: list[Network], gens: list[torch.Generator], Xtr: torch.Tensor, Ytr: torch.Tensor, *,
                         steps: int, batch_size: int, lr_schedule: list[dict],
                         recorders: list[StatsRecorder | None] | None = None, device=torch.device("cpu"),
                         divergence_check_every: int = 100, divergence: DivergenceRule | None = None,
                         progress: ProgressLog | None = None,
                         twins: dict[int, int] | None = None) -> list[TrainResult]:
    """:func:`train_reference` for each network in turn (a twin right after its base), with the arguments and
    the results of :func:`actgrad.engine.train_batched`: recorders fed through :class:`NetworkHooks`, and the
    base's ``extra['param_distance']`` where ``twins`` maps a twin's index to its base's."""
    M = len(nets)
    recorders = list(recorders) if recorders is not None else [None] * M
    if not len(gens) == len(recorders) == M:
        raise ValueError(f"{M} networks, {len(gens)} generators and {len(recorders)} recorders")
    twins = twins or {}
    distances = ParameterDistances.for_models(twins, recorders, steps) if twins else None
    twin_of = {b: t for t, b in twins.items()}
    order = [n for m in range(M) if m not in twins for n in (m, twin_of.get(m)) if n is not None]
    results: list[TrainResult | None] = [None] * M
    for m in order:
        hooks = NetworkHooks(nets[m], recorders[m]) if recorders[m] is not None else None
        callbacks = [hooks] if hooks else []
        if distances is not None and distances.follows(m):
            callbacks.append(_ParameterSnapshots(distances, m, nets[m]))
        try:
            results[m] = train_reference(nets[m], gens[m], Xtr, Ytr, steps=steps, batch_size=batch_size,
                                         lr_schedule=lr_schedule, callbacks=callbacks, device=device,
                                         divergence_check_every=divergence_check_every, divergence=divergence,
                                         progress=progress)
        finally:
            if hooks:
                hooks.remove()
    for base in twins.values():
        results[base].extra["param_distance"] = distances.trace(base)
    return results


@contextmanager
def kept_running_stats(net: Network):
    """Whatever happens inside, the BatchNorm running statistics are as before afterwards."""
    saved = {n: (bn.running_mean.clone(), bn.running_spread.clone()) for n, bn in net.batchnorm_layers()}
    try:
        yield
    finally:
        for n, bn in net.batchnorm_layers():
            bn.running_mean, bn.running_spread = saved[n]


EVAL_CHUNK = 8192  # rows per forward pass: small enough to stay in cache, 5x faster than one pass


# The shares evaluate() can count (actgrad.stats.activation_shares names them per activation):
# (on |t| or t, compared above or at-or-below, threshold).
SHARES = {"sat97": ("abs", torch.gt, SATURATION), "sat99": ("abs", torch.gt, DEAD), "nonpositive": ("t", torch.le, 0.0)}


@torch.no_grad()
def evaluate(net: Network, X: torch.Tensor, Y: torch.Tensor, *, calibrate: bool = False,
             saturation: tuple[float, ...] = (), shares: tuple[str, ...] = (),
             scratch: Scratch | None = None) -> tuple[float, dict]:
    """Cross-entropy over a whole split in evaluation mode, and optionally shares of the activation values.

    With ``calibrate`` every BatchNorm first takes the statistics of ``X`` as its running
    statistics (the lecture's calibration pass over the training split) and keeps them;
    that needs the whole split at once. Otherwise the logits are computed in chunks and
    joined, which gives the same logits as one pass. ``saturation`` lists thresholds: the
    share (in %) of all activation values, every layer together, with |t| above each, keyed
    by threshold. ``shares`` names shares of :data:`SHARES` (``stats.activation_shares(activation)``
    gives the ones that fit a net), keyed by name, in % of all activation values.
    Pass one ``scratch`` to a series of evaluations to spare each its own large tensors.
    """
    unknown = set(shares) - set(SHARES)
    if unknown:
        raise ValueError(f"shares: {sorted(unknown)} unknown; known are {sorted(SHARES)}")
    tests = [(t, "abs", torch.gt, t) for t in saturation] + [(name, *SHARES[name]) for name in shares]
    counted = {key: 0 for key, *_ in tests}
    total = [0]

    def count(module, inputs, output):
        total[0] += output.numel()
        magnitude = output.abs() if any(on == "abs" for _, on, _, _ in tests) else None
        flags = torch.empty_like(output)
        for key, on, compare, threshold in tests:
            counted[key] += _count(magnitude if on == "abs" else output, compare, threshold, flags)

    handles = [layer.register_forward_hook(count) for _, layer in net.activation_layers()] if tests else []
    was_training = net.training
    scratch = scratch if scratch is not None else Scratch()
    try:
        net.eval()
        if calibrate:
            logits = net.calibrate_batchnorm(X, chunk=EVAL_CHUNK, scratch=scratch)
        else:
            logits = apply_in_chunks(list(net.layers.values()), X, EVAL_CHUNK, scratch)
        loss = F.cross_entropy(logits, Y).item()
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return loss, ({key: 100.0 * n / total[0] for key, n in counted.items()} if total[0] else {})


def _count(x: torch.Tensor, compare, threshold: float, flags: torch.Tensor) -> int:
    """How many values of ``x`` pass ``compare(x, threshold)`` (``torch.gt``, ``torch.le``; NaN passes neither),
    with ``flags`` (like ``x``) as room.

    The same comparison as ``x > threshold``, but into a float 0/1 mask, which PyTorch
    vectorises and a bool mask it does not: 4x faster. Summing the mask in its own dtype
    is exact while every partial sum is a whole number that the dtype holds exactly.
    """
    compare(x, threshold, out=flags)
    exact = flags.numel() <= 2 / torch.finfo(flags.dtype).eps  # 2**24 in float32
    return int(flags.sum()) if exact else int(torch.count_nonzero(flags))


@torch.no_grad()
def sample_names(net: Network, itos: dict[int, str], block_size: int, n: int, seed: int,
                 max_length: int = 50) -> list[str]:
    """The lecture's sampler: a generator seeded ``seed + 10``, one character at a time until '.'."""
    g = torch.Generator().manual_seed(seed + 10)
    net.eval()
    device = next(net.parameters()).device
    names = []
    for _ in range(n):
        out, context = [], [0] * block_size
        while len(out) < max_length:
            logits = net(torch.tensor([context], device=device))
            probs = F.softmax(logits, dim=1).cpu()
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append("".join(itos[i] for i in out))
    net.train()
    return names
