"""The layers' forward and backward passes on PyTorch operations, over tensors bound once.

Each op is built with views of everything it touches (parameters, gradients, its input,
output and gradient buffers), so a step is a plain walk over the ops with no lookups.
Activations are feature-major, ``(M, features, batch)``; a Linear weight is kept as
``WT`` ``(M, fan_out, fan_in)``. Forward: each Linear and BatchNorm writes a buffer of its
own, which the next layers transform in place (BatchNorm centres its input, the activation
overwrites it), so each layer keeps exactly what its backward pass needs.

``backward(d, lr)`` takes the gradient of the op's output and returns that of its input.
``lr`` is None on statistics steps: every gradient is then written out for the recorders
(and applied afterwards by one ``add_``); otherwise a Linear updates its weight inside its
gradient matmul, ``W += -lr * d @ x^T`` as one ``baddbmm_``, after its input gradient.
The C-kernel versions of some ops are in :mod:`.kernel_ops`.
"""

from __future__ import annotations

import torch

try:  # numpy's float32 tanh is as accurate as torch's (<= 1 ulp) and several times faster on CPU
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_threshold_backward = torch.ops.aten.threshold_backward.grad_input
_gelu = torch.ops.aten.gelu.out
_gelu_backward = torch.ops.aten.gelu_backward.grad_input


class Embedding:
    """Rows of the M embedding tables, flattened into one table: model p's characters + p * vocabulary.

    ``rows``: the step's (M * B * block_size,) row numbers. The first Linear reads the rows
    zero-padded to its input width (a copy when that differs from the concatenated embeddings).
    """

    def __init__(self, table, table_grad, looked_up, padded, grad_rows, grad_padded):
        self.table, self.table_grad = table, table_grad  # (M * vocab, E)
        self.looked_up = looked_up  # (M * B * T, E)
        self.padded = padded  # (M, B, padded width): the first Linear's input, batch-major; None: no padding
        if padded is not None:
            self.as_examples = looked_up.view(padded.shape[0], padded.shape[1], -1)  # (M, B, T * E)
            self.padded_head = padded[:, :, :self.as_examples.shape[2]]
        self.grad_rows, self.grad_padded = grad_rows, grad_padded  # (M, B, T * E), (M, B, padded width)
        self.rows = None

    def forward(self, rows: torch.Tensor) -> None:
        self.rows = rows
        torch.index_select(self.table, 0, rows, out=self.looked_up)
        if self.padded is not None:
            self.padded_head.copy_(self.as_examples)

    def backward(self, d: torch.Tensor, weight_t: torch.Tensor) -> None:
        """d (M, fan_out, B) at the first Linear's output, with its weight as it was -> rows of the tables."""
        torch.bmm(d.transpose(1, 2), weight_t, out=self.grad_padded)
        if self.grad_padded.data_ptr() != self.grad_rows.data_ptr():
            self.grad_rows.copy_(self.grad_padded[:, :, :self.grad_rows.shape[2]])
        self.table_grad.zero_()  # index_put_ with accumulation: what autograd does for C[X]
        self.table_grad.index_put_((self.rows,), self.grad_rows.view(-1, self.table_grad.shape[1]), accumulate=True)


class Linear:
    """out = W^T x (+ b): out (M, fan_out, B) = WT (M, fan_out, fan_in) @ x (M, fan_in, B)."""

    def __init__(self, layer, weight_t, weight_t_grad, bias, bias_grad, x, out, dx, sum_bias: bool):
        self.layer = layer
        self.WT, self.WT_grad, self.W = weight_t, weight_t_grad, weight_t.transpose(1, 2)
        self.bias, self.bias_grad = bias, bias_grad
        self.x, self.x_t, self.out, self.dx = x, x.transpose(1, 2), out, dx
        self.sum_bias = sum_bias  # False where the op above sums the bias gradient in its own pass

    def forward(self):
        if self.bias is None:
            torch.bmm(self.WT, self.x, out=self.out)
        else:
            torch.baddbmm(self.bias, self.WT, self.x, out=self.out)

    def backward(self, d, lr):
        if self.sum_bias:
            torch.sum(d, 2, True, out=self.bias_grad)
        dx = self.input_grad(d)  # with the weight as it was
        if lr is None:
            torch.bmm(d, self.x_t, out=self.WT_grad)
        else:
            self.WT.baddbmm_(d, self.x_t, alpha=-lr)
        return dx

    def input_grad(self, d):
        return torch.bmm(self.W, d, out=self.dx)


