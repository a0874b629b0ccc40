"""What a user would otherwise write to train several seeds of one network together: the benchmark's peers.

* ``torch.func`` — PyTorch's model-ensembling recipe: the models' parameters stacked
  (``torch.func.stack_module_state``), ``vmap`` over ``grad`` of a functional loss, and a plain
  SGD update on the stacked parameters (in place, as ``torch.optim.SGD(foreach=True)`` does it);
* ``torch.func + compile`` — the same step under ``torch.compile`` (compiled once per network
  and model count; the compile time is reported apart);
* ``JAX`` — ``vmap`` over the models and the whole training loop one ``lax.scan`` under ``jit``,
  with the parameters' buffers donated: no Python per step (optional: ``pip install "jax[cpu]"``).

Each computes what :func:`actgrad.training.engine.train_batched` computes: the same networks from the same
initial parameters (taken from the engine's own :class:`~actgrad.training.model.Network` objects), the
minibatch indices drawn from each model's generator as the lecture draws them, the lecture's
BatchNorm (batch statistics in training, running statistics updated), mean cross-entropy and
plain SGD. The recipe's ``functional_call`` cannot be used on the project's Network as it is,
because its BatchNorm assigns its running statistics as attributes, which a call under ``vmap``
cannot hand back; the loss is therefore the Network's forward pass written as a pure function
of the same parameter and buffer dictionaries (same names, same operations), returning the
updated running statistics beside the loss.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, stack_module_state, vmap

from actgrad.training.loop import learning_rate
from actgrad.training.model import BatchNorm1d, Embedding, Linear, Network, ReLU, Tanh

PEERS = ("torch.func", "torch.func + compile", "JAX")
JAX_INSTALL = 'pip install "jax[cpu]"  (or: pip install -e ".[bench-jax]")'
# One thread for XLA's CPU backend, as torch runs here with --threads 1; set before jax is first imported.
JAX_ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclass
class PeerRun:
    """A peer's run: per-step losses (steps, M), the final stacked parameters and buffers (torch, CPU),
    the seconds of the steady-state steps by the clock given (``timed_steps`` of them) and of compiling."""

    losses: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    seconds: float
    timed_steps: int
    compile_seconds: float = 0.0
    cpu_seconds: float = 0.0  # of the same steps: process CPU time and wall time, whatever ``seconds`` is
    wall_seconds: float = 0.0


class Stopwatch:
    """Elapsed time since start by a given clock, by process CPU time and by wall time."""

    def __init__(self, clock):
        self.clock = clock
        self.start()

    def start(self) -> None:
        self.t0, self.c0, self.w0 = self.clock(), time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float, float]:
        return self.clock() - self.t0, time.process_time() - self.c0, time.perf_counter() - self.w0


def layer_plan(net: Network) -> tuple:
    """The network's layers as (kind, parameter-name prefix, settings) tuples: hashable, so a compiled step
    can be cached per network."""
    plan = []
    for name, layer in net.layers.items():
        prefix = f"layers.{name}."
        if isinstance(layer, Embedding):
            plan.append(("embedding", prefix, ()))
        elif isinstance(layer, Linear):
            plan.append(("linear", prefix, (layer.bias is not None,)))
        elif isinstance(layer, BatchNorm1d):
            plan.append(("batchnorm", prefix, (layer.normalize_by, layer.eps, layer.momentum)))
        elif isinstance(layer, (Tanh, ReLU)):
            plan.append(("tanh" if isinstance(layer, Tanh) else "relu", prefix, ()))
        else:
            raise ValueError(f"peers: no functional form for layer {name!r} ({type(layer).__name__})")
    return tuple(plan)


def draw_indices(gens: list[torch.Generator], n_train: int, steps: int, batch_size: int) -> torch.Tensor:
    """(steps, M, batch) minibatch indices, each model's from its generator as the lecture draws them."""
    return torch.stack([torch.randint(0, n_train, (steps, batch_size), generator=g) for g in gens], dim=1)


# --------------------------------------------------------------------------------------------- torch.func


