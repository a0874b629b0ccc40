"""A fast training engine: many models of one architecture trained together, by hand.

The lecture's loop is bound by per-operation overhead: a 32-example minibatch through a
200-unit layer is a few microseconds of arithmetic and tens of microseconds of Python,
dispatch and autograd bookkeeping. :func:`train_batched` trains ``M`` models of the same
architecture (different seeds, init scales, gains, ...) as one batched model:

* every tensor carries a leading model dimension; Linear layers are batched matmuls
  (``bmm`` / ``baddbmm``), so one kernel does the work of ``M``;
* activations are kept *feature-major*, ``(M, features, batch)``: the 27-wide output
  layer's matmuls and the BatchNorm reductions are faster that way on CPU; the first
  Linear's 30 inputs are zero-padded to 32 (whole SIMD vectors);
* the backward pass is written out by hand (Karpathy's "becoming a backprop ninja"): no
  autograd graph; each Linear weight is updated inside its gradient matmul
  (``W += -lr * d @ x^T`` as one ``baddbmm_``) and all other parameters of all models with
  one ``add_`` over a flat gradient buffer; every intermediate tensor lives in a
  workspace allocated once;
* on CPU, more models than fit the cache (about 26 deep BatchNorm nets, 70 shallow ones)
  are split into batches that take turns, a stretch of up to ``divergence_check_every``
  steps each;
* it runs in ``torch.inference_mode()``: no operation pays for autograd's version counters
  and view tracking;
* on CPU, small C kernels (:mod:`actgrad.kernels`, compiled on first use) do in one pass what
  takes 3 to 10 PyTorch operations: each BatchNorm's forward pass with its batch statistics and
  running update, its backward pass through the tanh above it, the tanh backward with the bias
  gradient below it, and the embedding's gradient. Measured at 5 models (``actgrad bench``):
  1.30x the model-steps/s of the same engine on PyTorch operations for both BatchNorm nets,
  1.09x shallow, 1.05x deep. Without a C compiler the engine uses the PyTorch operations;
* no host synchronisation per step: losses stay on the device and are checked every
  ``divergence_check_every`` steps with :func:`~actgrad.train.diverged_steps`, as
  :func:`~actgrad.train.train_reference` checks them. A model that diverged is written
  back, reported with ``diverged_at`` and taken out of the batch; the others carry on
  (no operation mixes models, so a NaN cannot leak into them before the check either).

Each model starts from its :class:`~actgrad.model.Network`'s parameters and draws its
minibatches from its own generator exactly as the lecture does, so its losses are the
reference engine's up to float rounding (summation order in the matmuls and in the kernels'
sums, numpy's tanh): measured with the kernels, at most 3.1e-6 apart over 5,000 steps, and the
lecture's fix_tanh run's final train and val losses 2e-7 apart after 200,000. At the end the trained
parameters and BatchNorm running statistics are written back into each ``Network``.

Statistics: a :class:`~actgrad.stats.StatsRecorder` per model is called, at the steps its
plan asks for, with that model's slices of the tensors the engine computes anyway, in the
layouts, order and names :class:`~actgrad.stats.NetworkHooks` uses on the reference engine
(parameters before their update). On those steps the engine materialises every gradient
and updates with one ``add_``.

Tried and not kept: ``torch.compile`` (inductor, CPU, measured on the deep BatchNorm net,
10 models). Of this engine's step: 21 s to compile and half as fast as eager (2,850 vs 5,540
model-steps/s). Of an earlier, functional version of the step: 54 s to compile, 14 % faster
than the eager code of that time, which has since gained far more by the layout and fusion
choices above; inductor's vectorised tanh is as slow as torch's, and its guards cost about
0.1 ms per call.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import torch

from .model import BatchNorm1d, Embedding, Linear, Network, ReLU, Tanh
from .stats import StatsRecorder
from .train import DIVERGENCE_LOSS, TrainResult, diverged_steps, learning_rate

try:  # numpy's float32 tanh is as accurate as torch's (<= 1 ulp) and several times faster on CPU
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

INDEX_CHUNK = 1000  # steps of minibatch indices drawn (and moved to the device) at a time
GROUP_FLOATS = 3.8e6  # CPU: a batch's parameters, gradients and workspace kept to about 15 MB


# -- architecture ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    kind: str  # 'embedding' | 'linear' | 'batchnorm' | 'act'
    name: str
    fan_in: int = 0
    fan_out: int = 0
    bias: bool = False
    flavour: str = ""  # batchnorm: 'std' or 'var'; act: 'tanh' or 'relu'
    eps: float = 0.0
    momentum: float = 0.0
    param_shape: tuple = ()  # batchnorm: shape of gamma/beta in the Network


@dataclass(frozen=True)
class _Slot:
    """One trained parameter: its Network name/shape and its internal (per-model) shape."""

    name: str
    net_shape: tuple
    shape: tuple
    transposed: bool  # Linear weights are kept as (out, in), their inputs zero-padded to self.shape[1]

    def to_internal(self, t: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return t.reshape(self.shape)
        out = t.new_zeros(self.shape)
        out[:, :t.shape[0]] = t.t()
        return out

    def to_net(self, v: torch.Tensor) -> torch.Tensor:
        """One model's internal tensor as the Network holds it (a view)."""
        return v[:, :self.net_shape[0]].t() if self.transposed else v.view(self.net_shape)


