"""The lecture's own training loops, written the way the lecture writes them.

Nothing in the pipeline trains with these: they are the yardstick. The tests check that
the pipeline's networks reproduce them bit for bit, and the benchmark times them as the
reference speed. Plain tensors, no modules, no hooks, one ``.item()`` per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_loop(Xtr, Ytr, *, seed=2147483647, steps=1000, n_embd=10, n_hidden=200, block_size=3,
             batchnorm=False, hidden_bias="added", W1_scale=1.0, b1_scale=1.0, W2_scale=1.0, b2_scale=1.0,
             kaiming_gain=None, decay_step=100000, batch_size=32):
    """Part 1 of the lecture. Returns (per-step losses, parameters dict).

    ``kaiming_gain`` replaces ``W1_scale`` with ``* gain / (n_embd * block_size)**0.5``.
    """
    vocab_size = 27
    g = torch.Generator().manual_seed(seed)
    C = torch.randn((vocab_size, n_embd), generator=g)
    if kaiming_gain is not None:
        W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * kaiming_gain / ((n_embd * block_size) ** 0.5)
    else:
        W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * W1_scale
    b1 = torch.randn(n_hidden, generator=g) * b1_scale if hidden_bias != "not_drawn" else None
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * W2_scale
    b2 = torch.randn(vocab_size, generator=g) * b2_scale
    bngain = torch.ones((1, n_hidden))
    bnbias = torch.zeros((1, n_hidden))
    bnmean_running = torch.zeros((1, n_hidden))
    bnstd_running = torch.ones((1, n_hidden))
    parameters = [C, W1] + ([b1] if hidden_bias == "added" else []) + [W2, b2]
    if batchnorm:
        parameters += [bngain, bnbias]
    for p in parameters:
        p.requires_grad = True

    lossi = []
    for i in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hpreact = embcat @ W1 + b1 if hidden_bias == "added" else embcat @ W1
        if batchnorm:
            bnmeani = hpreact.mean(0, keepdim=True)
            bnstdi = hpreact.std(0, keepdim=True)
            hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
            with torch.no_grad():
                bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
                bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Yb)
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < decay_step else 0.01
        for p in parameters:
            p.data += -lr * p.grad
        lossi.append(loss.item())
    params = {"C": C, "W1": W1, "b1": b1, "W2": W2, "b2": b2, "bngain": bngain, "bnbias": bnbias,
              "bnmean_running": bnmean_running, "bnstd_running": bnstd_running}
    return lossi, params


class Linear:
    def __init__(self, fan_in, fan_out, g, bias=True):
        self.weight = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
        self.bias = torch.zeros(fan_out) if bias else None

    def __call__(self, x):
        self.out = x @ self.weight
        if self.bias is not None:
            self.out += self.bias
        return self.out

    def parameters(self):
        return [self.weight] + ([] if self.bias is None else [self.bias])


class BatchNorm1d:
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps, self.momentum, self.training = eps, momentum, True
        self.gamma, self.beta = torch.ones(dim), torch.zeros(dim)
        self.running_mean, self.running_var = torch.zeros(dim), torch.ones(dim)

    def __call__(self, x):
        if self.training:
            xmean = x.mean(0, keepdim=True)
            xvar = x.var(0, keepdim=True)
        else:
            xmean, xvar = self.running_mean, self.running_var
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
        self.out = self.gamma * xhat + self.beta
        if self.training:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * xmean
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * xvar
        return self.out

    def parameters(self):
        return [self.gamma, self.beta]


class Tanh:
    def __call__(self, x):
        self.out = torch.tanh(x)
        return self.out

    def parameters(self):
        return []


def deep_layers(g, *, n_embd=10, n_hidden=100, n_layers=5, block_size=3, batchnorm=True, gain=5 / 3,
                last_layer_scale=0.1):
    """Part 2 of the lecture: C and the layer list, initialised as the lecture does."""
    vocab_size = 27
    C = torch.randn((vocab_size, n_embd), generator=g)
    layers = []
    fan_in = n_embd * block_size
    for _ in range(n_layers):
        layers.append(Linear(fan_in, n_hidden, g, bias=not batchnorm))
        if batchnorm:
            layers.append(BatchNorm1d(n_hidden))
        layers.append(Tanh())
        fan_in = n_hidden
    layers.append(Linear(n_hidden, vocab_size, g, bias=not batchnorm))
    if batchnorm:
        layers.append(BatchNorm1d(vocab_size))
    with torch.no_grad():
        if batchnorm:
            layers[-1].gamma *= last_layer_scale
        else:
            layers[-1].weight *= last_layer_scale
        for layer in layers[:-1]:
            if isinstance(layer, Linear):
                layer.weight *= gain
    return C, layers


def deep_loop(Xtr, Ytr, *, seed=2147483647, steps=1000, decay_step=150000, batch_size=32, **arch):
    """Part 2's loop, with its ``retain_grad`` on every layer output and its update:data list."""
    g = torch.Generator().manual_seed(seed)
    C, layers = deep_layers(g, **arch)
    parameters = [C] + [p for layer in layers for p in layer.parameters()]
    for p in parameters:
        p.requires_grad = True
    lossi, ud = [], []
    for i in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = C[Xb]
        x = emb.view(emb.shape[0], -1)
        for layer in layers:
            x = layer(x)
        loss = F.cross_entropy(x, Yb)
        for layer in layers:
            layer.out.retain_grad()
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < decay_step else 0.01
        for p in parameters:
            p.data += -lr * p.grad
        lossi.append(loss.item())
        with torch.no_grad():
            ud.append([((lr * p.grad).std() / p.data.std()).log10().item() for p in parameters])
    return lossi, C, layers
