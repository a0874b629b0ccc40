"""A fast training engine: many models of one architecture trained together, by hand.

The lecture's loop is bound by per-operation overhead: a 32-example minibatch through a
200-unit layer is a few microseconds of arithmetic and tens of microseconds of Python,
dispatch and autograd bookkeeping. :func:`train_batched` trains ``M`` models of the same
architecture (different seeds, init scales, gains, ...) as one batched model: every tensor
carries a leading model dimension, Linear layers are batched matmuls, activations are
feature-major ``(M, features, batch)``, the backward pass is written out by hand (no
autograd graph), and every intermediate tensor lives in a workspace allocated once.

Each model starts from its :class:`~actgrad.training.model.Network`'s parameters and draws its
minibatches from its own generator exactly as the lecture does, so its losses are the
reference loop's (:func:`actgrad.training.loop.train_reference`) up to float rounding. At the end
the trained parameters and BatchNorm running statistics are written back into each Network.

Reading order, top down:

* :mod:`.driver` — :func:`train_batched`: minibatches, groups of models taking turns,
  divergence checks (:mod:`actgrad.training.divergence`, shared with the reference loop), progress
  lines, the sensitivity twins' parameter distance;
* :mod:`.batch` — :class:`~.batch.BatchedModels`: one step, forward, loss, backward, update;
* :mod:`.build` — which op runs each layer, on the C kernels or on PyTorch, and which
  neighbours share a pass (decided there and nowhere else);
* :mod:`.ops` and :mod:`.kernel_ops` — each layer's forward and backward pass, one backend per class;
* :mod:`.tap` — the statistics recorders, fed on the steps they ask for;
* :mod:`.state` and :mod:`.workspace` — the flat buffers that persist between steps, and the
  tensors of one step; :mod:`.layout` — the layers and parameters as the engine lays them out.

Design notes and measurements (what was tried and not kept): ``docs/engine.md``.
"""

from actgrad.training.engine.driver import GROUP_FLOATS, INDEX_CHUNK, group_size, train_batched
from actgrad.training.engine.layout import architecture

__all__ = ["GROUP_FLOATS", "INDEX_CHUNK", "architecture", "group_size", "train_batched"]
