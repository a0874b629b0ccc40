"""M models of one architecture trained as one batched model: the step, as the lecture's loop writes it."""

from __future__ import annotations

import torch

from actgrad.training.engine.build import build_ops
from actgrad.training.engine.layout import Layer
from actgrad.training.engine.state import ModelState
from actgrad.training.engine.tap import StatsTap
from actgrad.training.engine.workspace import Workspace
from actgrad.training.model import Network


class BatchedModels:
    """The state of M models, the workspace of a step and the ops wired to both."""

    def __init__(self, nets: list[Network], arch: tuple[Layer, ...], batch_size: int, block_size: int, device,
                 kernels=None):
        self.arch, self.B, self.T, self.device = arch, batch_size, block_size, device
        self.kernels = kernels  # the loaded C kernels (actgrad.training.kernels), or None: PyTorch operations
        self.vocab = arch[0].fan_in
        self.state = ModelState(nets, arch, device)
        self._wire()

    @property
    def M(self) -> int:
        return self.state.M

    def _wire(self) -> None:
        """A workspace for the current models, and the ops bound to it and to the state."""
        self.workspace = Workspace(self.arch, self.M, self.B, self.T, self.device)
        self.ops = build_ops(self.arch, self.state, self.workspace, self.T, self.kernels)
        self.small_params, self.small_grads = self.state.small_params()
        self.tap = StatsTap(self.state)

    def select(self, keep: torch.Tensor) -> None:
        """Carry on with the models at positions ``keep`` only."""
        self.state.select(keep)
        self._wire()

    def step(self, rows: torch.Tensor, targets: torch.Tensor, lr: float, loss_out: torch.Tensor,
             tap: StatsTap | None = None) -> None:
        """Forward, backward and SGD update of every model on its minibatch.

        ``rows``: (M * B * block_size,) rows of the flattened embedding tables; ``targets``:
        (M, 1, B); each minibatch's summed log-likelihood goes to ``loss_out`` (M,). ``tap``:
        this step's statistics (:meth:`StatsTap.at`), or None on a plain step.
        """
        ops = self.ops
        # forward
        ops.embedding.forward(rows)
        if tap is None:
            for op in ops.layers:
                op.forward()
        else:
            tap.forward(ops.layers)
        for finish in ops.after_forward:
            finish()
        ops.loss.forward(targets, loss_out)
        # backward and update
        d = ops.loss.backward(targets)
        if tap is None:
            for op in reversed(ops.layers):
                d = op.backward(d, lr)  # each Linear weight is updated here, after its input gradient
            self.small_params.add_(self.small_grads, alpha=-lr)
        else:
            tap.backward(ops.layers, d)
            tap.parameters(lr)
            self.state.params.flat.add_(self.state.grads.flat, alpha=-lr)

    def write_back(self, net: Network, i: int) -> None:
        self.state.write_back(net, i)
