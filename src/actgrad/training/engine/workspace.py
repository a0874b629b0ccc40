"""Every intermediate tensor of a step, allocated once for M models.

On CPU, fresh memory for every operation costs more in cache misses than the arithmetic, so
each layer's output, the backward pass's buffers and the loss's buffers live here for the
whole run (and are allocated again when models leave the batch). :func:`buffer_shapes` is the
one description of them: :class:`Workspace` allocates exactly that, and the driver sizes its
groups of models from the same list.
"""

from __future__ import annotations

import torch

from actgrad.training.engine.layout import Layer, input_width, numel


def buffer_shapes(arch: tuple[Layer, ...], batch_size: int, block_size: int) -> list[tuple[str, tuple, bool]]:
    """(name, per-model shape, zero-filled) of every workspace tensor, in the order they are allocated."""
    B, emb = batch_size, arch[0]
    n_in, n_pad = block_size * emb.fan_out, input_width(arch, 1)
    shapes = [("embedding.rows", (B * block_size, emb.fan_out), False),  # looked-up rows, example by example
              ("embedding.grad_rows", (B, n_in), False)]
    if n_pad != n_in:  # the first Linear's input and its gradient, zero-padded
        shapes += [("embedding.padded", (B, n_pad), True), ("embedding.grad_padded", (B, n_pad), False)]
    for below, L in zip(arch, arch[1:]):
        if L.kind in ("linear", "batchnorm", "layernorm"):
            shapes.append((f"{L.name}.out", (L.fan_out, B), False))
        if L.kind == "batchnorm":  # 1 / spread', gamma / spread', and the backward's coefficient of x - mean
            shapes += [(f"{L.name}.{part}", (L.fan_out, 1), False) for part in ("inv", "scale", "xc_coef")]
        if L.kind == "layernorm":  # per example: the mean, 1 / sqrt(var + eps), and two means of the backward
            shapes += [(f"{L.name}.{part}", (1, B), False) for part in ("mean", "inv", "grad_mean", "grad_xhat_mean")]
        if L.kind == "act" and L.flavour == "gelu":  # GELU's backward needs its input: the output goes elsewhere
            shapes.append((f"{L.name}.out", (below.fan_out, B), False))
    # The backward buffers also hold the first Linear's input gradient, padded (wider than a narrow layer).
    widest = max([n_pad] + [max(L.fan_in, L.fan_out) for L in arch[1:] if L.kind == "linear"])
    shapes += [("backward.ping", (widest * B,), False), ("backward.pong", (widest * B,), False)]
    bn_features = sum(L.fan_out for L in arch if L.kind == "batchnorm")
    shapes.append(("batchnorm.running_update", (2 * bn_features,), False))
    V = arch[-1].fan_out
    shapes += [("loss.logp", (V, B), False), ("loss.picked", (1, B), False), ("loss.grad_logp", (V, B), True),
               ("loss.grad_logits", (V, B), False)]
    return shapes


def floats_per_model(arch: tuple[Layer, ...], batch_size: int, block_size: int) -> int:
    return sum(numel(shape) for _, shape, _ in buffer_shapes(arch, batch_size, block_size))


class Workspace:
    """The tensors of :func:`buffer_shapes` for M models, by name: ``ws["linear1.out"]`` is ``(M, fan_out, B)``."""

    def __init__(self, arch: tuple[Layer, ...], M: int, batch_size: int, block_size: int, device):
        self.M, self.device = M, device
        self.tensors = {name: (torch.zeros if zeroed else torch.empty)(M, *shape, device=device)
                        for name, shape, zeroed in buffer_shapes(arch, batch_size, block_size)}
        self._constants: dict[float, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def flat(self, name: str) -> torch.Tensor:
        return self.tensors[name].view(-1)

    def constant(self, value: float) -> torch.Tensor:
        """``value`` as a 0-dim float32 tensor: a Python float operand costs a conversion per call."""
        c = self._constants.get(value)
        if c is None:
            c = self._constants[value] = torch.tensor(value, dtype=torch.float32, device=self.device)
        return c
