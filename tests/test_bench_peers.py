"""The benchmark's peers (actgrad.tools.peers) compute what the engine computes; the benchmark prints the
engine's lead."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from actgrad.tools import bench, peers
from actgrad.training.engine import train_batched
from actgrad.training.networks import LECTURE_NETWORKS

STEPS = 5
MODELS = 3


def needs(peer: str):
    if peer == "JAX" and peers.jax_missing():
        pytest.skip(peers.jax_missing())


# torch.compile takes seconds to compile each network: once in the quick set, every network with the slow tests.
CASES = [(net, peer) for net in LECTURE_NETWORKS for peer in ("torch.func", "JAX")] + [
    pytest.param(net, "torch.func + compile", marks=[] if net == "deep+BN" else pytest.mark.slow)
    for net in LECTURE_NETWORKS]


@pytest.mark.parametrize("network, peer", CASES)
def test_each_peer_trains_what_the_engine_trains(network, peer, splits):
    """From the same initial networks and generators: the same per-step losses, parameters and running statistics."""
    needs(peer)
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = bench.seeded_networks(LECTURE_NETWORKS[network], MODELS, splits["block_size"])
    start = [copy.deepcopy(net) for net in nets]
    start_gens = [torch.Generator().set_state(g.get_state()) for g in gens]
    schedule = [{"from_step": 0, "lr": 0.1}, {"from_step": 3, "lr": 0.01}]  # a change of rate within the run

    results = train_batched(nets, gens, Xtr, Ytr, steps=STEPS, batch_size=32, lr_schedule=schedule)
    run = peers.train_peer(peer, start, start_gens, Xtr, Ytr, steps=STEPS, batch_size=32, lr_schedule=schedule)

    engine_losses = torch.stack([r.losses for r in results], dim=1)
    assert run.losses.shape == (STEPS, MODELS)
    torch.testing.assert_close(run.losses, engine_losses, rtol=1e-5, atol=1e-5)
    # the networks the peer started from are left as they were
    fresh, _ = bench.seeded_networks(LECTURE_NETWORKS[network], MODELS, splits["block_size"])
    for net, new in zip(start, fresh):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), new.state_dict().values()))
    trained = {**dict(run.params), **dict(run.buffers)}
    has_batchnorm = any(name.endswith("running_mean") for name in trained)
    assert has_batchnorm == ("BN" in network)
    for name, value in trained.items():
        engine_value = torch.stack([net.state_dict()[name] for net in nets])
        torch.testing.assert_close(value, engine_value, rtol=1e-5, atol=1e-6, msg=f"{peer}, {network}: {name}")


def test_the_running_statistics_are_checked(splits):
    """The comparison above can fail: a peer's BatchNorm without its running-statistics update is caught."""
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = bench.seeded_networks(LECTURE_NETWORKS["deep+BN"], 2, splits["block_size"])
    start = [copy.deepcopy(net) for net in nets]
    start_gens = [torch.Generator().set_state(g.get_state()) for g in gens]
    train_batched(nets, gens, Xtr, Ytr, steps=STEPS, batch_size=32, lr_schedule=bench.SCHEDULE)
    run = peers.train_peer("torch.func", start, start_gens, Xtr, Ytr, steps=STEPS, batch_size=32,
                           lr_schedule=bench.SCHEDULE)
    engine_value = torch.stack([net.state_dict()["layers.batchnorm1.running_mean"] for net in nets])
    untouched = torch.stack([net.state_dict()["layers.batchnorm1.running_mean"] for net in start])
    torch.testing.assert_close(run.buffers["layers.batchnorm1.running_mean"], engine_value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(untouched, engine_value, atol=1e-3)


def test_bench_times_the_peers_and_prints_the_lead_over_the_best(names_path, capsys, monkeypatch):
    # Without jax: one line saying how to install it, and no JAX rows.
    monkeypatch.setattr(peers, "jax_missing", lambda: "JAX rows skipped: jax is not installed (pip install jax)")
    args = bench.parse_args(["--steps", "20", "--models", "2", "--networks", "shallow", "--repeat", "1",
                             "--peers", "torch.func,jax", "--names", str(names_path)])
    rows = bench.run(args)
    out = capsys.readouterr().out
    assert "JAX rows skipped: jax is not installed (pip install jax)" in out
    peer_rows = [r for r in rows if "peer" in r]
    assert [(r["network"], r["peer"], r["models"]) for r in peer_rows] == [("shallow", "torch.func", 2)]
    engine_plain = next(r for r in rows if r.get("engine") == "engine (no stats)" and r["models"] == 2)
    row = peer_rows[0]
    assert row["model_steps_per_s"] > 0
    assert row["lead"] == pytest.approx(engine_plain["model_steps_per_s"] / row["model_steps_per_s"])
    best = next(r for r in rows if "best_peer" in r)
    assert best["best_peer"] == "torch.func" and best["goal_met"] == (row["lead"] >= 2)
    assert "best peer, shallow, 2 models: torch.func" in out
    assert f"goal 2x {'met' if best['goal_met'] else 'missed'}" in out
    # ... and beside it the ceiling, a step's matmuls alone, with what a 2x lead would take of it
    assert best["matmul_ceiling"] > 0
    assert best["needed_share_of_ceiling"] == pytest.approx(2 * row["model_steps_per_s"] / best["matmul_ceiling"])
    assert best["engine_share_of_ceiling"] == pytest.approx(engine_plain["model_steps_per_s"] / best["matmul_ceiling"])
    assert f"ceiling {best['matmul_ceiling']:,.0f}" in out
    # ... and of the sgemm peak printed above the engine's table, for the step's matmul FLOPs alone
    peak = float(re.search(r"sgemm peak on cpu \(.*?\): ([\d.]+) GFLOP/s", out).group(1))
    flops = bench.matmul_flops_per_step(LECTURE_NETWORKS["shallow"], 3)
    assert best["needed_share_of_sgemm_peak"] == pytest.approx(2 * row["model_steps_per_s"] * flops / 1e9 / peak,
                                                               rel=1e-3)
    assert f"its matmuls alone at {100 * best['needed_share_of_sgemm_peak']:.0f}% of the sgemm peak" in out


def test_the_ceiling_times_the_products_of_each_linear_layer(monkeypatch):
    """matmul_ceiling times three batched products per Linear layer, of the layer's shapes, in two layouts."""
    from actgrad.study.settings import linear_shapes
    shapes = []
    real = torch.bmm

    def bmm(a, b, out):
        shapes.append((tuple(a.shape), tuple(b.shape), tuple(out.shape)))
        return real(a, b, out=out)

    monkeypatch.setattr(torch, "bmm", bmm)
    spec = LECTURE_NETWORKS["deep"]
    rate = bench.matmul_ceiling(spec, 3, block_size=3, steps=2, repeat=1)
    assert rate > 0
    layers = linear_shapes(spec, 3)
    assert len(layers) == 6 and layers[0] == (30, 100) and layers[-1] == (100, 27)
    assert len(shapes) == 2 * 3 * len(layers) * 3  # 2 layouts x (warm-up + 2 steps) x 3 products per layer
    assert all(a[0] == b[0] == out[0] == 3 for a, b, out in shapes)  # every product over the 3 models
    first = shapes[:3]  # examples-major: x @ W, dY @ W^T, X^T @ dY of the first layer
    assert first == [((3, 32, 30), (3, 30, 100), (3, 32, 100)), ((3, 32, 100), (3, 100, 30), (3, 32, 30)),
                     ((3, 30, 32), (3, 32, 100), (3, 30, 100))]


def test_peer_model_counts_default_to_the_pipelines_five_and_join_the_engines():
    args = bench.parse_args(["--quick"])
    assert args.peer_models == [5] and args.models == [1, 5, 10]
    args = bench.parse_args(["--models", "1,3"])
    assert args.peer_models == [1, 3] and args.models == [1, 3]
    args = bench.parse_args(["--models", "1,3", "--peers", "none"])
    assert args.peers == [] and args.peer_models == [] and args.models == [1, 3]
    assert bench.parse_args(["--peers", "torch.compile"]).peers == ["torch.func + compile"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "tensorflow"])