def architecture(net: Network) -> tuple[_Layer, ...]:
    """The layer sequence of ``net`` as the engine sees it; raises for what it cannot train."""
    layers = []
    for name, m in net.layers.items():
        if isinstance(m, Embedding):
            layers.append(_Layer("embedding", name, fan_in=m.weight.shape[0], fan_out=m.weight.shape[1]))
        elif isinstance(m, Linear):
            layers.append(_Layer("linear", name, fan_in=m.weight.shape[0], fan_out=m.weight.shape[1],
                                 bias=m.bias is not None))
        elif isinstance(m, BatchNorm1d):
            layers.append(_Layer("batchnorm", name, fan_in=m.gamma.shape[-1], fan_out=m.gamma.shape[-1],
                                 flavour=m.normalize_by, eps=float(m.eps), momentum=float(m.momentum),
                                 param_shape=tuple(m.gamma.shape)))
        elif isinstance(m, Tanh):
            layers.append(_Layer("act", name, flavour="tanh"))
        elif isinstance(m, ReLU):
            layers.append(_Layer("act", name, flavour="relu"))
        else:
            raise TypeError(f"the batched engine cannot train layer {name!r} of type {type(m).__name__}")
    if not layers or layers[0].kind != "embedding":
        raise TypeError("the batched engine expects the network to start with its embedding")
    if len(layers) < 2 or layers[1].kind != "linear":
        raise TypeError("the batched engine expects a Linear layer right after the embedding")
    if layers[-1].kind not in ("linear", "batchnorm"):
        raise TypeError("the batched engine expects the network to end in logits (Linear or BatchNorm)")
    return tuple(layers)


