"""The ops that the C kernels (:mod:`actgrad.training.kernels`) do in one pass where PyTorch takes 3 to 10 operations.

Same arithmetic as :mod:`.ops`, up to the order of the sums within a row. Which op gets which
kernel, and which neighbours share a pass, is decided in :func:`.build.build_ops`.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from actgrad.training.engine.ops import CrossEntropy, Embedding, Tanh
from actgrad.training.kernels import BatchNormArgs


class EmbeddingC(Embedding):
    def __init__(self, kernels, block_size: int, *buffers):
        super().__init__(*buffers)
        self.kernels, self.block_size = kernels, block_size
        # the lookup goes straight to the first Linear's input: padded, or the looked-up rows as they are
        self.first_input = self.padded if self.padded is not None else self.looked_up.view(self.grad_rows.shape)

    def forward(self, rows):
        """The rows of the tables into the first Linear's input, example by example: one pass."""
        self.rows = rows
        self.kernels.embedding_forward(self.table.data_ptr(), self.table.shape[1], rows.data_ptr(), rows.numel(),
                                       self.first_input.data_ptr(), self.block_size, self.first_input.shape[-1])

    def backward(self, d, weight_t):
        """Zero, then add each lookup's rows (padding skipped): one pass."""
        torch.bmm(d.transpose(1, 2), weight_t, out=self.grad_padded)
        g = self.table_grad
        self.kernels.embedding_backward(g.data_ptr(), g.shape[0], g.shape[1], self.rows.data_ptr(), self.rows.numel(),
                                        self.grad_padded.data_ptr(), self.block_size, self.grad_padded.shape[2])


class BatchNormC:
    """The forward pass with the batch statistics and the running update in one kernel; the backward
    pass in another, which first takes the gradient through the tanh above when ``through_tanh``."""

    def __init__(self, kernels, layer, gamma, gamma_grad, beta, beta_grad, x, out, dx, mean, spread, running_mean,
                 running_spread, inv, scale, through_tanh: bool):
        self.kernels, self.layer = kernels, layer
        self.gamma_grad, self.beta_grad = gamma_grad, beta_grad
        self.x, self.out, self.dx = x, out, dx
        buffers = dict(x=x, out=out, gamma=gamma, beta=beta, inv=inv, scale=scale, mean=mean, spread=spread,
                       run_mean=running_mean, run_spread=running_spread, ggamma=gamma_grad, gbeta=beta_grad)
        for name, t in buffers.items():
            if not t.is_contiguous():  # pragma: no cover - every buffer the engine allocates is contiguous
                raise RuntimeError(f"BatchNorm kernel needs a contiguous {name}")
        M, F, B = x.shape
        self.args = ctypes.pointer(BatchNormArgs(
            **{n: t.data_ptr() for n, t in buffers.items()}, rows=M * F, B=B, std_flavour=int(layer.flavour == "std"),
            eps=layer.eps, keep=1 - layer.momentum, take=layer.momentum))
        self.tanh_out = out.data_ptr() if through_tanh else None  # the tanh above works in place on our output

    def forward(self):
        self.kernels.bn_forward(self.args)

    def backward(self, d, lr):
        self.kernels.bn_backward(self.args, d.data_ptr(), self.tanh_out, self.dx.data_ptr())
        return self.dx


class LayerNormC:
    """The forward pass in one kernel, the backward pass in another; the buffers of :class:`.ops.LayerNorm`
    (its two means of the backward pass are the kernel's room)."""

    def __init__(self, kernels, layer, gamma, gamma_grad, beta, beta_grad, x, out, dx, mean, inv, grad_mean,
                 grad_xhat_mean):
        self.kernels, self.layer = kernels, layer
        self.x, self.out, self.dx = x, out, dx
        M, F, B = x.shape
        self.forward_args = (x.data_ptr(), out.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean.data_ptr(),
                             inv.data_ptr(), M, F, B, layer.eps)
        self.backward_args = (x.data_ptr(), gamma.data_ptr(), inv.data_ptr(), dx.data_ptr(), gamma_grad.data_ptr(),
                              beta_grad.data_ptr(), grad_mean.data_ptr(), grad_xhat_mean.data_ptr(), M, F, B)

    def forward(self):
        self.kernels.ln_forward(*self.forward_args)

    def backward(self, d, lr):
        self.kernels.ln_backward(d.data_ptr(), *self.backward_args)
        return self.dx


class TanhC(Tanh):
    """The tanh backward, and the sum of each row, the bias gradient of the Linear below, in the same pass."""

    def __init__(self, kernels, layer, x, dx, bias_grad=None):
        super().__init__(layer, x, dx)
        self.kernels = kernels
        self.bias_grad = bias_grad.data_ptr() if bias_grad is not None else None
        self.rows = x.shape[0] * x.shape[1]

    def backward(self, d, lr):
        self.kernels.tanh_backward_bias(d.data_ptr(), self.x.data_ptr(), self.dx.data_ptr(), self.bias_grad,
                                        self.rows, self.x.shape[-1])
        return self.dx


class TanhIntoBatchNormC(Tanh):
    """A tanh right above a BatchNorm: the BatchNorm's backward kernel takes the gradient through it."""

    def backward(self, d, lr):
        return d


class CrossEntropyC(CrossEntropy):
    """PyTorch's log-softmax and exp, then the loss sums and the gradient at the logits in one pass, with the
    bias gradient of the Linear below where ``bias_grad`` is given (that Linear then does not sum it)."""

    def __init__(self, kernels, *buffers, bias_grad=None):
        super().__init__(*buffers)
        self.kernels = kernels
        self.bias_grad = bias_grad.data_ptr() if bias_grad is not None else None
        self.logp_np, self.grad_np = self.logp.numpy(), self.grad_logits.numpy()
        self.M, self.V = self.logits.shape[0], self.logits.shape[1]

    def forward(self, targets, loss_out):
        torch._log_softmax(self.logits, 1, False, out=self.logp)
        np.exp(self.logp_np, out=self.grad_np)  # numpy's float32 exp: vectorised, like the tanh's
        self.kernels.cross_entropy(self.logp.data_ptr(), self.grad_logits.data_ptr(), targets.data_ptr(), self.M,
                                   self.V, self.B, loss_out.data_ptr(), self.bias_grad)

    def backward(self, targets):
        return self.grad_logits  # taken with the loss, in the same pass
