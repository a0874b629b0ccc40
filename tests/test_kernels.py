"""The engine's compiled CPU kernels: the same training as the PyTorch operations, and a clean
fallback to those operations wherever the kernels cannot be built."""

import shutil

import numpy as np
import pytest
import torch
from test_engine import NETWORKS, SCHEDULE

from actgrad import kernels, reference
from actgrad.engine import train_batched
from actgrad.stats import StatsPlan, StatsRecorder


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

    from actgrad import data, runs
    from actgrad.config import apply_defaults

    if switch == "on":
        request.getfixturevalue("compiler")
    monkeypatch.setenv("ACTGRAD_KERNELS", switch)
    data.save_splits(names_path, tmp_path / "splits.pt", tmp_path / "splits.json")
    config = apply_defaults(tiny_config(names_path, engine="batched", max_steps=20, seeds=[1],
                                        stats={"every": 10, "update_every": 10, "histogram_every": 10,
                                               "snapshot_steps": [0], "bins": 10}))
    lines = []
    [metrics] = runs.train_variant(config, "deep_bn", tmp_path / "splits.pt", tmp_path / "results", log=lines.append)
    assert metrics["kernels"] == ("C" if switch == "on" else "PyTorch")
    assert any(line.startswith(f"[deep_bn] C kernels: {switch} (") for line in lines), lines
