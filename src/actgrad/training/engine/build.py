"""Wiring the ops to the state and the workspace: the backend and the fusions are chosen here, once.

With the C kernels (CPU, a compiler), neighbours share a pass:

* a tanh right above a BatchNorm: the BatchNorm's backward kernel takes the gradient through
  the tanh first (the tanh's own backward passes the gradient on untouched);
* a tanh right above a Linear with a bias: the tanh's backward kernel also sums the bias
  gradient (the Linear does not); so does the loss's kernel for a Linear that gives the logits,
  in the pass that takes the loss and its gradient (forward and backward of the loss in one);
* each BatchNorm's forward kernel finishes its batch statistics and updates its running ones;
* the embedding's lookup writes straight into the first Linear's zero-padded input.

On PyTorch operations the BatchNorm statistics are one pass over every layer's after the forward
pass (:class:`~.ops.BatchNormStatistics`). A LayerNorm takes a kernel of its own for each pass (a tanh
next to it takes its own kernel, without a fusion). ReLU and GELU have no kernel and run on PyTorch
either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from actgrad.training.engine import kernel_ops, ops
from actgrad.training.engine.layout import Layer
from actgrad.training.engine.state import ModelState
from actgrad.training.engine.workspace import Workspace


@dataclass
class Wiring:
    embedding: ops.Embedding
    layers: list  # one op per layer after the embedding, in forward order
    after_forward: list  # callables run after the layers' forward pass
    loss: ops.CrossEntropy


def _is_tanh(layer: Layer | None) -> bool:
    return layer is not None and layer.kind == "act" and layer.flavour == "tanh"


def build_ops(arch: tuple[Layer, ...], state: ModelState, ws: Workspace, block_size: int, kernels=None) -> Wiring:
    """The ops of ``arch`` over ``state`` and ``ws``: on the C kernels where ``kernels`` is the loaded library."""
    use_c = kernels is not None
    P, G = state.params.views, state.grads.views
    emb = arch[0]
    table_slot = state.slot(f"layers.{emb.name}.weight")
    padded = ws["embedding.padded"] if "embedding.padded" in ws else None
    grad_padded = ws["embedding.grad_padded"] if padded is not None else ws["embedding.grad_rows"]
    buffers = (P[table_slot].view(-1, emb.fan_out), G[table_slot].view(-1, emb.fan_out),
               ws["embedding.rows"].view(-1, emb.fan_out), padded, ws["embedding.grad_rows"], grad_padded)
    embedding = kernel_ops.EmbeddingC(kernels, block_size, *buffers) if use_c else ops.Embedding(*buffers)

    first_input = padded if padded is not None else ws["embedding.rows"].view(ws["embedding.grad_rows"].shape)
    x = first_input.transpose(1, 2)  # feature-major (M, padded T * E, B)
    layers = arch[1:]
    wired: list = []
    bn_index = 0
    logits_bias_grad = None  # where the loss's kernel sums the bias gradient of the Linear that gives the logits
    for j, L in enumerate(layers):
        below = layers[j - 1] if j > 0 else None
        above = layers[j + 1] if j + 1 < len(layers) else None
        # The gradient of this op's input: the two backward buffers in turn, from the top down
        # (the first Linear's goes straight into the embedding's).
        dx = ws.flat("backward.ping" if (len(layers) - 1 - j) % 2 == 0 else "backward.pong")[:x.numel()].view(x.shape)
        if L.kind == "linear":
            w, b = state.slot(f"layers.{L.name}.weight"), (state.slot(f"layers.{L.name}.bias") if L.bias else None)
            # the bias gradient summed by the tanh above, or by the loss where this Linear gives the logits
            bias_summed_above = use_c and L.bias and (_is_tanh(above) or above is None)
            args = (L, P[w], G[w], P[b] if L.bias else None, G[b] if L.bias else None, x, ws[f"{L.name}.out"], dx)
            sum_bias = L.bias and not bias_summed_above
            if j == 0:
                op = ops.LinearIntoEmbedding(*args, sum_bias=sum_bias, embedding=embedding)
            else:
                op = ops.Linear(*args, sum_bias=sum_bias)
            if bias_summed_above and above is None:
                logits_bias_grad = op.bias_grad
            x = op.out
        elif L.kind == "batchnorm":
            g, b = state.slot(f"layers.{L.name}.gamma"), state.slot(f"layers.{L.name}.beta")
            out, inv, scale = ws[f"{L.name}.out"], ws[f"{L.name}.inv"], ws[f"{L.name}.scale"]
            mean, spread = state.batch_mean(bn_index), state.batch_spread(bn_index)
            if use_c:
                op = kernel_ops.BatchNormC(kernels, L, P[g], G[g], P[b], G[b], x, out, dx, mean, spread,
                                           state.running_mean(bn_index), state.running_spread(bn_index), inv, scale,
                                           through_tanh=_is_tanh(above))
            else:
                op = ops.BatchNorm(L, P[g], G[g], P[b], G[b], x, out, dx, mean, spread, inv, scale,
                                   ws[f"{L.name}.xc_coef"], ws.constant)
            bn_index += 1
            x = out
        elif L.kind == "layernorm":
            g, b = state.slot(f"layers.{L.name}.gamma"), state.slot(f"layers.{L.name}.beta")
            args = (L, P[g], G[g], P[b], G[b], x, ws[f"{L.name}.out"], dx,
                    *(ws[f"{L.name}.{part}"] for part in ("mean", "inv", "grad_mean", "grad_xhat_mean")))
            op = kernel_ops.LayerNormC(kernels, *args) if use_c else ops.LayerNorm(*args)
            x = op.out
        elif L.flavour == "relu":
            op = ops.ReLU(L, x, dx)
        elif L.flavour == "gelu":
            op = ops.GELU(L, x, dx, out=ws[f"{L.name}.out"])
            x = op.out
        elif not use_c:
            op = ops.Tanh(L, x, dx)
        elif below.kind == "batchnorm":
            op = kernel_ops.TanhIntoBatchNormC(L, x, dx)
        else:
            bias_grad = wired[-1].bias_grad if below.kind == "linear" and below.bias else None
            op = kernel_ops.TanhC(kernels, L, x, dx, bias_grad)
        wired.append(op)

    after_forward = []
    if state.bn_layers and not use_c:
        after_forward.append(ops.BatchNormStatistics(state.bn_layers, state, ws.flat("batchnorm.running_update"),
                                                     ws.constant, x.shape[2]))
    loss_buffers = (x, ws["loss.logp"], ws["loss.picked"], ws["loss.grad_logp"], ws["loss.grad_logits"])
    if use_c:
        loss = kernel_ops.CrossEntropyC(kernels, *loss_buffers, bias_grad=logits_bias_grad)
    else:
        loss = ops.CrossEntropy(*loss_buffers)
    return Wiring(embedding, wired, after_forward, loss)