def _ensemble_loss(ops, plan, params, buffers, x, y):
    """One model's mean cross-entropy on one minibatch, and its updated BatchNorm running statistics, with the
    array operations of ``ops`` (:class:`_TorchOps` or :class:`_JaxOps`): the same step for either peer."""
    new_buffers = {}
    h = None
    for kind, p, settings in plan:
        if kind == "embedding":
            h = params[p + "weight"][x].reshape(x.shape[0], -1)
        elif kind == "linear":
            h = h @ params[p + "weight"]
            if settings[0]:
                h = h + params[p + "bias"]
        elif kind == "batchnorm":
            normalize_by, eps, m = settings
            mean = ops.mean(h)
            if normalize_by == "std":
                spread = ops.std(h)
                h = params[p + "gamma"] * (h - mean) / spread + params[p + "beta"]
            else:
                spread = ops.var(h)
                h = params[p + "gamma"] * ((h - mean) / ops.sqrt(spread + eps)) + params[p + "beta"]
            running_mean, running_spread = buffers[p + "running_mean"], buffers[p + "running_spread"]
            mean, spread = ops.stop_gradient(mean), ops.stop_gradient(spread)
            new_buffers[p + "running_mean"] = (1 - m) * running_mean + m * mean.reshape(running_mean.shape)
            new_buffers[p + "running_spread"] = (1 - m) * running_spread + m * spread.reshape(running_spread.shape)
        elif kind == "tanh":
            h = ops.tanh(h)
        else:
            h = ops.relu(h)
    return ops.cross_entropy(h, y), new_buffers


class _TorchOps:
    """The batch statistics over dim 0 as BatchNorm1d takes them (unbiased), and the rest, in PyTorch."""

    mean = staticmethod(lambda h: h.mean(0, keepdim=True))
    std = staticmethod(lambda h: h.std(0, keepdim=True))
    var = staticmethod(lambda h: h.var(0, keepdim=True))
    sqrt, tanh, relu = torch.sqrt, torch.tanh, torch.relu
    stop_gradient = staticmethod(torch.Tensor.detach)
    cross_entropy = staticmethod(F.cross_entropy)


@functools.cache
def _torch_step(plan: tuple, compiled: bool):
    """The ensemble's step: per-model gradients by vmap(grad), then SGD on the stacked parameters."""
    per_model = vmap(grad_and_value(functools.partial(_ensemble_loss, _TorchOps, plan), has_aux=True))

    def step(params, buffers, Xtr, Ytr, ix, lr):
        grads, (loss, new_buffers) = per_model(params, buffers, Xtr[ix], Ytr[ix])
        names = list(params)
        if compiled:  # inductor fuses each update into one kernel; returning new tensors is its natural form
            params = {k: params[k] - lr * grads[k] for k in names}
        else:
            torch._foreach_add_([params[k] for k in names], [grads[k] for k in names], alpha=-lr)
        return params, {**buffers, **new_buffers}, loss

    if not compiled:
        return step
    # Every network and model count is its own specialised graph of this one function: allow more than
    # dynamo's default 8 before it would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(step, dynamic=False)


_COMPILED_SHAPES: set = set()  # (plan, models, batch) a compiled step has already been compiled for


def train_torch_func(nets: list[Network], gens: list[torch.Generator], Xtr, Ytr, *, steps: int, batch_size: int,
                     lr_schedule: list[dict], compiled: bool = False, clock=time.process_time) -> PeerRun:
    """Train copies of ``nets`` (one architecture) together by the torch.func recipe; the nets are not changed.

    Under ``compile``, the first step for a new network or model count compiles: its wall time is
    ``compile_seconds`` and it is left out of ``seconds``.
    """
    plan = layer_plan(nets[0])
    with torch.no_grad():
        params, buffers = stack_module_state(nets)
    params = {k: v.detach().clone() for k, v in params.items()}
    buffers = {k: v.clone() for k, v in buffers.items()}
    step = _torch_step(plan, compiled)
    key = (plan, len(nets), batch_size)
    first = 0
    compile_seconds = 0.0
    losses = []
    watch = Stopwatch(clock)
    ix = draw_indices(gens, Xtr.shape[0], steps, batch_size)
    if compiled and key not in _COMPILED_SHAPES and steps > 0:
        params, buffers, loss = step(params, buffers, Xtr, Ytr, ix[0], learning_rate(lr_schedule, 0))
        losses.append(loss)
        # wall time: inductor compiles in worker processes, which this process's CPU time does not see
        compile_seconds, first = watch.read()[2], 1
        _COMPILED_SHAPES.add(key)
        watch.start()
    for i in range(first, steps):
        params, buffers, loss = step(params, buffers, Xtr, Ytr, ix[i], learning_rate(lr_schedule, i))
        losses.append(loss)
    losses = torch.stack(losses) if losses else torch.empty(0, len(nets))
    seconds, cpu, wall = watch.read()
    return PeerRun(losses.detach(), {k: v.detach() for k, v in params.items()}, buffers, seconds, steps - first,
                   compile_seconds, cpu, wall)


# -------------------------------------------------------------------------------------------------- JAX


def jax_missing() -> str | None:
    """None where jax imports, else one line saying how to install it."""
    try:
        import_jax()
    except ImportError:
        return f"JAX rows skipped: jax is not installed ({JAX_INSTALL})"
    return None


def import_jax():
    """jax, on one CPU thread unless XLA_FLAGS was set by the user (the flags only act before the first import)."""
    os.environ.setdefault("XLA_FLAGS", JAX_ONE_THREAD_FLAGS)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    return jax


