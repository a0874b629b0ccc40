"""The lecture's two networks, built from a variant's settings.

Both are drawn from one ``torch.Generator`` in exactly the lecture's order, so that a
run with the lecture's seed starts from the lecture's parameters bit for bit:

* ``mlp``  — part 1 of the lecture: embedding C, one hidden layer (W1, b1), tanh,
  output layer (W2, b2), and optionally the lecture's hand-written BatchNorm
  (batch *std*, no eps, running statistics with momentum 0.001).
* ``deep`` — part 2: embedding C, ``n_layers`` blocks ``Linear → [BatchNorm1d] → Tanh``
  and ``Linear → [BatchNorm1d]`` on top, with ``torch.nn``-like BatchNorm1d
  (batch *variance* + eps, momentum 0.1).

Beyond the lecture, a variant may put a LayerNorm where the BatchNorm would be (``norm``),
use ReLU or GELU instead of tanh, and draw its weight matrices orthogonal (``init.W1`` /
``init.W2: orthogonal`` for the mlp, ``weight_init: orthogonal`` for the deep net): the same
draws from the generator, turned orthogonal, so every later draw is where it was.

The layers are ``nn.Module`` subclasses only so that statistics can be collected with
ordinary forward hooks; the arithmetic is the lecture's, operation for operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 27


class Embedding(nn.Module):
    """Look up the context characters and concatenate their vectors (``emb.view(B, -1)``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        emb = self.weight[x]
        return emb.view(emb.shape[0], -1)


class Linear(nn.Module):
    """``x @ W (+ b)``; the bias may exist without being added (the lecture notes' ``#+ b1``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, add_bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight)
        # A bias that is drawn but never added is kept as a plain tensor: it is in the
        # random stream and in the saved state, but it is not a trained parameter.
        if bias is not None and add_bias:
            self.bias = nn.Parameter(bias)
        else:
            self.bias = None
            if bias is not None:
                self.register_buffer("unused_bias", bias)

    def forward(self, x):
        out = x @ self.weight
        if self.bias is not None:
            # In place: the same addition, without a second output-sized allocation
            # (the product is ours, and its backward does not need it).
            out += self.bias
        return out


class BatchNorm1d(nn.Module):
    """Batch normalisation as the lecture writes it, in two flavours.

    ``normalize_by="std"`` is part 1's hand-written layer: ``(x - mean) / std`` with the
    unbiased batch std, no eps, and a running *std*. ``normalize_by="var"`` is part 2's
    ``BatchNorm1d``: ``(x - mean) / sqrt(var + eps)`` with a running *variance*.
    Running statistics are updated as ``(1 - momentum) * running + momentum * batch``.
    """

    def __init__(self, dim: int, momentum: float, eps: float = 0.0, normalize_by: str = "var",
                 keepdim_params: bool = False):
        super().__init__()
        if normalize_by not in ("std", "var"):
            raise ValueError(f"normalize_by must be 'std' or 'var', not {normalize_by!r}")
        shape = (1, dim) if keepdim_params else (dim,)
        self.normalize_by = normalize_by
        self.momentum = momentum
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_spread", torch.ones(shape))  # std or var, by flavour
        # Set by the last training-mode forward, for the statistics collectors.
        self.last_batch_mean: torch.Tensor | None = None
        self.last_batch_spread: torch.Tensor | None = None

    def forward(self, x):
        if self.training:
            mean = x.mean(0, keepdim=True)
            spread = self.batch_spread(x)
        else:
            mean, spread = self.running_mean, self.running_spread
            if not torch.is_grad_enabled():
                return self._normalize_in_place(x, mean, spread)
        out = self.normalize(x, mean, spread)
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.running_mean = (1 - m) * self.running_mean + m * mean.view(self.running_mean.shape)
                self.running_spread = (1 - m) * self.running_spread + m * spread.view(self.running_spread.shape)
                self.last_batch_mean = mean.detach()
                self.last_batch_spread = spread.detach()
        return out

    def normalize(self, x, mean, spread):
        """``x`` normalised by the given statistics, scaled and shifted: the flavour's formula."""
        if self.normalize_by == "std":
            return self.gamma * (x - mean) / spread + self.beta
        return self.gamma * ((x - mean) / torch.sqrt(spread + self.eps)) + self.beta

    def batch_spread(self, x, dim: int = 0):
        """The flavour's spread of ``x`` over ``dim``, as training mode takes it (unbiased std or variance)."""
        if dim == x.dim() - 2 and not torch.is_grad_enabled():
            return column_spread(x, take_sqrt=self.normalize_by == "std").unsqueeze(dim)
        return x.std(dim, keepdim=True) if self.normalize_by == "std" else x.var(dim, keepdim=True)

    def _normalize_in_place(self, x, mean, spread):
        # The formula above, operation for operation, in place on one temporary. Without
        # autograd nothing needs the intermediates, and on the cache-sized chunks of a
        # whole-split evaluation their three allocations took as long as the arithmetic.
        # The C kernel does the same four operations in one pass.
        from actgrad.training import kernels

        lib = kernels.load() if _plain_cpu(x) and x.dim() == 2 else None
        if lib is not None:
            div = spread if self.normalize_by == "std" else torch.sqrt(spread + self.eps)
            params = [t.detach().reshape(-1).contiguous() for t in (mean, div, self.gamma, self.beta)]
            if all(_plain_cpu(t) and t.numel() == x.shape[1] for t in params):
                x = x.contiguous()
                out = torch.empty_like(x)
                lib.bn_eval(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                            *(t.data_ptr() for t in params), int(self.normalize_by == "std"))
                return out
        out = x - mean
        if self.normalize_by == "std":
            return out.mul_(self.gamma).div_(spread).add_(self.beta)
        return out.div_(torch.sqrt(spread + self.eps)).mul_(self.gamma).add_(self.beta)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the running statistics to those of ``x`` (the lecture's pass over the whole training split)."""
        self.running_mean = x.mean(0, keepdim=True).view(self.running_mean.shape)
        self.running_spread = self.batch_spread(x).view(self.running_spread.shape)


def _plain_cpu(t: torch.Tensor) -> bool:
    """Whether the C kernels can read ``t``: a float32 tensor in CPU memory."""
    return t.device.type == "cpu" and t.dtype == torch.float32


def column_spread(x: torch.Tensor, take_sqrt: bool) -> torch.Tensor:
    """``x.std(-2)`` or ``x.var(-2)`` (unbiased): each column's spread over the rows, of a matrix or of each matrix
    of a stack, bit for bit, by the C kernel where it is built (and not for autograd). PyTorch's Welford loop
    runs one column at a time; on a whole training split it took most of an evaluation."""
    from actgrad.training import kernels

    lib = kernels.load() if _plain_cpu(x) and x.dim() in (2, 3) and not x.requires_grad else None
    if lib is None:
        return x.std(-2) if take_sqrt else x.var(-2)
    x = x.contiguous()
    rows, cols = x.shape[-2:]
    out = x.new_empty((*x.shape[:-2], cols))
    mean, m2 = torch.empty(2, cols, dtype=torch.float64)
    for matrix, spread in zip(x.view(-1, rows, cols), out.view(-1, cols)):
        lib.column_var(matrix.data_ptr(), rows, cols, 1.0, int(take_sqrt), mean.data_ptr(), m2.data_ptr(),
                       spread.data_ptr())
    return out


class LayerNorm(nn.Module):
    """Layer normalisation: each example normalised over its features (``F.layer_norm``: biased variance,
    eps 1e-5), with a learnable gain and shift per feature as BatchNorm's; no running statistics, so
    training and evaluation compute the same function and examples never see each other."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.gamma, self.beta, self.eps)


class Tanh(nn.Module):
    kind = "tanh"

    def forward(self, x):
        return torch.tanh(x)


class ReLU(nn.Module):
    kind = "relu"

    def forward(self, x):
        return torch.relu(x)


class GELU(nn.Module):
    """The exact GELU, x * Phi(x) with the normal CDF by erf (``F.gelu``'s default, not the tanh approximation)."""

    kind = "gelu"

    def forward(self, x):
        return F.gelu(x)


ACTIVATIONS = {"tanh": Tanh, "relu": ReLU, "gelu": GELU}
NORMS = ("none", "batchnorm", "layernorm")


class Network(nn.Module):
    """A stack of named layers ending in logits; ``loss`` is the lecture's cross-entropy."""

    def __init__(self, named_layers: list[tuple[str, nn.Module]]):
        super().__init__()
        self.layers = nn.ModuleDict(named_layers)

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x

    def loss(self, x, y):
        return F.cross_entropy(self(x), y)

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters in the lecture's order (the order of its ``parameters`` list)."""
        return list(self.named_parameters())

    def batchnorm_layers(self) -> list[tuple[str, BatchNorm1d]]:
        return [(n, m) for n, m in self.layers.items() if isinstance(m, BatchNorm1d)]

    def layernorm_layers(self) -> list[tuple[str, LayerNorm]]:
        return [(n, m) for n, m in self.layers.items() if isinstance(m, LayerNorm)]

    def activation_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.layers.items() if isinstance(m, tuple(ACTIVATIONS.values()))]

    @torch.no_grad()
    def calibrate_batchnorm(self, x: torch.Tensor, chunk: int | None = None,
                            scratch: Scratch | None = None) -> torch.Tensor:
        """Set every BatchNorm's running statistics to those of the whole of ``x``, layer by layer.

        One pass in evaluation mode: each BatchNorm is calibrated on what reaches it from the
        layers before, which are already calibrated. Returns the output (the logits), which
        lives in ``scratch`` when one is given.

        The statistics are taken over the whole of each layer's input, as the lecture takes
        them; with ``chunk``, each layer then runs on ``chunk`` rows at a time, which gives
        the same values (no layer mixes rows in evaluation mode) from cache-sized pieces.
        """
        was_training = self.training
        self.eval()
        layers = list(self.layers.values())
        # Only a BatchNorm's input is needed whole: the layers from one BatchNorm to the next run as one stretch.
        starts = [0] + [i for i, layer in enumerate(layers) if isinstance(layer, BatchNorm1d) and i > 0]
        for a, b in zip(starts, starts[1:] + [len(layers)]):
            if isinstance(layers[a], BatchNorm1d):
                layers[a].calibrate(x)
            x = apply_in_chunks(layers[a:b], x, chunk, scratch)
        self.train(was_training)
        return x


class Scratch:
    """Whole-split tensors, kept to be written again by the next pass over a split.

    A fresh tensor that size (73 MB for 182k rows x 100) is fresh memory from the OS, and
    its first writes page-fault: ~30 ms, more than a layer's arithmetic on it. Evaluating a
    BatchNorm net needs one per layer, and a training job evaluates a few dozen times.
    """

    def __init__(self):
        self._tensors: dict[tuple, list[torch.Tensor]] = {}

    def empty(self, shape: tuple[int, ...], like: torch.Tensor, avoid: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, other than ``avoid``.

        What it held is overwritten: a tensor handed out is valid until the next request
        for its shape that does not name it in ``avoid``.
        """
        kept = self._tensors.setdefault((tuple(shape), like.dtype, like.device), [])
        for t in kept:
            if t.data_ptr() != avoid.data_ptr():
                return t
        kept.append(like.new_empty(shape))
        return kept[-1]


def apply_in_chunks(layers, x: torch.Tensor, chunk: int | None, scratch: Scratch | None = None) -> torch.Tensor:
    """``layers`` applied in turn to ``chunk`` rows of ``x`` at a time (all at once without ``chunk``)
    and joined: the same values as one pass when no layer mixes rows, from cache-sized pieces.

    The pieces are written into one tensor as they come, from ``scratch`` when given, so
    that only one output-sized tensor is ever alive besides ``x``.
    """
    def run(rows):
        for layer in layers:
            rows = layer(rows)
        return rows

    n = x.shape[0]
    if chunk is None or n <= chunk:
        return run(x)
    first = run(x[:chunk])
    shape = (n, *first.shape[1:])
    out = scratch.empty(shape, first, avoid=x) if scratch is not None else first.new_empty(shape)
    out[:chunk] = first
    for i in range(chunk, n, chunk):
        out[i:i + chunk] = run(x[i:i + chunk])
    return out


def orthogonal_like(draw: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix of ``draw``'s QR decomposition, with the signs fixed so that it is
    Haar-distributed (Mezzadri 2007), scaled so that every singular value is ``sqrt(max(1, fan_out / fan_in))``.

    A ``(fan_in, fan_out)`` weight gets orthonormal columns when it narrows (or keeps) the width and
    orthonormal rows when it widens; the scale is the one where a Gaussian ``randn / sqrt(fan_in)`` has its
    singular values on average, so each unit's pre-activation variance is the Gaussian init's (the
    variance of ``x @ W``'s units is ``E[x^2]`` either way), and gains mean the same under both inits.
    The QR runs in float64 so that the result is orthogonal to float32 rounding.
    """
    fan_in, fan_out = draw.shape
    a = draw.double() if fan_in >= fan_out else draw.double().t()
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if fan_in >= fan_out else q.t()
    return (q * max(1.0, fan_out / fan_in) ** 0.5).to(draw.dtype)


def _scaled(t: torch.Tensor, scale, gain: float, fan_in: int) -> torch.Tensor:
    # Written as the lecture writes it (``randn * (5/3) / fan_in**0.5``: multiply, then
    # divide), because the other order rounds differently and would not be the lecture's run.
    if scale == "kaiming":
        return t * gain / (fan_in ** 0.5)
    if scale == "orthogonal":
        return orthogonal_like(t) * gain
    return t * scale


def norm_of(spec: dict) -> str:
    """The variant's normalisation, ``none``, ``batchnorm`` or ``layernorm``: its ``norm``, else its
    ``batchnorm`` flag (the older spelling; :func:`actgrad.study.settings.variant_spec` sets both)."""
    norm = spec.get("norm")
    if norm is None:
        return "batchnorm" if spec.get("batchnorm") else "none"
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")
    if "batchnorm" in spec and bool(spec["batchnorm"]) != (norm == "batchnorm"):
        # A spec changed after variant_spec (one key set, not the other) would otherwise build the wrong net.
        raise ValueError(f"batchnorm: {spec['batchnorm']} contradicts norm: {norm}; set norm (or both)")
    return norm


def build_mlp(spec: dict, g: torch.Generator, block_size: int) -> Network:
    """Lecture part 1: C, W1, b1, W2, b2 drawn in that order (b1 skipped when ``not_drawn``)."""
    n_embd, n_hidden = spec["n_embd"], spec["n_hidden"]
    scales, gain = spec["init"], spec["gain"]
    fan_in = n_embd * block_size
    C = _scaled(torch.randn((VOCAB_SIZE, n_embd), generator=g), scales["C"], gain, VOCAB_SIZE)
    W1 = _scaled(torch.randn((fan_in, n_hidden), generator=g), scales["W1"], gain, fan_in)
    b1 = None
    if spec["hidden_bias"] != "not_drawn":
        b1 = _scaled(torch.randn(n_hidden, generator=g), scales["b1"], gain, fan_in)
    W2 = _scaled(torch.randn((n_hidden, VOCAB_SIZE), generator=g), scales["W2"], gain, n_hidden)
    b2 = _scaled(torch.randn(VOCAB_SIZE, generator=g), scales["b2"], gain, n_hidden)

    layers: list[tuple[str, nn.Module]] = [
        ("embedding", Embedding(C)),
        ("linear1", Linear(W1, b1, add_bias=spec["hidden_bias"] == "added")),
    ]
    norm = norm_of(spec)
    if norm == "batchnorm":
        layers.append(("batchnorm1", BatchNorm1d(n_hidden, momentum=0.001, eps=0.0, normalize_by="std",
                                                 keepdim_params=True)))
    elif norm == "layernorm":
        layers.append(("layernorm1", LayerNorm(n_hidden)))
    layers.append((f"{spec['activation']}1", ACTIVATIONS[spec["activation"]]()))
    layers.append(("linear2", Linear(W2, b2)))
    return Network(layers)


def build_deep(spec: dict, g: torch.Generator, block_size: int) -> Network:
    """Lecture part 2: C, then each Linear weight ``randn / sqrt(fan_in)`` in order (with
    ``weight_init: orthogonal``, the same draws made orthogonal: :func:`orthogonal_like`).

    After drawing, as the lecture does: the last layer is made less confident (gamma of the
    last BatchNorm or LayerNorm, or the last Linear's weight, times ``last_layer_scale``), then
    every Linear before the last *layer* is multiplied by ``gain``; with a norm that includes
    the output Linear, because the last layer is then the norm. A Linear followed by a norm has
    no bias (the norm's shift takes its place), as in the lecture.
    """
    n_embd, n_hidden, n_layers = spec["n_embd"], spec["n_hidden"], spec["n_layers"]
    norm = norm_of(spec)
    orthogonal = spec.get("weight_init", "gaussian") == "orthogonal"
    act_name = spec["activation"]
    C = torch.randn((VOCAB_SIZE, n_embd), generator=g)
    dims = [n_embd * block_size] + [n_hidden] * n_layers + [VOCAB_SIZE]
    layers: list[tuple[str, nn.Module]] = [("embedding", Embedding(C))]
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        draw = torch.randn((fan_in, fan_out), generator=g)
        weight = orthogonal_like(draw) if orthogonal else draw / fan_in ** 0.5
        bias = torch.zeros(fan_out) if norm == "none" else None
        layers.append((f"linear{i}", Linear(weight, bias)))
        if norm == "batchnorm":
            layers.append((f"batchnorm{i}", BatchNorm1d(fan_out, momentum=0.1, eps=1e-5, normalize_by="var")))
        elif norm == "layernorm":
            layers.append((f"layernorm{i}", LayerNorm(fan_out)))
        if i <= n_layers:
            layers.append((f"{act_name}{i}", ACTIVATIONS[act_name]()))
    net = Network(layers)
    with torch.no_grad():
        modules = list(net.layers.values())
        last = modules[-1]
        if isinstance(last, (BatchNorm1d, LayerNorm)):
            last.gamma *= spec["last_layer_scale"]
        else:
            last.weight *= spec["last_layer_scale"]
        for layer in modules[:-1]:
            if isinstance(layer, Linear):
                layer.weight *= spec["gain"]
    return net


BUILDERS = {"mlp": build_mlp, "deep": build_deep}


def build_network(spec: dict, g: torch.Generator, block_size: int) -> Network:
    return BUILDERS[spec["model"]](spec, g, block_size)


def jacobian_spectrum(net: Network, X: torch.Tensor) -> dict:
    """Singular values of each example's input-output Jacobian, d logits / d (its concatenated embeddings),
    over the examples of ``X`` (a minibatch of contexts, say 32), pooled: mean, std, min, max, and the
    mean and std of their squares (the quantities of :func:`actgrad.results.theory.jacobian_spectrum`).

    A BatchNorm couples the examples of a batch; here it normalises with the statistics of ``X`` held
    fixed (set as its running statistics, evaluation mode), so that each example has a Jacobian of its
    own — the mean-field picture. The net's running statistics and mode are as before afterwards.
    Cost: a forward pass and one backward pass per logit on ``X``, then ``len(X)`` SVDs of 27 x 30.
    """
    was_training = net.training
    saved = {n: (bn.running_mean.clone(), bn.running_spread.clone()) for n, bn in net.batchnorm_layers()}
    layers = list(net.layers.values())
    try:
        with torch.no_grad():
            net.calibrate_batchnorm(X)  # evaluation mode, every BatchNorm at the statistics of X
            net.eval()
            emb = layers[0](X)
        with torch.enable_grad():
            x = emb.detach().requires_grad_(True)
            out = x
            for layer in layers[1:]:
                out = layer(out)
            # In evaluation mode examples are independent: the gradient of the batch's sum of logit k
            # is, for every example, row k of that example's Jacobian.
            rows = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=k + 1 < out.shape[1])[0]
                    for k in range(out.shape[1])]
        jac = torch.stack(rows, dim=1).double()  # (examples, logits, inputs)
        sv = torch.linalg.svdvals(jac).flatten()
    finally:
        for n, bn in net.batchnorm_layers():
            bn.running_mean, bn.running_spread = saved[n]
        net.train(was_training)
    sq = sv ** 2
    return {"mean": float(sv.mean()), "std": float(sv.std()), "min": float(sv.min()), "max": float(sv.max()),
            "mean_sq": float(sq.mean()), "std_sq": float(sq.std())}
