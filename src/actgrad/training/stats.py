"""Activation and gradient statistics, collected from outside the training loop.

:class:`StatsRecorder` is engine-agnostic: it is handed the tensors an engine already
has (a layer's output, the gradient flowing into it, a parameter and its gradient) at the
steps it asks for, and keeps the figures as tensors until the run ends, so recording
costs no host synchronisation per step. :class:`NetworkHooks` feeds a recorder from a
:class:`~actgrad.training.model.Network` through ordinary PyTorch forward and tensor hooks, the
way fastai's ``ActivationStats`` does; the fast engine calls the recorder itself at its
own hook points.

Everything comes out tidy: ``stats`` has one row per (step, layer, kind, stat) and
``histograms`` one row per (step, layer, kind, bin).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from actgrad.results.vocabulary import DEAD, SATURATION


def activation_shares(activation: str) -> tuple[str, ...]:
    """The shares of activation values (in %) that describe an activation at init and at the end, by the name
    :func:`actgrad.training.evaluation.evaluate` computes them and a run's metrics carry them (``<name>_init``,
    ``<name>_final``): saturation is a tanh notion (sat97, sat99: |t| above 0.97 and 0.99); for ReLU and
    GELU it is the share at or below zero (nonpositive: where a ReLU passes no gradient)."""
    return ("sat97", "sat99") if activation == "tanh" else ("nonpositive",)


def inactive(out: torch.Tensor, activation: str) -> torch.Tensor:
    """Where a unit does not respond, as a bool mask of ``out``: a tanh saturated (|t| > 0.99), a ReLU or GELU
    at or below zero (a ReLU's zero, a GELU's negative tail, where its slope is below 1/2 and falls to 0).
    A unit inactive for every example of a batch is a dead unit."""
    return out.abs() > DEAD if activation == "tanh" else out <= 0


@dataclass
class StatsPlan:
    """Which steps get which statistics. A run's plan comes from the config's ``stats`` section
    (:func:`actgrad.training.job.stats_plan`), whose defaults are the schema's."""

    every: int  # time series of means, stds, ratios
    update_every: int  # update:data ratios (cheap, and the lecture plots them densely)
    histogram_every: int  # histograms over time, for the heat-map view
    snapshot_steps: tuple[int, ...]  # full histograms
    bins: int
    last_step: int = -1  # also a snapshot; -1: none (a plan made for a measurement, not a run)

    def snapshot(self, step: int) -> bool:
        return step in self.snapshot_steps or step == self.last_step

    def series(self, step: int) -> bool:
        return step % self.every == 0 or self.snapshot(step)

    def histogram(self, step: int) -> bool:
        return step % self.histogram_every == 0 or self.snapshot(step)

    def update(self, step: int) -> bool:
        return step % self.update_every == 0 or self.series(step)

    def any(self, step: int) -> bool:
        return self.series(step) or self.update(step) or self.histogram(step)


