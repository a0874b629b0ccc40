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

from actgrad.results.vocabulary import DEAD, SATURATION
from actgrad.training.model import BatchNorm1d, Network, Scratch, apply_in_chunks


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


# The shares evaluate() can count (actgrad.training.stats.activation_shares names them per activation):
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
    in_c = _counter_in_c(tests)

    def count(module, inputs, output):
        total[0] += output.numel()
        if in_c is not None and output.dtype == torch.float32 and output.is_contiguous() and not output.is_cuda:
            for (key, *_), n in zip(tests, in_c(output)):
                counted[key] += n
            return
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


def _counter_in_c(tests):
    """A function that counts ``tests`` on a CPU float32 tensor with the C kernel (the same counts in one read per
    test), or None where the kernels are not built."""
    from actgrad.training import kernels

    modes = {("abs", torch.gt): 1, ("t", torch.le): 0}
    lib = kernels.load() if tests and all((on, compare) in modes for _, on, compare, _ in tests) else None
    if lib is None:
        return None
    thresholds = torch.tensor([float(t) for *_, t in tests], dtype=torch.float32)
    on_abs = torch.tensor([modes[(on, compare)] for _, on, compare, _ in tests], dtype=torch.int64)
    counts = torch.zeros(len(tests), dtype=torch.int64)

    def counter(x: torch.Tensor) -> list[int]:
        lib.count_values(x.data_ptr(), x.numel(), thresholds.data_ptr(), on_abs.data_ptr(), len(tests),
                         counts.data_ptr())
        return counts.tolist()

    return counter


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


# The fixed order of the split that batch_statistics_loss cuts into minibatches.
BATCH_STATS_ORDER_SEED = 0


@torch.no_grad()
@torch.no_grad()
def batch_statistics_loss(net: Network, X: torch.Tensor, Y: torch.Tensor, batch_size: int) -> float:
    """Cross-entropy over a split in minibatches of ``batch_size``, every BatchNorm normalising each minibatch by
    that minibatch's own statistics (as in training), the running statistics left alone.

    The split is taken in one fixed random order (consecutive examples are contexts of the same name, which a
    training minibatch never is), so its minibatches are drawn like the training ones; a last, shorter
    minibatch counts if it has 2 examples or more (one example has no batch spread).

    Without autograd (it used to record the graph: the same numbers bit for bit, but on the validation split of a
    96-layer BatchNorm net 4.6 s instead of 2.8 s).
    """
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(BATCH_STATS_ORDER_SEED)).to(X.device)
    whole = len(X) // batch_size * batch_size
    pieces = [(order[:whole], batch_size)]
    if len(X) - whole >= 2:
        pieces.append((order[whole:], len(X) - whole))
    total = sum(F.cross_entropy(_per_minibatch_forward(net, X[ix], size), Y[ix], reduction="sum").item()
                for ix, size in pieces if len(ix))
    return total / sum(len(ix) for ix, _ in pieces)


def _per_minibatch_forward(net: Network, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The logits of ``x`` taken as consecutive minibatches of ``batch_size``, each BatchNorm using the statistics
    of each minibatch: all minibatches in one pass (one Python call per layer, not per minibatch and layer)."""
    for layer in net.layers.values():
        if isinstance(layer, BatchNorm1d):
            groups = x.view(-1, batch_size, x.shape[-1])
            x = layer.normalize(groups, groups.mean(1, keepdim=True), layer.batch_spread(groups, dim=1)).view(x.shape)
        else:
            x = layer(x)  # every other layer treats each example on its own
    return x


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
