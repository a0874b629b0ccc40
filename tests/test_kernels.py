"""The engine's compiled CPU kernels: the same training as the PyTorch operations, and a clean
fallback to those operations wherever the kernels cannot be built."""

import shutil

import numpy as np
import pytest
import torch
from test_engine import NETWORKS, SCHEDULE

from actgrad.training import kernels
from actgrad.training import loop as reference
from actgrad.training.engine import train_batched
from actgrad.training.stats import StatsPlan, StatsRecorder


@pytest.fixture
def compiler():
    """A C compiler: skipped without one, except under CI (as the browser tests), where the kernels must be tested."""
    from test_browser import in_ci

    if kernels.compiler() is None:
        if in_ci():
            pytest.fail("a C compiler is required under CI but none was found (apt-get install -y gcc, or set CC)")
        pytest.skip("no C compiler on this machine (CI is not set, so skipping)")


needs_compiler = pytest.mark.usefixtures("compiler")


@pytest.fixture(autouse=True)
def fresh_kernels():
    """Each test finds the kernels afresh (and the next test is not left with a test's setting)."""
    kernels.reset()
    yield
    kernels.reset()


def _train(spec, seeds, Xtr, Ytr, steps, use_kernels, batch_size=32):
    nets, gens = zip(*[reference.init_network(spec, seed, 3) for seed in seeds])
    recorders = [StatsRecorder(StatsPlan(every=20, update_every=10, histogram_every=40, snapshot_steps=(0, 20),
                                         bins=20, last_step=steps - 1)) for _ in seeds]
    results = train_batched(list(nets), list(gens), Xtr, Ytr, steps=steps, batch_size=batch_size,
                            lr_schedule=SCHEDULE, recorders=recorders, kernels=use_kernels)
    return results, nets, recorders


CASES = {
    **NETWORKS,
    "shallow_bn_table": dict(NETWORKS["shallow_bn"], hidden_bias="added"),  # a Linear bias before the BatchNorm
    "deep_relu": dict(NETWORKS["deep"], activation="relu", n_layers=2),  # no kernel for relu: torch ops
    "shallow_unpadded": dict(NETWORKS["shallow"], n_embd=16),  # 3 x 16 inputs: the lookup needs no padding
    "shallow_ln_bias": dict(NETWORKS["shallow"], norm="layernorm"),  # a bias before the LayerNorm
    "deep_ln": dict(NETWORKS["deep"], norm="layernorm", n_layers=3),
}