@dataclass
class StatsRecorder:
    plan: StatsPlan
    activation_range: tuple[float, float] | None = (-1.0, 1.0)  # fixed for tanh, so histograms line up over time
    _rows: list[tuple[int, str, str, tuple[str, ...], torch.Tensor]] = field(default_factory=list)
    _hists: list[tuple[int, str, str, torch.Tensor, float, float]] = field(default_factory=list)
    # |t| > 0.99 over the whole batch at step 0: the lecture's black-and-white saturation map.
    saturation_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- what the engines call ------------------------------------------------
    def activation(self, step: int, layer: str, out: torch.Tensor, function: str = "tanh") -> None:
        """``out``: a (batch, units) activation of ``function`` (tanh, relu, gelu). Its statistics: mean, std,
        dead_units (inactive for every example: :func:`inactive`) and, for tanh, saturated_pct and
        saturated99_pct (|t| above 0.97, 0.99), for the others nonpositive_pct (at or below zero)."""
        out = out.detach()
        off = inactive(out, function)
        if self.plan.series(step):
            dead = off.all(dim=0).sum().float()
            if function == "tanh":
                a = out.abs()
                self._add(step, layer, "activation", ("mean", "std", "saturated_pct", "saturated99_pct",
                                                      "dead_units"),
                          torch.stack([out.mean(), out.std(), (a > SATURATION).float().mean() * 100,
                                       off.float().mean() * 100, dead]))
            else:
                self._add(step, layer, "activation", ("mean", "std", "nonpositive_pct", "dead_units"),
                          torch.stack([out.mean(), out.std(), off.float().mean() * 100, dead]))
        if self.plan.histogram(step):
            self._histogram(step, layer, "activation", out, self.activation_range)
        if step == 0:  # the lecture's black-and-white map: tanh saturated, or ReLU / GELU at or below zero
            self.saturation_maps[layer] = off.cpu()

    def preactivation(self, step: int, layer: str, x: torch.Tensor) -> None:
        if self.plan.snapshot(step):
            x = x.detach()
            self._add(step, layer, "preactivation", ("mean", "std"), torch.stack([x.mean(), x.std()]))
            self._histogram(step, layer, "preactivation", x, None)

    def activation_grad(self, step: int, layer: str, grad: torch.Tensor) -> None:
        grad = grad.detach()
        if self.plan.series(step):
            self._add(step, layer, "activation_grad", ("mean", "std"), torch.stack([grad.mean(), grad.std()]))
        if self.plan.snapshot(step):
            self._histogram(step, layer, "activation_grad", grad, None)

    def parameter(self, step: int, name: str, data: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        data, grad = data.detach(), grad.detach()
        if self.plan.update(step):
            ratio = (lr * grad).std() / data.std()
            self._add(step, name, "update", ("log10_update_data",), ratio.log10().view(1))
        if data.ndim == 2 and self.plan.series(step):
            self._add(step, name, "weight_grad", ("mean", "std", "grad_data_ratio"),
                      torch.stack([grad.mean(), grad.std(), grad.std() / data.std()]))
        if data.ndim == 2 and self.plan.snapshot(step):
            self._histogram(step, name, "weight_grad", grad, None)

    def batchnorm(self, step: int, layer: str, batch_mean, batch_spread, running_mean, running_spread) -> None:
        if self.plan.series(step):
            self._add(step, layer, "batchnorm",
                      ("batch_mean_abs", "running_mean_gap", "batch_spread_mean", "running_spread_gap"),
                      torch.stack([batch_mean.abs().mean(), (running_mean - batch_mean).abs().mean(),
                                   batch_spread.mean(), (running_spread - batch_spread).abs().mean()]))

    # -- results ---------------------------------------------------------------
    def stats_frame(self) -> pd.DataFrame:
        records = []
        values = [v.float().cpu() for *_, v in self._rows]
        for (step, layer, kind, names, _), vals in zip(self._rows, values):
            for name, val in zip(names, vals.tolist()):
                records.append((step, layer, kind, name, val))
        return pd.DataFrame.from_records(records, columns=["step", "layer", "kind", "stat", "value"])

    def histogram_frame(self) -> pd.DataFrame:
        """One row per bin: step, layer, kind, bin_left, bin_right, fraction (of the histogram's values)."""
        columns = ["step", "layer", "kind", "bin_left", "bin_right", "fraction"]
        if not self._hists:
            return pd.DataFrame(columns=columns)
        # Built as arrays, not Python lists of rows: a run that records every step keeps millions of bins,
        # and lists of floats cost about 250 bytes a bin at their peak.
        steps, layers, kinds, counts, lo, hi = zip(*self._hists)
        counts = torch.stack([c.float().cpu() for c in counts])  # (histograms, bins)
        n = counts.shape[1]
        fraction = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # an empty histogram's stay 0
        lo, hi = np.array(lo, dtype=np.float64)[:, None], np.array(hi, dtype=np.float64)[:, None]
        width, i = (hi - lo) / n, np.arange(n, dtype=np.float64)
        return pd.DataFrame({
            "step": np.repeat(np.array(steps, dtype=np.int64), n),
            # a short Series repeated: the string dtype pandas gives a list of names, without the list
            "layer": pd.Series(layers).repeat(n).reset_index(drop=True),
            "kind": pd.Series(kinds).repeat(n).reset_index(drop=True),
            "bin_left": (lo + i * width).ravel(),
            "bin_right": (lo + (i + 1) * width).ravel(),
            "fraction": fraction.double().numpy().ravel(),
        })

    # -- internals -------------------------------------------------------------
    def _add(self, step, layer, kind, names, values):
        self._rows.append((step, layer, kind, names, values))

    def _histogram(self, step, layer, kind, t, value_range):
        t = t.float().flatten()
        # A diverging run has NaN or inf in it: count what is finite, and nothing if that is all.
        t = t[torch.isfinite(t)]
        if t.numel() == 0:
            lo, hi = value_range or (-1.0, 1.0)
            self._hists.append((step, layer, kind, torch.zeros(self.plan.bins), lo, hi))
            return
        if value_range is None:
            lo, hi = t.min().item(), t.max().item()
            if not (lo < hi):
                lo, hi = lo - 0.5, hi + 0.5
        else:
            lo, hi = value_range
        self._hists.append((step, layer, kind, torch.histc(t, bins=self.plan.bins, min=lo, max=hi), lo, hi))


class NetworkHooks:
    """Feed a :class:`StatsRecorder` from a Network's layers through PyTorch hooks.

    Forward hooks on each activation layer record its input (the pre-activation) and
    output, and put a tensor hook on the output for the gradient that flows back into it;
    :meth:`after_backward` reads the parameters' gradients. Nothing is recorded on steps
    the plan does not ask for.
    """

    def __init__(self, network, recorder: StatsRecorder):
        self.network, self.recorder = network, recorder
        self.step = -1
        self._handles = []
        for name, layer in network.activation_layers():
            self._handles.append(layer.register_forward_hook(self._on_activation(name)))

    def _on_activation(self, name):
        def hook(module, inputs, output):
            step = self.step
            if not module.training or not self.recorder.plan.any(step):
                return
            self.recorder.preactivation(step, name, inputs[0])
            self.recorder.activation(step, name, output, module.kind)
            if output.requires_grad and self.recorder.plan.series(step):
                output.register_hook(lambda grad: self.recorder.activation_grad(step, name, grad))
        return hook

    def before_step(self, step: int) -> None:
        self.step = step

    def after_backward(self, step: int, lr: float) -> None:
        if not self.recorder.plan.any(step):
            return
        for name, p in self.network.trained_parameters():
            if p.grad is not None:
                self.recorder.parameter(step, name, p.data, p.grad, lr)
        if self.recorder.plan.series(step):
            for name, bn in self.network.batchnorm_layers():
                if bn.last_batch_mean is not None:
                    self.recorder.batchnorm(step, name, bn.last_batch_mean.flatten(), bn.last_batch_spread.flatten(),
                                            bn.running_mean.flatten(), bn.running_spread.flatten())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
