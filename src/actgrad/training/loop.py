"""The reference: the lecture's training loop, run by run, and what both engines share.

The loop is the lecture's, line for line: one generator draws the parameters, then every
minibatch's indices; forward, ``p.grad = None``, backward, ``p.data += -lr * p.grad``.
Statistics and anything else that watches the run are callbacks (see
:mod:`actgrad.training.stats`); the loop only tells them where it is. :func:`train_reference_runs`
trains several runs this way with the arguments and results of the batched engine
(:func:`actgrad.training.engine.train_batched`), which must agree with it to float rounding. The
network's initial draw (:func:`init_network`), the learning-rate schedule and a run's
:class:`TrainResult` are the same for both engines. Evaluating and sampling a trained net is
:mod:`actgrad.training.evaluation`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from actgrad.training.divergence import Divergence, DivergenceRule
from actgrad.training.model import Network, build_network
from actgrad.training.progress import ProgressLog
from actgrad.training.stats import NetworkHooks, StatsRecorder


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
    diverged_rule: str | None = None  # which rule fired (actgrad.training.divergence), in words


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
    the results of :func:`actgrad.training.engine.train_batched`: recorders fed through :class:`NetworkHooks`, and the
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
