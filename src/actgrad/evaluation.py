"""A trained (or freshly drawn) network, evaluated on a whole split, and names sampled from it.

:func:`evaluate` runs a split through the net in cache-sized chunks and counts the activation
shares the statistics name (saturation for tanh, at-or-below-zero for ReLU and GELU); a
BatchNorm net is evaluated with its running statistics, or calibrated on the split first as
the lecture does. :func:`sample_names` draws names the way the lecture's sampling loop does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .model import Network, Scratch, apply_in_chunks
from .stats import DEAD, SATURATION


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


# The shares evaluate() can count (actgrad.stats.activation_shares names them per activation):
# (on |t| or t, compared above or at-or-below, threshold).
SHARES = {"sat97": ("abs", torch.gt, SATURATION), "sat99": ("abs", torch.gt, DEAD), "nonpositive": ("t", torch.le, 0.0)}


@torch.no_grad()
def evaluate(net: Network, X: torch.Tensor, Y: torch.Tensor, *, calibrate: bool = False,
             saturation: tuple[float, ...] = (), shares: tuple[str, ...] = (),
             scratch: Scratch | None = None) -> tuple[float, dict]:
    """Cross-entropy over a whole split in evaluation mode, and optionally shares of the activation values.

    With ``calibrate`` every BatchNorm first takes the statistics of ``X`` as its running
    statistics (the lecture's calibration pass over the training split) and keeps them;
    that needs the whole split at once. Otherwise the logits are computed in chunks and
    joined, which gives the same logits as one pass. ``saturation`` lists thresholds: the
    share (in %) of all activation values, every layer together, with |t| above each, keyed
    by threshold. ``shares`` names shares of :data:`SHARES` (``stats.activation_shares(activation)``
    gives the ones that fit a net), keyed by name, in % of all activation values.
    Pass one ``scratch`` to a series of evaluations to spare each its own large tensors.
    """
    unknown = set(shares) - set(SHARES)
    if unknown:
        raise ValueError(f"shares: {sorted(unknown)} unknown; known are {sorted(SHARES)}")
    tests = [(t, "abs", torch.gt, t) for t in saturation] + [(name, *SHARES[name]) for name in shares]
    counted = {key: 0 for key, *_ in tests}
    total = [0]

    def count(module, inputs, output):
        total[0] += output.numel()
        magnitude = output.abs() if any(on == "abs" for _, on, _, _ in tests) else None
        flags = torch.empty_like(output)
        for key, on, compare, threshold in tests:
            counted[key] += _count(magnitude if on == "abs" else output, compare, threshold, flags)

    handles = [layer.register_forward_hook(count) for _, layer in net.activation_layers()] if tests else []
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
    return loss, ({key: 100.0 * n / total[0] for key, n in counted.items()} if total[0] else {})


def _count(x: torch.Tensor, compare, threshold: float, flags: torch.Tensor) -> int:
    """How many values of ``x`` pass ``compare(x, threshold)`` (``torch.gt``, ``torch.le``; NaN passes neither),
    with ``flags`` (like ``x``) as room.

    The same comparison as ``x > threshold``, but into a float 0/1 mask, which PyTorch
    vectorises and a bool mask it does not: 4x faster. Summing the mask in its own dtype
    is exact while every partial sum is a whole number that the dtype holds exactly.
    """
    compare(x, threshold, out=flags)
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
