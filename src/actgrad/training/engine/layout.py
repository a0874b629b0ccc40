"""What the engine needs to know about a network: its layers, and where each trained parameter lives.

The engine keeps every Linear weight transposed, ``(fan_out, fan_in)``, so that activations can
be feature-major ``(M, features, batch)``; and it zero-pads the first Linear's input, the
concatenated embeddings, to whole SIMD vectors (:func:`padded_width`). Both are decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actgrad.training.model import ACTIVATIONS, BatchNorm1d, Embedding, LayerNorm, Linear, Network

SIMD_FLOATS = 16  # the first Linear's input width is rounded up to a multiple of this


@dataclass(frozen=True)
class Layer:
    kind: str  # 'embedding' | 'linear' | 'batchnorm' | 'layernorm' | 'act'
    name: str
    fan_in: int = 0
    fan_out: int = 0
    bias: bool = False
    flavour: str = ""  # batchnorm: 'std' or 'var'; act: 'tanh', 'relu' or 'gelu'
    eps: float = 0.0
    momentum: float = 0.0
    param_shape: tuple = ()  # batchnorm, layernorm: shape of gamma/beta in the Network


def architecture(net: Network) -> tuple[Layer, ...]:
    """The layer sequence of ``net`` as the engine sees it; raises for what it cannot train."""
    layers = []
    for name, m in net.layers.items():
        if isinstance(m, Embedding):
            layers.append(Layer("embedding", name, fan_in=m.weight.shape[0], fan_out=m.weight.shape[1]))
        elif isinstance(m, Linear):
            layers.append(Layer("linear", name, fan_in=m.weight.shape[0], fan_out=m.weight.shape[1],
                                bias=m.bias is not None))
        elif isinstance(m, BatchNorm1d):
            layers.append(Layer("batchnorm", name, fan_in=m.gamma.shape[-1], fan_out=m.gamma.shape[-1],
                                flavour=m.normalize_by, eps=float(m.eps), momentum=float(m.momentum),
                                param_shape=tuple(m.gamma.shape)))
        elif isinstance(m, LayerNorm):
            layers.append(Layer("layernorm", name, fan_in=m.gamma.shape[-1], fan_out=m.gamma.shape[-1],
                                eps=float(m.eps), param_shape=tuple(m.gamma.shape)))
        elif type(m) in ACTIVATIONS.values():
            layers.append(Layer("act", name, flavour=m.kind))
        else:
            raise TypeError(f"the batched engine cannot train layer {name!r} of type {type(m).__name__}")
    if not layers or layers[0].kind != "embedding":
        raise TypeError("the batched engine expects the network to start with its embedding")
    if len(layers) < 2 or layers[1].kind != "linear":
        raise TypeError("the batched engine expects a Linear layer right after the embedding")
    if layers[-1].kind not in ("linear", "batchnorm", "layernorm"):
        raise TypeError("the batched engine expects the network to end in logits (Linear or a norm)")
    return tuple(layers)


def padded_width(width: int) -> int:
    """The first Linear's input width rounded up to whole SIMD vectors (30 -> 32): the matmuls that
    touch it run much faster on CPU, and the zero columns stay zero under training."""
    return -(-width // SIMD_FLOATS) * SIMD_FLOATS


def input_width(arch: tuple[Layer, ...], index: int) -> int:
    """The input width the engine gives layer ``index``: padded for the first Linear, as is elsewhere."""
    layer = arch[index]
    return padded_width(layer.fan_in) if index == 1 else layer.fan_in


@dataclass(frozen=True)
class ParamSlot:
    """One trained parameter: its Network name and shape, and its shape in the engine (per model)."""

    name: str
    net_shape: tuple
    shape: tuple
    transposed: bool  # a Linear weight, kept as (fan_out, padded fan_in)

    def to_engine(self, t: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return t.reshape(self.shape)
        out = t.new_zeros(self.shape)
        out[:, :t.shape[0]] = t.t()
        return out

    def to_net(self, v: torch.Tensor) -> torch.Tensor:
        """One model's engine tensor as the Network holds it (a view)."""
        return v[:, :self.net_shape[0]].t() if self.transposed else v.view(self.net_shape)


def param_slots(arch: tuple[Layer, ...]) -> list[ParamSlot]:
    """The trained parameters in the Network's order (``named_parameters``)."""
    slots = []
    for i, L in enumerate(arch):
        prefix = f"layers.{L.name}."
        if L.kind == "embedding":
            slots.append(ParamSlot(prefix + "weight", (L.fan_in, L.fan_out), (L.fan_in, L.fan_out), False))
        elif L.kind == "linear":
            slots.append(ParamSlot(prefix + "weight", (L.fan_in, L.fan_out), (L.fan_out, input_width(arch, i)), True))
            if L.bias:
                slots.append(ParamSlot(prefix + "bias", (L.fan_out,), (L.fan_out, 1), False))
        elif L.kind in ("batchnorm", "layernorm"):
            slots.append(ParamSlot(prefix + "gamma", L.param_shape, (L.fan_out, 1), False))
            slots.append(ParamSlot(prefix + "beta", L.param_shape, (L.fan_out, 1), False))
    return slots


def check_same(nets: list[Network], arch: tuple[Layer, ...]) -> None:
    """Raise unless every network has architecture ``arch`` and the parameters the engine expects."""
    names = [n for n, _ in nets[0].named_parameters()]
    for i, net in enumerate(nets):
        if architecture(net) != arch:
            raise ValueError(f"model {i} has a different architecture from model 0; batch only equal architectures")
        if [n for n, _ in net.named_parameters()] != names:
            raise ValueError(f"model {i}'s parameters differ from model 0's")
    expected = [s.name for s in param_slots(arch)]
    if names != expected:
        raise ValueError(f"unexpected parameters {names}, the engine knows {expected}")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