class LinearIntoEmbedding(Linear):
    """The first Linear: its input gradient goes straight into the embedding tables' gradient."""

    def __init__(self, *args, embedding: Embedding, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding = embedding

    def input_grad(self, d):
        self.embedding.backward(d, self.WT)
        return None


class BatchNorm:
    """gamma * (x - mean) / spread' + beta, with spread' = std (no eps) or sqrt(var + eps).

    The batch's sum and norm (of the centred input) go to the batch-statistics buffer, which
    :class:`BatchNormStatistics` turns into mean and std or variance for all layers at once.
    The input is centred in place and kept for the backward pass, with 1 / spread'.
    """

    def __init__(self, layer, gamma, gamma_grad, beta, beta_grad, x, out, dx, total, norm, inv, scale, xc_coef,
                 constant):
        B = x.shape[2]
        self.layer = layer
        self.gamma, self.gamma_grad, self.beta, self.beta_grad = gamma, gamma_grad, beta, beta_grad
        self.x, self.out, self.dx = x, out, dx
        self.total, self.norm = total, norm
        self.inv, self.scale, self.xc_coef = inv, scale, xc_coef
        self.std = layer.flavour == "std"
        self.one_over_B, self.one_over_B_minus_1 = 1.0 / B, 1.0 / (B - 1)
        self.sqrt_B_minus_1, self.eps = constant((B - 1) ** 0.5), constant(layer.eps)

    def forward(self):
        torch.sum(self.x, 2, True, out=self.total)
        xc = torch.sub(self.x, self.total, alpha=self.one_over_B, out=self.x)  # centred in place
        # torch.var is slow along a short contiguous dimension on CPU: the norm is one pass
        torch.linalg.vector_norm(xc, 2, 2, True, out=self.norm)
        if self.std:  # 1 / std = sqrt(B - 1) / norm
            torch.reciprocal(self.norm, out=self.inv).mul_(self.sqrt_B_minus_1)
        else:  # 1 / sqrt(norm^2 / (B - 1) + eps)
            torch.addcmul(self.eps, self.norm, self.norm, value=self.one_over_B_minus_1, out=self.inv).rsqrt_()
        # gamma * xhat + beta with xhat = xc / spread', as xc * (gamma / spread') + beta: one pass less
        torch.mul(self.gamma, self.inv, out=self.scale)
        torch.mul(xc, self.scale, out=self.out).add_(self.beta)

    def backward(self, d, lr):
        """dx = gamma/spread' * (d - mean(d) - xhat * sum(d * xhat) / (B - 1)), xhat = xc / spread'."""
        xc, dx = self.x, self.dx
        torch.sum(d, 2, True, out=self.beta_grad)
        torch.sum(torch.mul(d, xc, out=dx), 2, True, out=self.gamma_grad).mul_(self.inv)  # sum(d * xhat)
        torch.mul(self.gamma_grad, self.inv, out=self.xc_coef)
        torch.sub(d, self.beta_grad, alpha=self.one_over_B, out=dx)
        dx.addcmul_(xc, self.xc_coef, value=-self.one_over_B_minus_1)
        dx.mul_(self.scale)
        return dx


class BatchNormStatistics:
    """After the forward pass: every BatchNorm's sums and norms become means and std (or variance),
    and the running statistics take their update, each for all layers at once."""

    def __init__(self, bn_layers, state, running_update, constant, B: int):
        self.bn_layers, self.state, self.B = bn_layers, state, B
        self.running_update, self.constant = running_update, constant
        flavours = {L.flavour for L in bn_layers}
        self.flavour = flavours.pop() if len(flavours) == 1 else None  # None: one per layer
        momenta = {L.momentum for L in bn_layers}
        self.momentum = momenta.pop() if len(momenta) == 1 else None  # None: one per layer

    def __call__(self):
        self._finish_batch_statistics()
        self._update_running()

    def _finish_batch_statistics(self):
        B, c, state = self.B, self.constant, self.state
        if self.flavour is not None:
            half = state.batch_stats.flat.shape[0] // 2
            groups = [(state.batch_stats.flat[:half], state.batch_stats.flat[half:], self.flavour)]
        else:
            groups = [(state.batch_mean(k), state.batch_spread(k), L.flavour) for k, L in enumerate(self.bn_layers)]
        for means, spreads, flavour in groups:
            means.mul_(c(1.0 / B))
            if flavour == "std":
                spreads.mul_(c((B - 1) ** -0.5))
            else:
                spreads.mul_(spreads).mul_(c(1.0 / (B - 1)))

    def _update_running(self):
        # Written as the model writes it, (1 - m) * running + m * batch: in float32 the two
        # coefficients do not sum to exactly 1, and lerp would round differently.
        state, c = self.state, self.constant
        if self.momentum is not None:
            keep, take = c(1 - self.momentum), c(self.momentum)
            state.running.flat.mul_(keep).add_(torch.mul(state.batch_stats.flat, take, out=self.running_update))
        else:
            K = len(self.bn_layers)
            for j, L in enumerate(self.bn_layers):
                for k in (j, K + j):
                    state.running.views[k].mul_(c(1 - L.momentum)).add_(state.batch_stats.views[k] * c(L.momentum))


class LayerNorm:
    """gamma * (x - mean) / sqrt(var + eps) + beta, each example (column) over its features: the biased
    variance, as ``F.layer_norm``. The input is normalised in place (xhat) and kept for the backward pass,
    with each example's 1 / sqrt(var + eps); no running statistics, nothing shared between examples."""

    def __init__(self, layer, gamma, gamma_grad, beta, beta_grad, x, out, dx, mean, inv, grad_mean, grad_xhat_mean):
        self.layer = layer
        self.gamma, self.gamma_grad, self.beta, self.beta_grad = gamma, gamma_grad, beta, beta_grad
        self.x, self.out, self.dx = x, out, dx
        self.mean, self.inv = mean, inv  # (M, 1, B)
        self.grad_mean, self.grad_xhat_mean = grad_mean, grad_xhat_mean  # (M, 1, B)
        self.one_over_F, self.eps = 1.0 / x.shape[1], layer.eps

    # Reductions over the features (dim 1, not the contiguous one) as sums: torch.sum there takes half the time
    # of torch.mean, and a fifteenth of linalg.vector_norm's (measured at 5 x 100 x 32, one thread).
    def forward(self):
        x, inv = self.x, self.inv
        torch.sum(x, 1, True, out=self.mean).mul_(self.one_over_F)
        x.sub_(self.mean)
        torch.sum(torch.mul(x, x, out=self.out), 1, True, out=inv)  # the output buffer as room
        inv.mul_(self.one_over_F).add_(self.eps).rsqrt_()
        xhat = x.mul_(inv)
        torch.addcmul(self.beta, xhat, self.gamma, out=self.out)

    def backward(self, d, lr):
        """dx = inv * (g - mean_F(g) - xhat * mean_F(g * xhat)), g = gamma * d. ``d`` is spent after g, and is
        used as room for g * xhat."""
        xhat, dx = self.x, self.dx
        torch.sum(d, 2, True, out=self.beta_grad)
        torch.sum(torch.mul(d, xhat, out=dx), 2, True, out=self.gamma_grad)
        g = torch.mul(d, self.gamma, out=dx)
        torch.sum(g, 1, True, out=self.grad_mean).mul_(self.one_over_F)
        torch.sum(torch.mul(g, xhat, out=d), 1, True, out=self.grad_xhat_mean).mul_(self.one_over_F)
        return dx.sub_(self.grad_mean).addcmul_(xhat, self.grad_xhat_mean, value=-1).mul_(self.inv)


class Activation:
    """The nonlinearity. tanh and relu work in place (``out`` is ``x``): their backward needs only the output.
    GELU's backward needs the input, so it writes its output to a buffer of its own."""

    def __init__(self, layer, x, dx, out=None):
        self.layer, self.x, self.dx = layer, x, dx
        self.out = x if out is None else out


class Tanh(Activation):
    def __init__(self, layer, x, dx):
        super().__init__(layer, x, dx)
        self.x_np = x.numpy() if _np is not None and x.device.type == "cpu" else None

    def forward(self):
        if self.x_np is not None:  # numpy's float32 tanh: as accurate as torch's, several times faster
            _np.tanh(self.x_np, out=self.x_np)
        else:
            torch.tanh(self.x, out=self.x)

    def backward(self, d, lr):
        return _tanh_backward(d, self.x, grad_input=self.dx)


class ReLU(Activation):
    def forward(self):
        torch.clamp_min(self.x, 0, out=self.x)

    def backward(self, d, lr):
        return _threshold_backward(d, self.x, 0, grad_input=self.dx)


class GELU(Activation):
    """The exact GELU and its backward, aten's own kernels (those autograd runs on the reference loop)."""

    def forward(self):
        _gelu(self.x, approximate="none", out=self.out)

    def backward(self, d, lr):
        return _gelu_backward(d, self.x, approximate="none", grad_input=self.dx)


class CrossEntropy:
    """The mean negative log-likelihood of each model's minibatch, and its gradient at the logits."""

    def __init__(self, logits, logp, picked, grad_logp, grad_logits):
        self.logits, self.logp, self.picked = logits, logp, picked
        self.grad_logp, self.grad_logits = grad_logp, grad_logits
        self.B = logits.shape[2]

    def forward(self, targets, loss_out):
        """``targets`` (M, 1, B); each model's summed log-likelihood goes to ``loss_out`` (M,)."""
        torch._log_softmax(self.logits, 1, False, out=self.logp)  # (M, V, B)
        torch.sum(torch.gather(self.logp, 1, targets, out=self.picked), (1, 2), out=loss_out)

    def backward(self, targets):
        g = self.grad_logp
        g.zero_()
        g.scatter_(1, targets, -1.0 / self.B)  # d(mean NLL)/d logp
        return torch._log_softmax_backward_data(g, self.logp, 1, self.logp.dtype, out=self.grad_logits)