class _JaxOps:
    """:class:`_TorchOps` in jax.numpy (std and var unbiased, ddof=1, as PyTorch's)."""

    @staticmethod
    def mean(h):
        return h.mean(0, keepdims=True)

    @staticmethod
    def std(h):
        return h.std(0, ddof=1, keepdims=True)

    @staticmethod
    def var(h):
        return h.var(0, ddof=1, keepdims=True)

    @staticmethod
    def sqrt(h):
        return import_jax().numpy.sqrt(h)

    @staticmethod
    def tanh(h):
        return import_jax().numpy.tanh(h)

    @staticmethod
    def relu(h):
        return import_jax().nn.relu(h)

    @staticmethod
    def stop_gradient(h):
        return import_jax().lax.stop_gradient(h)

    @staticmethod
    def cross_entropy(logits, y):
        jax = import_jax()
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jax.numpy.take_along_axis(log_probs, y[:, None], axis=1).mean()


@functools.cache
def _jax_train(plan: tuple):
    """The whole loop as one jitted function: lax.scan over steps of vmap(value_and_grad) and SGD."""
    jax = import_jax()

    per_model = jax.vmap(jax.value_and_grad(functools.partial(_ensemble_loss, _JaxOps, plan), has_aux=True))

    def train(params, buffers, Xtr, Ytr, ix, lrs):
        def step(carry, inputs):
            params, buffers = carry
            ix_step, lr = inputs
            (loss, new_buffers), grads = per_model(params, buffers, Xtr[ix_step], Ytr[ix_step])
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            return (params, {**buffers, **new_buffers}), loss

        (params, buffers), losses = jax.lax.scan(step, (params, buffers), (ix, lrs))
        return params, buffers, losses

    return jax.jit(train, donate_argnums=(0, 1))


_JAX_COMPILED: dict = {}  # (plan, models, steps, batch, training split's shape) -> the compiled loop


def train_jax(nets: list[Network], gens: list[torch.Generator], Xtr, Ytr, *, steps: int, batch_size: int,
              lr_schedule: list[dict], clock=time.process_time) -> PeerRun:
    """Train copies of ``nets`` together in JAX; compiling, ahead of the run and once per shape, is
    ``compile_seconds`` (wall time)."""
    jax = import_jax()
    import jax.numpy as jnp

    plan = layer_plan(nets[0])
    with torch.no_grad():
        params, buffers = stack_module_state(nets)
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in params.items()}
    buffers = {k: jnp.asarray(v.numpy()) for k, v in buffers.items()}
    Xtr_j, Ytr_j = jnp.asarray(Xtr.numpy().astype(np.int32)), jnp.asarray(Ytr.numpy().astype(np.int32))
    lrs = jnp.asarray(np.array([learning_rate(lr_schedule, i) for i in range(steps)], dtype=np.float32))
    key = (plan, len(nets), steps, batch_size, tuple(Xtr.shape))
    compile_seconds = 0.0
    if key not in _JAX_COMPILED:
        c0 = time.perf_counter()
        ix_shape = jax.ShapeDtypeStruct((steps, len(nets), batch_size), jnp.int32)
        _JAX_COMPILED[key] = _jax_train(plan).lower(params, buffers, Xtr_j, Ytr_j, ix_shape, lrs).compile()
        compile_seconds = time.perf_counter() - c0
    compiled = _JAX_COMPILED[key]
    watch = Stopwatch(clock)
    ix = jnp.asarray(draw_indices(gens, Xtr.shape[0], steps, batch_size).numpy().astype(np.int32))
    params, buffers, losses = compiled(params, buffers, Xtr_j, Ytr_j, ix, lrs)
    losses.block_until_ready()
    seconds, cpu, wall = watch.read()

    def to_torch(tree):
        return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in tree.items()}

    return PeerRun(torch.from_numpy(np.asarray(losses).copy()), to_torch(params), to_torch(buffers), seconds,
                   steps, compile_seconds, cpu, wall)


def train_peer(peer: str, nets, gens, Xtr, Ytr, *, steps: int, batch_size: int, lr_schedule: list[dict],
               clock=time.process_time) -> PeerRun:
    """Train copies of ``nets`` with one of :data:`PEERS`."""
    kwargs = dict(steps=steps, batch_size=batch_size, lr_schedule=lr_schedule, clock=clock)
    if peer == "torch.func":
        return train_torch_func(nets, gens, Xtr, Ytr, compiled=False, **kwargs)
    if peer == "torch.func + compile":
        return train_torch_func(nets, gens, Xtr, Ytr, compiled=True, **kwargs)
    if peer == "JAX":
        return train_jax(nets, gens, Xtr, Ytr, **kwargs)
    raise ValueError(f"unknown peer {peer!r}; choose from {list(PEERS)}")