@needs_compiler
@pytest.mark.parametrize("batch_size", [32, 20], ids=["batch32", "batch20"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_train_as_the_pytorch_operations(name, batch_size, splits):
    """Losses, parameters, running statistics and recorded statistics agree to float rounding."""
    Xtr, Ytr = splits["splits"]["train"]
    steps = 150
    fast, fast_nets, fast_recs = _train(CASES[name], (1, 2), Xtr, Ytr, steps, True, batch_size)
    assert kernels.status().startswith("on")
    slow, slow_nets, slow_recs = _train(CASES[name], (1, 2), Xtr, Ytr, steps, False, batch_size)
    for a, b, net_a, net_b, rec_a, rec_b in zip(fast, slow, fast_nets, slow_nets, fast_recs, slow_recs):
        assert a.steps_done == b.steps_done == steps
        assert (a.losses - b.losses).abs().max().item() < 1e-5
        assert a.losses[-20:].mean() < a.losses[0] - 0.3  # it did train
        for (n, p), q in zip(net_a.named_parameters(), net_b.parameters()):
            assert (p - q).abs().max().item() < 1e-4, n
        for (n, bn), (_, bn_b) in zip(net_a.batchnorm_layers(), net_b.batchnorm_layers()):
            assert torch.allclose(bn.running_mean, bn_b.running_mean, rtol=1e-4, atol=1e-5), n
            assert torch.allclose(bn.running_spread, bn_b.running_spread, rtol=1e-4, atol=1e-5), n
            assert torch.allclose(bn.last_batch_spread, bn_b.last_batch_spread, rtol=1e-4, atol=1e-5), n
        stats_a, stats_b = rec_a.stats_frame(), rec_b.stats_frame()
        assert stats_a[["step", "layer", "kind", "stat"]].equals(stats_b[["step", "layer", "kind", "stat"]])
        close = np.isclose(stats_a.value, stats_b.value, rtol=1e-3, atol=1e-4, equal_nan=True)
        # A bias before a BatchNorm gets a gradient of float noise only (the BatchNorm cancels it).
        close |= (stats_a.layer == "layers.linear1.bias").values & (name == "shallow_bn_table")
        assert close.all(), stats_a.assign(pytorch=stats_b.value)[~close]


@needs_compiler
def test_a_diverging_model_is_still_seen_through_the_kernels(splits):
    """NaN must propagate through the kernels (they are built without -ffast-math)."""
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = zip(*[reference.init_network(NETWORKS["deep_bn"], seed, 3) for seed in (1, 2)])
    with torch.no_grad():
        nets[1].layers["linear3"].weight[0, 0] = float("nan")
    results = train_batched(list(nets), list(gens), Xtr, Ytr, steps=50, batch_size=32, lr_schedule=SCHEDULE,
                            kernels=True)
    assert [r.diverged_at for r in results] == [None, 0]


def test_without_a_compiler_the_engine_falls_back_to_pytorch(splits, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    assert kernels.load() is None
    assert kernels.status().startswith("off (no C compiler")
    Xtr, Ytr = splits["splits"]["train"]
    [res], _, _ = _train(NETWORKS["shallow_bn"], (1,), Xtr, Ytr, 30, None)  # auto: falls back quietly
    assert res.steps_done == 30 and torch.isfinite(res.losses).all()
    with pytest.raises(RuntimeError, match="no C compiler"):
        _train(NETWORKS["shallow_bn"], (1,), Xtr, Ytr, 30, True)  # asked for: says why not


def test_a_compiler_that_fails_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTGRAD_CACHE_DIR", str(tmp_path))
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: this compiler is broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(kernels, "compiler", lambda: str(failing))
    assert kernels.load() is None
    assert "did not build: cc: error: this compiler is broken" in kernels.status()
    assert list(tmp_path.glob("kernels-*")) == []  # no half-built library left behind


def test_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("ACTGRAD_KERNELS", "off")
    assert kernels.load() is None
    assert kernels.status().startswith("off (ACTGRAD_KERNELS=off)")


@needs_compiler
def test_a_built_library_is_reused_without_the_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTGRAD_CACHE_DIR", str(tmp_path))
    assert kernels.load() is not None
    [built] = tmp_path.glob("kernels-*.so")
    kernels.reset()
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert kernels.load() is not None
    assert kernels.status() == f"on ({built})"


@pytest.mark.parametrize("switch", ["on", "off"])
def test_a_training_job_says_and_records_whether_it_used_the_kernels(switch, names_path, tmp_path, monkeypatch,
                                                                    request):
    from conftest import tiny_config

    from actgrad import data
    from actgrad.study.settings import apply_defaults
    from actgrad.training import job as runs

    if switch == "on":
        request.getfixturevalue("compiler")
    monkeypatch.setenv("ACTGRAD_KERNELS", switch)
    data.save_splits(names_path, tmp_path / "splits.pt", tmp_path / "splits.json")
    config = apply_defaults(tiny_config(names_path, engine="batched", max_steps=20, seeds=[1],
                                        stats={"every": 10, "update_every": 10, "histogram_every": 10,
                                               "snapshot_steps": [0], "bins": 10}))
    lines = []
    [metrics] = runs.train_variants(config, ["deep_bn"], tmp_path / "splits.pt", tmp_path / "results", log=lines.append)
    assert metrics["kernels"] == ("C" if switch == "on" else "PyTorch")
    assert any(line.startswith(f"[deep_bn] C kernels: {switch} (") for line in lines), lines


# -- the engine's kernels, each against the PyTorch operations it replaces --------------------------------------
@needs_compiler
@pytest.mark.parametrize("padding", [2, 0], ids=["padded", "unpadded"])
def test_the_embedding_lookup_fills_the_first_linears_input_and_leaves_its_padding(padding):
    lib = kernels.load()
    g = torch.Generator().manual_seed(3)
    M, B, T, E, vocab = 3, 20, 3, 10, 27
    table = torch.randn(M * vocab, E, generator=g)
    rows = (torch.randint(0, vocab, (M, B * T), generator=g) + torch.arange(M).view(M, 1) * vocab).view(-1)
    out = torch.zeros(M, B, T * E + padding)
    lib.embedding_forward(table.data_ptr(), E, rows.data_ptr(), rows.numel(), out.data_ptr(), T, out.shape[2])
    assert torch.equal(out[:, :, :T * E], table[rows].view(M, B, T * E))
    assert not out[:, :, T * E:].any()


@needs_compiler
@pytest.mark.parametrize("B", [32, 20])
def test_the_loss_kernel_gives_pytorchs_loss_and_gradients(B):
    """The minibatch sums of log-likelihoods, the gradient at the logits and the logits' bias gradient, as autograd
    gives them for F.cross_entropy (feature-major logits (M, V, B))."""
    import torch.nn.functional as F

    lib = kernels.load()
    g = torch.Generator().manual_seed(4)
    M, V = 3, 27
    logits = (torch.randn(M, V, B, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, V, (M, 1, B), generator=g)
    losses = torch.stack([F.cross_entropy(logits[m].t(), targets[m, 0]) for m in range(M)])
    losses.sum().backward()
    with torch.no_grad():
        logp = torch.log_softmax(logits, 1)
        grad, loss_sums, bias_grad = logp.exp(), torch.empty(M), torch.empty(M, V)
    lib.cross_entropy(logp.data_ptr(), grad.data_ptr(), targets.data_ptr(), M, V, B, loss_sums.data_ptr(),
                      bias_grad.data_ptr())
    torch.testing.assert_close(loss_sums / -B, losses.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(bias_grad, logits.grad.sum(2), rtol=1e-4, atol=1e-7)


# -- the evaluation's kernels: the same bits as the PyTorch operations they replace ------------------------------
def _kernels_on_and_off(monkeypatch, fn):
    """``fn()`` with the kernels on, then off (PyTorch operations): both results."""
    results = []
    for switch in ("on", "off"):
        monkeypatch.setenv("ACTGRAD_KERNELS", switch)
        kernels.reset()
        results.append(fn())
    return results


@needs_compiler
@pytest.mark.parametrize("take_sqrt", [False, True], ids=["var", "std"])
def test_a_columns_spread_is_pytorchs_to_the_bit(take_sqrt, monkeypatch):
    from actgrad.training.model import column_spread

    g = torch.Generator().manual_seed(0)
    x = torch.randn(182_625, 100, generator=g) * 3 + 1  # a training split's size
    x[:7] *= 1e4  # a few far-off rows, where an order of summation that differs would show
    stack = torch.randn(40, 32, 100, generator=g)  # minibatches, each on its own
    expected = [x.std(0) if take_sqrt else x.var(0), stack.std(1) if take_sqrt else stack.var(1)]
    for got in _kernels_on_and_off(monkeypatch, lambda: [column_spread(x, take_sqrt), column_spread(stack, take_sqrt)]):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert kernels.load() is None  # the second round ran without the kernels


@needs_compiler
@pytest.mark.parametrize("flavour", ["var", "std"])
def test_batchnorm_with_running_statistics_is_pytorchs_to_the_bit(flavour, monkeypatch):
    from actgrad.training.model import BatchNorm1d

    g = torch.Generator().manual_seed(1)
    bn = BatchNorm1d(100, momentum=0.001, eps=1e-5, normalize_by=flavour).eval()
    with torch.no_grad():
        bn.gamma.copy_(torch.rand(100, generator=g) + 0.5)
        bn.beta.copy_(torch.randn(100, generator=g))
        bn.running_mean = torch.randn(100, generator=g)
        bn.running_spread = torch.rand(100, generator=g) + 0.1
    x = torch.randn(5000, 100, generator=g) * 2
    with torch.no_grad():
        on, off = _kernels_on_and_off(monkeypatch, lambda: bn(x))
    assert torch.equal(on, off)
    assert not torch.equal(on, x)  # it did normalise


@needs_compiler
def test_counting_an_activations_shares_gives_pytorchs_counts(monkeypatch):
    from actgrad.training.evaluation import SHARES, _counter_in_c

    x = torch.tanh(torch.randn(8192, 100, generator=torch.Generator().manual_seed(2)) * 3)
    x[0, :5] = torch.tensor([float("nan"), 0.0, -0.97, 0.97, 0.99])  # NaN passes no test; the thresholds are strict
    tests = [(name, *SHARES[name]) for name in ("sat97", "sat99", "nonpositive")]
    counts = _counter_in_c(tests)(x)
    assert counts == [int((x.abs() > 0.97).sum()), int((x.abs() > 0.99).sum()), int((x <= 0).sum())]
    monkeypatch.setenv("ACTGRAD_KERNELS", "off")
    kernels.reset()
    assert _counter_in_c(tests) is None  # evaluate() then counts with PyTorch operations
