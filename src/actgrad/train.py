"""Training one run of a variant, as the lecture's loop does it, and evaluating it.

The loop is the lecture's, line for line: one generator draws the parameters, then every
minibatch's indices; forward, ``p.grad = None``, backward, ``p.data += -lr * p.grad``.
Statistics and anything else that watches the run are callbacks (see
:mod:`actgrad.stats`); the loop only tells them where it is.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import Network, Scratch, apply_in_chunks, build_network

# A tanh net's loss stays finite however badly it blows up (tanh bounds the activations), so a
# loss this large counts as diverged too: the right character's probability is below e^-10000.
DIVERGENCE_LOSS = 1e4


def diverged_steps(losses: torch.Tensor, limit: float = DIVERGENCE_LOSS) -> torch.Tensor:
    """Which of these losses mean the run has diverged: NaN, infinite, or above ``limit``."""
    return ~torch.isfinite(losses) | (losses > limit)


def learning_rate(schedule: list[dict], step: int) -> float:
    """The rate of the last schedule entry whose ``from_step`` has been reached."""
    lr = schedule[0]["lr"]
    for entry in schedule:
        if step >= entry["from_step"]:
            lr = entry["lr"]
    return lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but this machine has no CUDA GPU")
    return torch.device(name)


def init_network(spec: dict, seed: int, block_size: int, w1_perturbation: float = 0.0):
    """Draw the network from a fresh generator; the same generator then draws the minibatches.

    ``w1_perturbation`` scales the first Linear weight by ``1 + w1_perturbation`` after
    drawing: the sensitivity twin of a run.
    """
    g = torch.Generator().manual_seed(seed)
    net = build_network(spec, g, block_size)
    if w1_perturbation:
        with torch.no_grad():
            net.layers["linear1"].weight *= 1 + w1_perturbation
    return net, g


@dataclass
class TrainResult:
    losses: torch.Tensor  # every step's minibatch loss, float32
    steps_done: int
    diverged_at: int | None
    seconds: float
    extra: dict = field(default_factory=dict)


def train_reference(net: Network, g: torch.Generator, Xtr: torch.Tensor, Ytr: torch.Tensor, *, steps: int,
                    batch_size: int, lr_schedule: list[dict], callbacks=(), device=torch.device("cpu"),
                    divergence_check_every: int = 100, divergence_loss: float = DIVERGENCE_LOSS) -> TrainResult:
    """The lecture's training loop. Stops at the first diverged loss (checked every few steps)."""
    net.to(device)
    net.train()
    params = [p for _, p in net.trained_parameters()]
    Xtr_d, Ytr_d = Xtr.to(device), Ytr.to(device)
    losses = torch.full((steps,), float("nan"), dtype=torch.float32, device=device)
    diverged_at = None
    start = time.perf_counter()
    step = 0
    for step in range(steps):
        # Indices come from the CPU generator, as in the lecture, on every device.
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g).to(device)
        Xb, Yb = Xtr_d[ix], Ytr_d[ix]
        for cb in callbacks:
            cb.before_step(step)
        loss = F.cross_entropy(net(Xb), Yb)
        for p in params:
            p.grad = None
        loss.backward()
        lr = learning_rate(lr_schedule, step)
        for cb in callbacks:
            cb.after_backward(step, lr)
        for p in params:
            p.data += -lr * p.grad
        losses[step] = loss.detach()
        if (step + 1) % divergence_check_every == 0 or step == steps - 1:
            window = losses[max(0, step + 1 - divergence_check_every): step + 1]
            bad_steps = diverged_steps(window, divergence_loss)
            if bad_steps.any():
                bad = bad_steps.nonzero()[0].item()
                diverged_at = max(0, step + 1 - divergence_check_every) + bad
                break
    seconds = time.perf_counter() - start
    done = steps if diverged_at is None else diverged_at + 1
    return TrainResult(losses=losses[:done].cpu(), steps_done=done, diverged_at=diverged_at, seconds=seconds)


@contextmanager
def kept_running_stats(net: Network):
    """Whatever happens inside, the BatchNorm running statistics are as before afterwards."""
    saved = {n: (bn.running_mean.clone(), bn.running_spread.clone()) for n, bn in net.batchnorm_layers()}
    try:
        yield
    finally:
        for n, bn in net.batchnorm_layers():
            bn.running_mean, bn.running_spread = saved[n]


EVAL_CHUNK = 8192  # rows per forward pass: small enough to stay in cache, 5x faster than one pass


@torch.no_grad()
def evaluate(net: Network, X: torch.Tensor, Y: torch.Tensor, *, calibrate: bool = False,
             saturation: tuple[float, ...] = (), scratch: Scratch | None = None) -> tuple[float, dict[float, float]]:
    """Cross-entropy over a whole split in evaluation mode, and optionally tanh saturation.

    With ``calibrate`` every BatchNorm first takes the statistics of ``X`` as its running
    statistics (the lecture's calibration pass over the training split) and keeps them;
    that needs the whole split at once. Otherwise the logits are computed in chunks and
    joined, which gives the same logits as one pass. ``saturation`` lists thresholds: the
    share (in %) of all activation values, every layer together, with |t| above each.
    Pass one ``scratch`` to a series of evaluations to spare each its own large tensors.
    """
    above = {t: 0 for t in saturation}
    total = [0]

    def count(module, inputs, output):
        total[0] += output.numel()
        magnitude = output.abs()
        flags = torch.empty_like(magnitude)
        for t in saturation:
            above[t] += _count_above(magnitude, t, flags)

    handles = [layer.register_forward_hook(count) for _, layer in net.activation_layers()] if saturation else []
    was_training = net.training
    scratch = scratch if scratch is not None else Scratch()
    try:
        net.eval()
        if calibrate:
            logits = net.calibrate_batchnorm(X, chunk=EVAL_CHUNK, scratch=scratch)
        else:
            logits = apply_in_chunks(list(net.layers.values()), X, EVAL_CHUNK, scratch)
        loss = F.cross_entropy(logits, Y).item()
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return loss, ({t: 100.0 * n / total[0] for t, n in above.items()} if total[0] else {})


def _count_above(x: torch.Tensor, threshold: float, flags: torch.Tensor) -> int:
    """How many values of ``x`` are above ``threshold`` (NaN is not), with ``flags`` (like ``x``) as room.

    The same comparison as ``x > threshold``, but into a float 0/1 mask, which PyTorch
    vectorises and a bool mask it does not: 4x faster. Summing the mask in its own dtype
    is exact while every partial sum is a whole number that the dtype holds exactly.
    """
    torch.gt(x, threshold, out=flags)
    exact = flags.numel() <= 2 / torch.finfo(flags.dtype).eps  # 2**24 in float32
    return int(flags.sum()) if exact else int(torch.count_nonzero(flags))


@torch.no_grad()
def sample_names(net: Network, itos: dict[int, str], block_size: int, n: int, seed: int,
                 max_length: int = 50) -> list[str]:
    """The lecture's sampler: a generator seeded ``seed + 10``, one character at a time until '.'."""
    g = torch.Generator().manual_seed(seed + 10)
    net.eval()
    device = next(net.parameters()).device
    names = []
    for _ in range(n):
        out, context = [], [0] * block_size
        while len(out) < max_length:
            logits = net(torch.tensor([context], device=device))
            probs = F.softmax(logits, dim=1).cpu()
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append("".join(itos[i] for i in out))
    net.train()
    return names