def _padded(n: int) -> int:
    """The first Linear's input width rounded up to whole SIMD vectors (30 -> 32): the matmuls that
    touch it run much faster on CPU, and the zero columns stay zero under training."""
    return -(-n // 16) * 16


def _slots(arch: tuple[_Layer, ...]) -> list[_Slot]:
    slots = []
    for i, L in enumerate(arch):
        p = f"layers.{L.name}."
        if L.kind == "embedding":
            slots.append(_Slot(p + "weight", (L.fan_in, L.fan_out), (L.fan_in, L.fan_out), False))
        elif L.kind == "linear":
            fan_in = _padded(L.fan_in) if i == 1 else L.fan_in
            slots.append(_Slot(p + "weight", (L.fan_in, L.fan_out), (L.fan_out, fan_in), True))
            if L.bias:
                slots.append(_Slot(p + "bias", (L.fan_out,), (L.fan_out, 1), False))
        elif L.kind == "batchnorm":
            slots.append(_Slot(p + "gamma", L.param_shape, (L.fan_out, 1), False))
            slots.append(_Slot(p + "beta", L.param_shape, (L.fan_out, 1), False))
    return slots


def _check_same(nets: list[Network], arch) -> None:
    names = [n for n, _ in nets[0].named_parameters()]
    for i, net in enumerate(nets):
        if architecture(net) != arch:
            raise ValueError(f"model {i} has a different architecture from model 0; batch only equal architectures")
        if [n for n, _ in net.named_parameters()] != names:
            raise ValueError(f"model {i}'s parameters differ from model 0's")
    expected = [s.name for s in _slots(arch)]
    if names != expected:
        raise ValueError(f"unexpected parameters {names}, the engine knows {expected}")


# -- state of the models being trained together -----------------------------------------

class _Buffers:
    """Per-model tensors laid out block by block in one flat buffer: block ``j`` is ``(M, *shape_j)``.

    One flat buffer per kind (parameters, gradients, running statistics, batch statistics)
    makes the SGD update and the running-statistics update one kernel each.
    """

    def __init__(self, shapes: list[tuple], M: int, device, flat: torch.Tensor | None = None):
        self.shapes, self.M = shapes, M
        self.sizes = [M * _numel(s) for s in shapes]
        total = sum(self.sizes)
        self.flat = torch.empty(total, device=device) if flat is None else flat
        self.views = []
        off = 0
        for s, n in zip(shapes, self.sizes):
            self.views.append(self.flat[off:off + n].view(M, *s))
            off += n

    def select(self, keep: torch.Tensor) -> _Buffers:
        """The same buffers for the models ``keep`` only."""
        M = int(keep.numel())
        if not self.shapes:
            return _Buffers(self.shapes, M, self.flat.device)
        flat = torch.cat([v[keep].reshape(-1) for v in self.views])
        return _Buffers(self.shapes, M, self.flat.device, flat)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_threshold_backward = torch.ops.aten.threshold_backward.grad_input


# -- the layers' forward and backward passes, on tensors bound once ------------------------
# Each op holds views of everything it touches (parameters, gradients, its input, output and
# gradient buffers), so that a step is a plain walk over the ops, with no lookups.

class _LinearOp:
    """out = W^T x (+ b), feature-major: out (M, fan_out, B) = WT (M, fan_out, fan_in) @ x (M, fan_in, B)."""

    __slots__ = ("layer", "WT", "WT_t", "gWT", "bias", "gb", "x", "x_t", "out", "dx", "into_embedding", "sum_bias")

    def forward(self):
        if self.bias is None:
            torch.bmm(self.WT, self.x, out=self.out)
        else:
            torch.baddbmm(self.bias, self.WT, self.x, out=self.out)

    def backward(self, d, lr: float, fused: bool):
        """The input gradient (with the weight as it was), then the weight: updated in place by
        ``W += -lr * d @ x^T`` when ``fused``, else its gradient written for the statistics."""
        if self.sum_bias:
            torch.sum(d, 2, True, out=self.gb)
        if self.into_embedding is not None:
            dx = self.into_embedding(d)
        else:
            dx = torch.bmm(self.WT_t, d, out=self.dx)
        if fused:
            self.WT.baddbmm_(d, self.x_t, alpha=-lr)
        else:
            torch.bmm(d, self.x_t, out=self.gWT)
        return dx


class _BatchNormOp:
    """gamma * (x - mean) / spread' + beta, with spread' = std (no eps) or sqrt(var + eps).

    The batch's sum and norm (of the centred input) go to the batch-statistics buffer, which
    :meth:`_Batch._finish_batch_stats` turns into mean and std/var for all layers at once. The
    input is centred in place and kept for the backward pass, with 1 / spread'.
    """

    __slots__ = ("layer", "gamma", "ggamma", "beta", "gbeta", "x", "out", "total", "norm", "inv", "scale", "k",
                 "dx", "inv_B", "std", "sqrt_n1", "eps", "inv_n1", "neg_inv_n1", "kernels", "args", "tanh_out")

    def forward(self):
        if self.kernels is not None:  # all of the below, the batch statistics and the running update
            self.kernels.bn_forward(self.args)
            return
        torch.sum(self.x, 2, True, out=self.total)
        xc = torch.sub(self.x, self.total, alpha=self.inv_B, out=self.x)  # centred in place
        # torch.var is slow along a short contiguous dimension on CPU: the norm is one pass
        torch.linalg.vector_norm(xc, 2, 2, True, out=self.norm)
        if self.std:  # 1 / std = sqrt(B - 1) / norm
            torch.reciprocal(self.norm, out=self.inv).mul_(self.sqrt_n1)
        else:  # 1 / sqrt(norm^2 / (B - 1) + eps)
            torch.addcmul(self.eps, self.norm, self.norm, value=self.inv_n1, out=self.inv).rsqrt_()
        # gamma * xhat + beta with xhat = xc / spread', as xc * (gamma / spread') + beta: one pass less
        torch.mul(self.gamma, self.inv, out=self.scale)
        torch.mul(xc, self.scale, out=self.out).add_(self.beta)

    def backward(self, d, lr: float, fused: bool):
        """dx = gamma/spread' * (d - mean(d) - xhat * sum(d * xhat) / (B - 1)), xhat = xc / spread'.

        With the kernels, d may still be the gradient of the tanh above (``tanh_out``), which
        the kernel takes through the tanh first."""
        xc, dx = self.x, self.dx
        if self.kernels is not None:
            self.kernels.bn_backward(self.args, d.data_ptr(), self.tanh_out, dx.data_ptr())
            return dx
        torch.sum(d, 2, True, out=self.gbeta)
        torch.sum(torch.mul(d, xc, out=dx), 2, True, out=self.ggamma).mul_(self.inv)  # sum(d * xhat)
        torch.mul(self.ggamma, self.inv, out=self.k)
        torch.sub(d, self.gbeta, alpha=self.inv_B, out=dx)
        dx.addcmul_(xc, self.k, value=self.neg_inv_n1)
        dx.mul_(self.scale)
        return dx


class _ActivationOp:
    """tanh or relu, in place: the pre-activation is not needed again (after the statistics)."""

    __slots__ = ("layer", "x", "x_np", "dx", "tanh", "kernels", "into_batchnorm", "bias_grad", "rows")

    def forward(self):
        if self.x_np is not None:  # numpy's float32 tanh: as accurate as torch's, several times faster
            _np.tanh(self.x_np, out=self.x_np)
        elif self.tanh:
            torch.tanh(self.x, out=self.x)
        else:
            torch.clamp_min(self.x, 0, out=self.x)

    def backward(self, d, lr: float, fused: bool):
        if self.into_batchnorm:  # the BatchNorm kernel below takes d through the tanh
            return d
        if self.kernels is not None:  # and the bias gradient of the Linear below, in the same pass
            self.kernels.tanh_backward_bias(d.data_ptr(), self.x.data_ptr(), self.dx.data_ptr(), self.bias_grad,
                                            self.rows, self.x.shape[-1])
            return self.dx
        if self.tanh:
            return _tanh_backward(d, self.x, grad_input=self.dx)
        return _threshold_backward(d, self.x, 0, grad_input=self.dx)


class _Batch:
    """The engine proper: the batched forward, hand-written backward and update of M models.

    Every intermediate tensor lives in a workspace allocated once (and again when models
    leave the batch): on CPU, fresh memory for every operation costs more in cache misses
    than the arithmetic.
    """

    def __init__(self, nets: list[Network], arch, batch_size: int, block_size: int, device, kernels=None):
        self.arch, self.B, self.T, self.device = arch, batch_size, block_size, device
        self.kernels = kernels  # the compiled CPU kernels (actgrad.kernels), or None
        self.M = M = len(nets)
        # The flat buffers hold the small parameters (embedding, biases, BatchNorm) first and
        # the Linear weights last: on most steps the weights are updated inside their
        # gradient matmul, and the small ones with one add_ over the buffer's head.
        slots = _slots(arch)
        self.slots = ([s for s in slots if not s.transposed] + [s for s in slots if s.transposed])
        self.named_order = [self.slots.index(s) for s in slots]
        self.params = _Buffers([s.shape for s in self.slots], M, device)
        with torch.no_grad():
            for j, s in enumerate(self.slots):
                self.params.views[j].copy_(torch.stack(
                    [s.to_internal(dict(net.named_parameters())[s.name].detach()).to(device) for net in nets]))
        self.grads = _Buffers([s.shape for s in self.slots], M, device)
        # BatchNorm statistics, running and of the batch, for K layers: block k is the k-th
        # layer's mean, block K + k its std or variance. Means first, then spreads, so that
        # each half is finished and each running update is done by one op for all layers.
        self.bn_layers = [L for L in arch if L.kind == "batchnorm"]
        K = self.n_bn = len(self.bn_layers)
        bn_shapes = [(L.fan_out, 1) for L in self.bn_layers] * 2
        self.running = _Buffers(bn_shapes, M, device)
        with torch.no_grad():
            for k, L in enumerate(self.bn_layers):
                mods = [net.layers[L.name] for net in nets]
                self.running.views[k].copy_(torch.stack(
                    [m.running_mean.detach().reshape(L.fan_out, 1).to(device) for m in mods]))
                self.running.views[K + k].copy_(torch.stack(
                    [m.running_spread.detach().reshape(L.fan_out, 1).to(device) for m in mods]))
        self.batch_stats = _Buffers(bn_shapes, M, device)
        momenta = {L.momentum for L in self.bn_layers}
        self.momentum = momenta.pop() if len(momenta) == 1 else None  # None: one per layer
        flavours = {L.flavour for L in self.bn_layers}
        self.flavour = flavours.pop() if len(flavours) == 1 else None  # None: one per layer
        self._bind()

    def _bind(self):
        """Ops bound to the flat buffers and to a fresh workspace, for the current M."""
        M, B, dev = self.M, self.B, self.device
        self._view_cache = {}
        self._consts = {}
        self.n_small = sum(M * _numel(s.shape) for s in self.slots if not s.transposed)
        slot_of = {s.name: j for j, s in enumerate(self.slots)}
        P, G = self.params.views, self.grads.views
        emb = self.arch[0]
        self.vocab = emb.fan_in
        self.C_flat = P[slot_of[f"layers.{emb.name}.weight"]].view(M * emb.fan_in, emb.fan_out)
        self.gC_flat = G[slot_of[f"layers.{emb.name}.weight"]].view(M * emb.fan_in, emb.fan_out)
        n_in = self.T * emb.fan_out
        n_pad = _padded(n_in)
        self.emb = torch.empty(M * B * self.T, emb.fan_out, device=dev)  # rows looked up in C
        self.demb = torch.empty(M, B, n_in, device=dev)
        if n_pad != n_in:  # the first Linear's input, zero-padded
            self.emb_padded = torch.zeros(M, B, n_pad, device=dev)
            self.demb_padded = torch.empty(M, B, n_pad, device=dev)
            self._emb_into_padded = self.emb_padded[:, :, :n_in]
        else:
            self.emb_padded, self.demb_padded = self.emb.view(M, B, n_in), self.demb
            self._emb_into_padded = None
        numpy_tanh = _np is not None and torch.device(dev).type == "cpu"
        c = self._const
        # Forward: each Linear and BatchNorm writes a buffer of its own, which the next layers
        # transform in place (BatchNorm centres its input, tanh overwrites it), so each layer
        # keeps exactly what its backward pass needs.
        self.ops = []
        x = self.emb_padded.transpose(1, 2)  # feature-major (M, T*E padded, B)
        bn_k = 0
        for L in self.arch[1:]:
            if L.kind == "linear":
                op = _LinearOp()
                w = slot_of[f"layers.{L.name}.weight"]
                b = slot_of.get(f"layers.{L.name}.bias")
                op.WT, op.gWT = P[w], G[w]
                op.WT_t = P[w].transpose(1, 2)
                op.bias, op.gb = (None, None) if b is None else (P[b], G[b])
                op.x, op.x_t = x, x.transpose(1, 2)
                op.out = x = torch.empty(M, L.fan_out, B, device=dev)
                op.into_embedding = self._embedding_backward if not self.ops else None
                op.sum_bias = op.gb is not None
            elif L.kind == "batchnorm":
                op = _BatchNormOp()
                gm, bt = slot_of[f"layers.{L.name}.gamma"], slot_of[f"layers.{L.name}.beta"]
                op.gamma, op.ggamma, op.beta, op.gbeta = P[gm], G[gm], P[bt], G[bt]
                op.total, op.norm = self.batch_stats.views[bn_k], self.batch_stats.views[self.n_bn + bn_k]
                bn_k += 1
                op.x = x
                op.out = x = torch.empty_like(x)
                op.inv, op.scale, op.k = (torch.empty(M, L.fan_out, 1, device=dev) for _ in range(3))
                op.std = L.flavour == "std"
                op.inv_B, op.inv_n1, op.neg_inv_n1 = 1.0 / B, 1.0 / (B - 1), -1.0 / (B - 1)
                op.sqrt_n1, op.eps = c((B - 1) ** 0.5), c(L.eps)
                op.kernels, op.tanh_out = self.kernels, None
                if self.kernels is not None:
                    op.args = self._batchnorm_args(op, bn_k - 1, L)
            else:
                op = _ActivationOp()
                op.x = x
                op.tanh = L.flavour == "tanh"
                op.x_np = x.numpy() if numpy_tanh and op.tanh else None
                op.kernels, op.into_batchnorm, op.bias_grad = None, False, None
                below = self.ops[-1] if self.ops else None
                if self.kernels is not None and op.tanh:
                    if isinstance(below, _BatchNormOp):
                        op.into_batchnorm, below.tanh_out = True, x.data_ptr()
                    else:
                        op.kernels, op.rows = self.kernels, M * x.shape[1]
                        if isinstance(below, _LinearOp) and below.sum_bias:
                            op.bias_grad, below.sum_bias = below.gb.data_ptr(), False
            op.layer = L
            self.ops.append(op)
        self.logits = x
        # Backward: gradients flow through two shared ping-pong buffers.
        widest = max(max(L.fan_in, L.fan_out) for L in self.arch[1:] if L.kind == "linear")
        pingpong = [torch.empty(M * widest * B, device=dev) for _ in range(2)]
        flip = 0
        for op in reversed(self.ops):
            if isinstance(op, _LinearOp) and op.into_embedding is not None:
                continue
            shape = op.x.shape
            op.dx = pingpong[flip][:_numel(shape)].view(shape)
            flip ^= 1
        self._running_tmp = torch.empty_like(self.running.flat)
        self._small_params, self._small_grads = self.params.flat[:self.n_small], self.grads.flat[:self.n_small]
        V = self.arch[-1].fan_out
        self.logp = torch.empty(M, V, B, device=dev)
        self.picked = torch.empty(M, 1, B, device=dev)
        self.g_out = torch.zeros(M, V, B, device=dev)
        self.dlogits = torch.empty(M, V, B, device=dev)

    def _batchnorm_args(self, op: _BatchNormOp, k: int, L: _Layer):
        """The kernel's view of BatchNorm op ``op``, the ``k``-th: its buffers, sizes and constants."""
        from .kernels import BatchNormArgs

        K, stats, running = self.n_bn, self.batch_stats.views, self.running.views
        ptrs = dict(x=op.x, out=op.out, gamma=op.gamma, beta=op.beta, inv=op.inv, scale=op.scale, mean=stats[k],
                    spread=stats[K + k], run_mean=running[k], run_spread=running[K + k], ggamma=op.ggamma,
                    gbeta=op.gbeta)
        for name, t in ptrs.items():
            if not t.is_contiguous():  # pragma: no cover - every workspace tensor is made contiguous
                raise RuntimeError(f"BatchNorm kernel needs a contiguous {name}")
        args = BatchNormArgs(**{n: t.data_ptr() for n, t in ptrs.items()}, rows=self.M * L.fan_out, B=self.B,
                             std_flavour=int(L.flavour == "std"), eps=L.eps, keep=1 - L.momentum, take=L.momentum)
        return ctypes.pointer(args)

    def select(self, keep: torch.Tensor) -> None:
        """Carry on with the models at positions ``keep`` only."""
        self.params = self.params.select(keep)
        self.grads = _Buffers(self.grads.shapes, int(keep.numel()), self.device)
        self.running = self.running.select(keep)
        self.batch_stats = self.batch_stats.select(keep)
        self.M = int(keep.numel())
        self._bind()

    # -- one training step ---------------------------------------------------
    def step(self, idx: torch.Tensor, Y: torch.Tensor, lr: float, loss_out: torch.Tensor, stats=None) -> None:
        """Forward, backward and SGD update of every model on its minibatch.

        ``idx``: (M * B * block_size,) rows of the flattened embedding tables;
        ``Y``: (M, 1, B) targets; the minibatch's summed log-likelihood goes to ``loss_out`` (M,).
        ``stats``: None, or (step, [(position, recorder), ...]) for the models whose recorder
        wants this step. On such steps every gradient is materialised for the recorders and
        the update is one add_; on the others each Linear weight is updated inside its
        gradient matmul (``W += -lr * d @ x^T`` as one baddbmm_, after its input gradient).
        """
        self._idx = idx
        fused = stats is None
        # forward --------------------------------------------------------------
        torch.index_select(self.C_flat, 0, idx, out=self.emb)
        if self._emb_into_padded is not None:
            self._emb_into_padded.copy_(self.emb.view(self.M, self.B, -1))
        if fused:
            for op in self.ops:
                op.forward()
        else:
            self._forward_recording(stats)
        if self.bn_layers and self.kernels is None:  # the kernels do both in the forward pass
            self._finish_batch_stats()
            self._update_running()
        logp = torch._log_softmax(self.logits, 1, False, out=self.logp)  # (M, V, B)
        torch.sum(torch.gather(logp, 1, Y, out=self.picked), (1, 2), out=loss_out)
        # backward -------------------------------------------------------------
        g = self.g_out
        g.zero_()
        g.scatter_(1, Y, -1.0 / self.B)  # d(mean NLL)/d logp
        d = torch._log_softmax_backward_data(g, logp, 1, logp.dtype, out=self.dlogits)
        if fused:
            for op in reversed(self.ops):
                d = op.backward(d, lr, True)
            self._small_params.add_(self._small_grads, alpha=-lr)
        else:
            step, wanting = stats
            for op in reversed(self.ops):
                if isinstance(op, _ActivationOp):
                    grads = self._per_model(d)
                    for i, rec in wanting:
                        if rec.plan.series(step):
                            rec.activation_grad(step, op.layer.name, grads[i])
                d = op.backward(d, lr, False)
            self._record_parameters(stats, lr)
            self.params.flat.add_(self.grads.flat, alpha=-lr)

    def _forward_recording(self, stats):
        """The forward pass, calling the recorders at each activation as NetworkHooks does."""
        step, wanting = stats
        for op in self.ops:
            if isinstance(op, _ActivationOp):
                pre = self._per_model(op.x)
                for i, rec in wanting:
                    rec.preactivation(step, op.layer.name, pre[i])
                op.forward()
                for i, rec in wanting:
                    rec.activation(step, op.layer.name, pre[i])  # the same buffer, now the output
            else:
                op.forward()

    def _embedding_backward(self, d):
        """d (M, fan_out, B) into the first Linear -> rows of C, as autograd does for C[X]."""
        M, B = self.M, self.B
        torch.bmm(d.transpose(1, 2), self.ops[0].WT, out=self.demb_padded)
        if self.kernels is not None:  # zero, then add each lookup's rows, padding skipped: one pass
            self.kernels.embedding_backward(self.gC_flat.data_ptr(), self.gC_flat.shape[0], self.gC_flat.shape[1],
                                            self._idx.data_ptr(), self._idx.numel(), self.demb_padded.data_ptr(),
                                            self.T, self.demb_padded.shape[2])
            return None
        if self.demb_padded.data_ptr() != self.demb.data_ptr():
            self.demb.copy_(self.demb_padded[:, :, :self.demb.shape[2]])
        self.gC_flat.zero_()  # index_put_ with accumulation: what autograd does for C[X]
        self.gC_flat.index_put_((self._idx,), self.demb.view(M * B * self.T, -1), accumulate=True)
        return None

    def _finish_batch_stats(self):
        """Sums and norms -> batch means and std (or variance), every BatchNorm layer at once."""
        B, K = self.B, self.n_bn
        stats = self.batch_stats.views
        if self.flavour is not None:
            half = self.batch_stats.flat.shape[0] // 2
            groups = [(self.batch_stats.flat[:half], self.batch_stats.flat[half:], self.flavour)]
        else:
            groups = [(stats[k], stats[K + k], L.flavour) for k, L in enumerate(self.bn_layers)]
        for means, spreads, flavour in groups:
            means.mul_(self._const(1.0 / B))
            if flavour == "std":
                spreads.mul_(self._const((B - 1) ** -0.5))
            else:
                spreads.mul_(spreads).mul_(self._const(1.0 / (B - 1)))

    def _update_running(self):
        # Written as the model writes it, (1 - m) * running + m * batch: in float32 the two
        # coefficients do not sum to exactly 1, and lerp would round differently.
        # (Constants are 0-dim tensors: a Python float operand costs a conversion per call.)
        if self.momentum is not None:
            keep, take = self._const(1 - self.momentum), self._const(self.momentum)
            self.running.flat.mul_(keep).add_(torch.mul(self.batch_stats.flat, take, out=self._running_tmp))
        else:
            for j, L in enumerate(self.bn_layers):
                for k in (j, self.n_bn + j):
                    self.running.views[k].mul_(self._const(1 - L.momentum)).add_(
                        self.batch_stats.views[k] * self._const(L.momentum))

    def _const(self, value: float) -> torch.Tensor:
        c = self._consts.get(value)
        if c is None:
            c = self._consts[value] = torch.tensor(value, dtype=torch.float32, device=self.device)
        return c

    # -- statistics: each model's slices, in the Network's layouts ----------------
    def _per_model(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Model i's (batch, features) view of a feature-major workspace tensor, for every i (cached)."""
        key = (t.data_ptr(), t.shape, t.stride())
        views = self._view_cache.get(key)
        if views is None:
            views = self._view_cache[key] = [t[i].t() for i in range(self.M)]
        return views

    def _model_views(self, i: int):
        """Model i's parameters with their gradients (named_parameters order) and BatchNorm statistics."""
        views = self._view_cache.get(i)
        if views is None:
            params = [(self.slots[j].name, self.slots[j].to_net(self.params.views[j][i]),
                       self.slots[j].to_net(self.grads.views[j][i])) for j in self.named_order]
            K = self.n_bn
            bns = [(L.name, self.batch_stats.views[k][i].view(-1), self.batch_stats.views[K + k][i].view(-1),
                    self.running.views[k][i].view(-1), self.running.views[K + k][i].view(-1))
                   for k, L in enumerate(self.bn_layers)]
            views = self._view_cache[i] = (params, bns)
        return views

    def _record_parameters(self, stats, lr):
        step, wanting = stats
        for i, rec in wanting:
            params, bns = self._model_views(i)
            for name, data, grad in params:  # the order of named_parameters(), as NetworkHooks calls
                rec.parameter(step, name, data, grad, lr)
            if rec.plan.series(step):
                for name, mean, spread, rmean, rspread in bns:
                    rec.batchnorm(step, name, mean, spread, rmean, rspread)

    # -- writing back -------------------------------------------------------
    @torch.no_grad()
    def write_back(self, net: Network, i: int) -> None:
        params = dict(net.named_parameters())
        for j, s in enumerate(self.slots):
            params[s.name].copy_(s.to_net(self.params.views[j][i]))
        K = self.n_bn
        for k, L in enumerate(self.bn_layers):
            bn = net.layers[L.name]
            bn.running_mean = self.running.views[k][i].reshape(bn.running_mean.shape).clone().to(
                bn.running_mean.device)
            bn.running_spread = self.running.views[K + k][i].reshape(bn.running_spread.shape).clone().to(
                bn.running_spread.device)
            bn.last_batch_mean = self.batch_stats.views[k][i].reshape(1, -1).clone()
            bn.last_batch_spread = self.batch_stats.views[K + k][i].reshape(1, -1).clone()


# -- the driver ---------------------------------------------------------------------------

def _stat_schedule(positions, k0: int, k1: int) -> dict[int, list]:
    """step -> [(position, recorder)] for the steps in [k0, k1) that some recorder wants."""
    schedule: dict[int, list] = {}
    wanted: dict[int, list[int]] = {}  # id of a plan -> the steps it wants (recorders often share one)
    for pos, rec in positions:
        steps = wanted.get(id(rec.plan))
        if steps is None:
            steps = wanted[id(rec.plan)] = [s for s in range(k0, k1) if rec.plan.any(s)]
        for s in steps:
            schedule.setdefault(s, []).append((pos, rec))
    return schedule


class _Group:
    """Models trained together as one :class:`_Batch`, with their minibatches and losses of the current chunk."""

    def __init__(self, members: list[int], nets, arch, batch_size, block_size, device, kernels=None):
        self.members = members  # model numbers, in batch order
        self.batch = _Batch([nets[m] for m in members], arch, batch_size, block_size, device, kernels)

    def draw(self, gens, k0: int, k1: int, n_train: int, Xtr_d, Ytr_d, recorders) -> None:
        """The minibatch indices of steps [k0, k1) from each model's generator, as the lecture draws them."""
        K, B, Mg, dev = k1 - k0, self.batch.B, len(self.members), self.batch.device
        self.k0 = k0
        self.states = [gens[m].get_state() for m in self.members]
        ix = torch.stack([torch.randint(0, n_train, (K, B), generator=gens[m]) for m in self.members],
                         dim=1).to(dev)  # (K, Mg, B)
        # rows of the flattened embedding tables: model p's characters + p * vocabulary
        offsets = torch.arange(Mg, device=dev) * self.batch.vocab
        idx = torch.index_select(Xtr_d, 0, ix.view(-1)).view(K, Mg, -1)
        self.idx = idx.add_(offsets.view(1, Mg, 1)).view(K, -1)  # (K, Mg*B*T)
        self.Y = torch.index_select(Ytr_d, 0, ix.view(-1)).view(K, Mg, 1, B)
        self.loss_sums = torch.empty(K, Mg, device=dev)  # minibatch sums of log-likelihoods
        self.flushed = k0
        self._plan_stats(recorders, k0, k0 + K)

    def _plan_stats(self, recorders, k0: int, k1: int) -> None:
        positions = [(p, recorders[m]) for p, m in enumerate(self.members) if recorders[m] is not None]
        self.schedule = _stat_schedule(positions, k0, k1) if positions else {}
        self.members_t = torch.tensor(self.members, dtype=torch.long, device=self.batch.device)

    def run(self, a: int, b: int, lr_schedule) -> None:
        """Steps [a, b)."""
        batch, k0, schedule = self.batch, self.k0, self.schedule
        for step in range(a, b):
            wanting = schedule.get(step)
            batch.step(self.idx[step - k0], self.Y[step - k0], learning_rate(lr_schedule, step),
                       self.loss_sums[step - k0], (step, wanting) if wanting else None)

    def flush(self, losses: torch.Tensor, upto: int) -> None:
        """Mean minibatch losses of the steps run since the last flush, into ``losses`` (steps, all models)."""
        if upto > self.flushed:
            losses[self.flushed:upto, self.members_t] = (self.loss_sums[self.flushed - self.k0:upto - self.k0]
                                                         * (-1.0 / self.batch.B))
            self.flushed = upto

    def drop(self, keep: list[int], recorders, upto: int) -> None:
        """Carry on with the models at positions ``keep`` (a divergence check found the others gone)."""
        dev, K = self.batch.device, self.idx.shape[0]
        n = len(self.members)
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
        self.batch.select(keep_t)
        # the kept models' rows, renumbered to their new places in the embedding tables
        shift = (keep_t - torch.arange(len(keep), device=dev)) * self.batch.vocab
        self.idx = self.idx.view(K, n, -1)[:, keep_t].sub_(shift.view(1, -1, 1)).reshape(K, -1)
        self.Y = self.Y[:, keep_t]
        self.loss_sums = self.loss_sums[:, keep_t]
        self.states = [self.states[p] for p in keep]
        self.members = [self.members[p] for p in keep]
        self._plan_stats(recorders, upto, self.k0 + K)


def group_size(arch, batch_size: int, block_size: int, budget: float = GROUP_FLOATS) -> int:
    """How many models to train as one batch on CPU: beyond the cache, bigger batches are slower."""
    V, widest, per_model = arch[-1].fan_out, 0, 0
    for i, L in enumerate(arch):
        if L.kind == "embedding":
            per_model += 2 * L.fan_in * L.fan_out + 4 * block_size * L.fan_out * batch_size
        elif L.kind == "linear":
            fan_in = _padded(L.fan_in) if i == 1 else L.fan_in
            per_model += 2 * fan_in * L.fan_out + (1 if L.bias else 0) * 2 * L.fan_out + L.fan_out * batch_size
            widest = max(widest, fan_in, L.fan_out)
        elif L.kind == "batchnorm":
            per_model += 4 * L.fan_out + L.fan_out * batch_size
    per_model += 2 * widest * batch_size + 4 * V * batch_size  # backward buffers, log-probabilities
    return max(1, int(budget // per_model))


def train_batched(nets: list[Network], gens: list[torch.Generator], Xtr: torch.Tensor, Ytr: torch.Tensor, *,
                  steps: int, batch_size: int, lr_schedule: list[dict],
                  recorders: list[StatsRecorder | None] | None = None, device=torch.device("cpu"),
                  divergence_check_every: int = 100, divergence_loss: float = DIVERGENCE_LOSS,
                  index_chunk: int = INDEX_CHUNK, max_group: int | None = None,
                  kernels: bool | None = None) -> list[TrainResult]:
    """Train ``nets`` (one architecture, already initialised) together; one TrainResult per model.

    ``gens[i]`` is the generator that drew ``nets[i]``; it draws model i's minibatch indices as
    the lecture does (``torch.randint(0, n, (batch_size,), generator=g)`` per step). Each
    model stops at its first diverged loss (non-finite or above ``divergence_loss``), checked
    every ``divergence_check_every`` steps and at the last step, exactly as
    :func:`~actgrad.train.train_reference` does; the others go on. ``recorders[i]``, if given,
    is called at the steps its plan asks for. At the end every network holds its trained
    parameters and BatchNorm running statistics (on ``device``).

    On CPU, more models than fit the cache (``max_group``, by default from the architecture's
    size: about 20 deep or 50 shallow nets) are trained as several batches, each for a stretch
    of steps in turn. ``seconds`` is the wall time of the whole run, the same for every model;
    ``extra['models_in_batch']`` says how many models shared it, ``extra['kernels']`` what did
    the elementwise work on CPU: ``"C"`` (:mod:`actgrad.kernels`) or ``"PyTorch"`` (None on a GPU).
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
    _check_same(nets, arch)
    T = Xtr.shape[1]
    if arch[0].fan_out * T != arch[1].fan_in:
        raise ValueError(f"block size {T} does not fit the first Linear layer ({arch[1].fan_in} inputs)")
    n_train = Xtr.shape[0]
    for net in nets:
        net.to(device)
        net.train()

    compiled = None
    if device.type == "cpu" and kernels is not False:
        from . import kernels as _kernels

        compiled = _kernels.load()
        if compiled is None and kernels:
            raise RuntimeError(f"the C kernels were asked for but are {_kernels.status()}")

    used = None if device.type != "cpu" else "C" if compiled is not None else "PyTorch"

    start = time.perf_counter()
    if max_group is None:
        max_group = group_size(arch, batch_size, T) if device.type == "cpu" else M
    n_groups = -(-M // max(1, max_group))
    bounds = [round(i * M / n_groups) for i in range(n_groups + 1)]  # as equal as can be
    diverged_at: list[int | None] = [None] * M
    done_steps = [steps] * M
    every = divergence_check_every

    # Inference mode, not just no_grad: its tensors skip the version counters and view tracking
    # that every operation pays for otherwise (measured: 5-10 % more model-steps/s at 5 models).
    with torch.inference_mode():
        groups = [_Group(list(range(a, b)), nets, arch, batch_size, T, device, compiled)
                  for a, b in zip(bounds, bounds[1:])]
        Xtr_d, Ytr_d = Xtr.to(device), Ytr.to(device)
        losses = torch.full((steps, M), float("nan"), dtype=torch.float32, device=device)
        k0 = 0
        while k0 < steps and groups:
            k1 = min(steps, k0 + index_chunk)
            for grp in groups:
                grp.draw(gens, k0, k1, n_train, Xtr_d, Ytr_d, recorders)
            step = k0
            while step < k1 and groups:
                # each group in turn for a stretch of steps: its workspace stays in cache
                end = min(k1, (step // every + 1) * every, steps)
                for grp in groups:
                    grp.run(step, end, lr_schedule)
                step = end
                if step % every and step != steps:
                    continue
                # As train_reference: the last `divergence_check_every` losses, every so many steps.
                w0 = max(0, step - every)
                for grp in groups:
                    grp.flush(losses, step)
                    bad = diverged_steps(losses[w0:step, grp.members_t], divergence_loss)
                    if not bool(bad.any()):
                        continue
                    first, any_bad = bad.float().argmax(0).tolist(), bad.any(0).tolist()
                    keep = []
                    for p, m in enumerate(grp.members):
                        if not any_bad[p]:
                            keep.append(p)
                            continue
                        diverged_at[m] = w0 + first[p]
                        done_steps[m] = diverged_at[m] + 1
                        grp.batch.write_back(nets[m], p)
                        # leave the generator as the reference leaves it: drawn up to this step
                        gens[m].set_state(grp.states[p])
                        torch.randint(0, n_train, (step - k0, batch_size), generator=gens[m])
                    if keep:
                        grp.drop(keep, recorders, step)
                    else:
                        grp.members = []
                groups = [grp for grp in groups if grp.members]
            for grp in groups:
                grp.flush(losses, k1)
            k0 = k1
        for grp in groups:
            for p, m in enumerate(grp.members):
                grp.batch.write_back(nets[m], p)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = losses.cpu()
    return [TrainResult(losses=losses[:done_steps[m], m].clone(), steps_done=done_steps[m],
                        diverged_at=diverged_at[m], seconds=seconds, extra={"models_in_batch": M, "kernels": used})
            for m in range(M)]
