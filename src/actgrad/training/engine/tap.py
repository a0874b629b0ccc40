"""The statistics tap: each model's :class:`~actgrad.training.stats.StatsRecorder` gets that model's slices of the
tensors the engine computes anyway, in the layouts, order and names :class:`~actgrad.training.stats.NetworkHooks`
uses on the reference loop (parameters before their update).

On a step that some recorder wants, the tap runs the forward and backward loops in place of
the plain ones, calling the recorders around each activation, and the step writes out every
gradient and updates with one ``add_``.
"""

from __future__ import annotations

import torch

from actgrad.training.engine.ops import Activation
from actgrad.training.engine.state import ModelState


class StatsTap:
    def __init__(self, state: ModelState):
        self.state = state
        self.step, self.wanting = -1, []
        self._views: dict[tuple, list[torch.Tensor]] = {}

    def at(self, step: int, wanting: list) -> StatsTap:
        """This step's models that want statistics: [(position in the batch, recorder)]."""
        self.step, self.wanting = step, wanting
        return self

    def _per_model(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Model i's (batch, features) view of a feature-major workspace tensor, for every i (cached)."""
        key = (t.data_ptr(), t.shape, t.stride())
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = [t[i].t() for i in range(self.state.M)]
        return views

    def forward(self, layers) -> None:
        step, wanting = self.step, self.wanting
        for op in layers:
            if not isinstance(op, Activation):
                op.forward()
                continue
            pre, out = self._per_model(op.x), self._per_model(op.out)
            for i, rec in wanting:
                rec.preactivation(step, op.layer.name, pre[i])
            op.forward()
            for i, rec in wanting:  # tanh and relu: the same buffer, now the output
                rec.activation(step, op.layer.name, out[i], op.layer.flavour)

    def backward(self, layers, d: torch.Tensor) -> None:
        """Every gradient written out (no update inside the backward pass); the gradient into each activation
        recorded on the way."""
        step, wanting = self.step, self.wanting
        for op in reversed(layers):
            if isinstance(op, Activation):
                grads = self._per_model(d)
                for i, rec in wanting:
                    if rec.plan.series(step):
                        rec.activation_grad(step, op.layer.name, grads[i])
            d = op.backward(d, None)

    def parameters(self, lr: float) -> None:
        step = self.step
        for i, rec in self.wanting:
            params, bns = self.state.model_views(i)
            for name, data, grad in params:  # the order of named_parameters(), as NetworkHooks calls
                rec.parameter(step, name, data, grad, lr)
            if rec.plan.series(step):
                for name, mean, spread, running_mean, running_spread in bns:
                    rec.batchnorm(step, name, mean, spread, running_mean, running_spread)
