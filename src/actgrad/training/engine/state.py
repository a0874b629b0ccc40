"""The state of the models trained together: parameters, gradients and BatchNorm statistics in flat buffers.

One flat buffer per kind makes the SGD update and the running-statistics update one operation
each for every model and layer. The parameters hold the small ones (embedding, biases,
BatchNorm) first and the Linear weights last: on most steps each weight is updated inside its
gradient matmul, and the small ones with one ``add_`` over the buffer's head.
"""

from __future__ import annotations

import torch

from actgrad.training.engine.layout import Layer, ParamSlot, numel, param_slots
from actgrad.training.model import Network


class FlatBuffers:
    """Per-model tensors laid out block by block in one flat buffer: block ``j`` is ``(M, *shapes[j])``."""

    def __init__(self, shapes: list[tuple], M: int, device, flat: torch.Tensor | None = None):
        self.shapes, self.M = shapes, M
        sizes = [M * numel(s) for s in shapes]
        self.flat = torch.empty(sum(sizes), device=device) if flat is None else flat
        self.views = []
        offset = 0
        for s, n in zip(shapes, sizes):
            self.views.append(self.flat[offset:offset + n].view(M, *s))
            offset += n

    def select(self, keep: torch.Tensor) -> FlatBuffers:
        """The same buffers for the models ``keep`` only."""
        M = int(keep.numel())
        if not self.shapes:
            return FlatBuffers(self.shapes, M, self.flat.device)
        return FlatBuffers(self.shapes, M, self.flat.device, torch.cat([v[keep].reshape(-1) for v in self.views]))

    def model(self, i: int) -> torch.Tensor:
        """Model i's blocks, concatenated into one new tensor."""
        return torch.cat([v[i].reshape(-1) for v in self.views])


class ModelState:
    """Everything that persists from one step to the next, for M models of one architecture.

    BatchNorm statistics (running, and of the last batch) for K layers: block k is the k-th
    layer's mean, block K + k its std or variance. Means first, then spreads, so that each
    half is finished and each running update is done by one operation for every layer.
    """

    def __init__(self, nets: list[Network], arch: tuple[Layer, ...], device):
        self.device, self.M = device, len(nets)
        slots = param_slots(arch)
        self.slots: list[ParamSlot] = [s for s in slots if not s.transposed] + [s for s in slots if s.transposed]
        self.named_order = [self.slots.index(s) for s in slots]  # buffer blocks in named_parameters() order
        self.n_small = sum(numel(s.shape) for s in self.slots if not s.transposed)  # per model
        self.bn_layers = [L for L in arch if L.kind == "batchnorm"]
        M = self.M
        self.params = FlatBuffers([s.shape for s in self.slots], M, device)
        self.grads = FlatBuffers([s.shape for s in self.slots], M, device)
        self.running = FlatBuffers(self.bn_shapes(), M, device)
        self.batch_stats = FlatBuffers(self.bn_shapes(), M, device)
        with torch.no_grad():
            for j, s in enumerate(self.slots):
                self.params.views[j].copy_(torch.stack(
                    [s.to_engine(dict(net.named_parameters())[s.name].detach()).to(device) for net in nets]))
            for k, L in enumerate(self.bn_layers):
                mods = [net.layers[L.name] for net in nets]
                self.running_mean(k).copy_(torch.stack(
                    [m.running_mean.detach().reshape(L.fan_out, 1).to(device) for m in mods]))
                self.running_spread(k).copy_(torch.stack(
                    [m.running_spread.detach().reshape(L.fan_out, 1).to(device) for m in mods]))
        self._view_cache: dict[int, tuple] = {}

    def bn_shapes(self) -> list[tuple]:
        return [(L.fan_out, 1) for L in self.bn_layers] * 2

    @staticmethod
    def floats_per_model(arch: tuple[Layer, ...]) -> int:
        """Parameters and gradients, running and batch statistics (and the running update's temporary)."""
        params = sum(numel(s.shape) for s in param_slots(arch))
        bn = sum(2 * L.fan_out for L in arch if L.kind == "batchnorm")
        return 2 * params + 3 * bn

    # -- per layer and per model ---------------------------------------------------------
    def slot(self, name: str) -> int:
        return next(j for j, s in enumerate(self.slots) if s.name == name)

    def running_mean(self, k: int) -> torch.Tensor:
        return self.running.views[k]

    def running_spread(self, k: int) -> torch.Tensor:
        return self.running.views[len(self.bn_layers) + k]

    def batch_mean(self, k: int) -> torch.Tensor:
        return self.batch_stats.views[k]

    def batch_spread(self, k: int) -> torch.Tensor:
        return self.batch_stats.views[len(self.bn_layers) + k]

    def small_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head of the parameter and gradient buffers: everything but the Linear weights."""
        n = self.M * self.n_small
        return self.params.flat[:n], self.grads.flat[:n]

    def model_views(self, i: int):
        """Model i's (name, parameter, gradient) in named_parameters() order, and its BatchNorm statistics
        (name, batch mean, batch spread, running mean, running spread), all as the Network lays them out."""
        views = self._view_cache.get(i)
        if views is None:
            params = [(self.slots[j].name, self.slots[j].to_net(self.params.views[j][i]),
                       self.slots[j].to_net(self.grads.views[j][i])) for j in self.named_order]
            bns = [(L.name, self.batch_mean(k)[i].view(-1), self.batch_spread(k)[i].view(-1),
                    self.running_mean(k)[i].view(-1), self.running_spread(k)[i].view(-1))
                   for k, L in enumerate(self.bn_layers)]
            views = self._view_cache[i] = (params, bns)
        return views

    # -- models leaving, and the end of training -------------------------------------------
    def select(self, keep: torch.Tensor) -> None:
        """Carry on with the models at positions ``keep`` only."""
        self.params = self.params.select(keep)
        self.grads = FlatBuffers(self.grads.shapes, int(keep.numel()), self.device)
        self.running = self.running.select(keep)
        self.batch_stats = self.batch_stats.select(keep)
        self.M = int(keep.numel())
        self._view_cache = {}

    @torch.no_grad()
    def write_back(self, net: Network, i: int) -> None:
        """Model i's parameters and BatchNorm statistics into ``net``."""
        params = dict(net.named_parameters())
        for j, s in enumerate(self.slots):
            params[s.name].copy_(s.to_net(self.params.views[j][i]))
        for k, L in enumerate(self.bn_layers):
            bn = net.layers[L.name]
            bn.running_mean = self.running_mean(k)[i].reshape(bn.running_mean.shape).clone().to(
                bn.running_mean.device)
            bn.running_spread = self.running_spread(k)[i].reshape(bn.running_spread.shape).clone().to(
                bn.running_spread.device)
            bn.last_batch_mean = self.batch_mean(k)[i].reshape(1, -1).clone()
            bn.last_batch_spread = self.batch_spread(k)[i].reshape(1, -1).clone()
