"""The batched engine trains each model as the reference engine (the lecture's loop) does."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import max_param_diff

from actgrad.training import loop as reference
from actgrad.training.engine import architecture, group_size, train_batched
from actgrad.training.networks import LECTURE_NETWORKS
from actgrad.training.stats import NetworkHooks, StatsPlan, StatsRecorder

SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 100000, "lr": 0.01}]
# The lecture's four networks; the deep BatchNorm net at gain 1, the lecture's final run.
NETWORKS = {
    "shallow": LECTURE_NETWORKS["shallow"],
    "shallow_bn": LECTURE_NETWORKS["shallow+BN"],
    "deep": LECTURE_NETWORKS["deep"],
    "deep_bn": dict(LECTURE_NETWORKS["deep+BN"], gain=1.0),
}
SEED = 2147483647


# One thread, as the pipeline trains: small ops with several threads on a busy machine crawl.
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_run(spec, seed, Xtr, Ytr, steps, callbacks_for=None, **kwargs):
    net, g = reference.init_network(spec, seed, 3)
    callbacks = [callbacks_for(net)] if callbacks_for else []
    res = reference.train_reference(net, g, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE,
                                    callbacks=callbacks, **kwargs)
    return res, net, g


def engine(specs_seeds, Xtr, Ytr, steps, **kwargs):
    nets, gens = zip(*[reference.init_network(spec, seed, 3) for spec, seed in specs_seeds])
    results = train_batched(list(nets), list(gens), Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE,
                            **kwargs)
    return results, nets, gens


@torch.no_grad()
def dev_loss(net, X, Y):
    net.eval()
    try:
        return F.cross_entropy(net(X), Y).item()
    finally:
        net.train()


def test_chunked_index_draws_are_the_lectures():
    """The engine draws a chunk of steps at once; that must be the lecture's per-step draws."""
    g1, g2 = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    one_by_one = torch.stack([torch.randint(0, 182625, (32,), generator=g1) for _ in range(50)])
    assert torch.equal(torch.randint(0, 182625, (50, 32), generator=g2), one_by_one)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("name", list(NETWORKS))
def test_one_model_trains_as_the_reference_engine(name, splits):
    """Two thousand steps: the losses stay within float rounding of the reference's (measured: < 3e-6)."""
    Xtr, Ytr = splits["splits"]["train"]
    steps = 2000
    ref, ref_net, ref_g = reference_run(NETWORKS[name], SEED, Xtr, Ytr, steps)
    [res], [net], [g] = engine([(NETWORKS[name], SEED)], Xtr, Ytr, steps)
    assert res.steps_done == steps and res.diverged_at is None and res.losses.dtype == torch.float32
    # Same parameters, same first minibatch: the same first loss, to float rounding.
    assert res.losses[0].item() == pytest.approx(ref.losses[0].item(), abs=1e-6)
    assert (res.losses - ref.losses).abs().max().item() < 2e-5
    assert res.losses[-100:].mean() < res.losses[0] - 0.5  # it did train
    assert torch.equal(g.get_state(), ref_g.get_state())  # and drew exactly the reference's minibatches
    # Written back: trained parameters and BatchNorm running statistics.
    assert max_param_diff(net, ref_net) < 2e-5
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref_net.named_parameters()]
    for (n, bn), (_, ref_bn) in zip(net.batchnorm_layers(), ref_net.batchnorm_layers()):
        for ours, theirs in ((bn.running_mean, ref_bn.running_mean), (bn.running_spread, ref_bn.running_spread)):
            assert ours.shape == theirs.shape
            assert not torch.equal(theirs, torch.zeros_like(theirs) if theirs is ref_bn.running_mean
                                   else torch.ones_like(theirs))
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), n
        if name == "shallow_bn":
            # (1 - 0.001) and 0.001 do not sum to 1 in float32: the lecture's running std carries
            # a relative bias of 1.3e-5, which the engine must reproduce (lerp would not).
            rel = ((bn.running_spread - ref_bn.running_spread).abs() / ref_bn.running_spread.abs()).max().item()
            assert rel < 3e-6
    # The written-back network evaluates (running statistics included) as the reference's does.
    Xdev, Ydev = splits["splits"]["dev"]
    assert dev_loss(net, Xdev, Ydev) == pytest.approx(dev_loss(ref_net, Xdev, Ydev), abs=1e-4)


@pytest.mark.parametrize("spec", [
    dict(NETWORKS["shallow"], hidden_bias="drawn_not_added"),  # the lecture notes' `#+ b1`
    dict(NETWORKS["shallow"], activation="relu"),
    dict(NETWORKS["deep_bn"], activation="relu", n_layers=2, n_hidden=64),
], ids=["b1_drawn_not_added", "relu", "deep_relu_bn"])
def test_other_layers_and_bias_modes_train_as_the_reference(spec, splits):
    Xtr, Ytr = splits["splits"]["train"]
    ref, ref_net, _ = reference_run(spec, SEED, Xtr, Ytr, 300)
    [res], [net], _ = engine([(spec, SEED)], Xtr, Ytr, 300)
    assert (res.losses - ref.losses).abs().max().item() < 1e-5
    assert max_param_diff(net, ref_net) < 1e-5
    assert {n for n, _ in net.named_buffers()} == {n for n, _ in ref_net.named_buffers()}


@pytest.mark.parametrize("name", ["shallow", "deep_bn"])
def test_models_batched_together_train_as_each_alone(name, splits):
    """Different seeds and init scales in one batch: each model's run is its run alone."""
    Xtr, Ytr = splits["splits"]["train"]
    base = NETWORKS[name]
    if name == "shallow":
        variants = [dict(base, init=dict(base["init"], W1=s)) for s in (0.2, 0.1, 0.3)]
    else:
        variants = [dict(base, gain=gn) for gn in (1.0, 5 / 3, 0.5)]
    members = [(variants[0], 1), (variants[1], 2), (variants[2], 1), (variants[0], 3)]
    steps = 150
    together, nets, _ = engine(members, Xtr, Ytr, steps)
    for (spec, seed), res, net in zip(members, together, nets):
        [alone], [alone_net], _ = engine([(spec, seed)], Xtr, Ytr, steps)
        assert (res.losses - alone.losses).abs().max().item() < 1e-5
        assert max_param_diff(net, alone_net) < 1e-5
    # and they are different runs
    assert (together[0].losses - together[1].losses).abs().max().item() > 1e-2


def test_chunking_and_check_windows_do_not_change_the_run(splits):
    Xtr, Ytr = splits["splits"]["train"]
    members = [(NETWORKS["shallow_bn"], 1), (NETWORKS["shallow_bn"], 2)]
    a, _, ga = engine(members, Xtr, Ytr, 90)
    b, _, gb = engine(members, Xtr, Ytr, 90, index_chunk=7, divergence_check_every=13)
    for ra, rb in zip(a, b):
        assert torch.equal(ra.losses, rb.losses)
    assert all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(ga, gb))


def test_models_split_into_several_batches_train_as_in_one(splits):
    """More models than fit the cache are trained as groups, one stretch of steps each in turn."""
    Xtr, Ytr = splits["splits"]["train"]
    members = [(NETWORKS["deep"], seed) for seed in (1, 2, 3, 4, 5)]
    one, nets1, _ = engine(members, Xtr, Ytr, 130)
    groups, nets2, _ = engine(members, Xtr, Ytr, 130, max_group=2, divergence_check_every=50)
    for a, b, n1, n2 in zip(one, groups, nets1, nets2):
        assert (a.losses - b.losses).abs().max().item() < 1e-5
        assert max_param_diff(n1, n2) < 1e-5


def test_divergence_is_reported_and_does_not_touch_the_others(splits):
    """A model that blows up stops where the reference engine stops; its batch-mates go on as alone."""
    Xtr, Ytr = splits["splits"]["train"]
    base = dict(model="deep", n_embd=10, n_hidden=32, n_layers=2, activation="relu", batchnorm=False,
                last_layer_scale=0.1)
    members = [(dict(base, gain=1.0), 1), (dict(base, gain=100.0), 3), (dict(base, gain=2.0), 2),
               (dict(base, gain=100.0), 5)]
    steps = 250
    results, nets, gens = engine(members, Xtr, Ytr, steps)
    outcomes = []
    for (spec, seed), res, net, g in zip(members, results, nets, gens):
        ref, ref_net, ref_g = reference_run(spec, seed, Xtr, Ytr, steps)
        assert (res.diverged_at, res.diverged_rule) == (ref.diverged_at, ref.diverged_rule)
        assert res.steps_done == ref.steps_done == len(res.losses)
        assert torch.equal(g.get_state(), ref_g.get_state())  # drawn up to where it stopped
        if ref.diverged_at is None:
            assert (res.losses - ref.losses).abs().max().item() < 1e-4
            assert max_param_diff(net, ref_net) < 1e-4
        outcomes.append(res.diverged_rule)
    assert outcomes == [None, "non-finite loss", None, "non-finite loss"]


def test_a_nan_model_is_taken_out_of_the_batch(splits):
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = zip(*[reference.init_network(NETWORKS["shallow_bn"], seed, 3) for seed in (1, 2, 3)])
    with torch.no_grad():
        nets[1].layers["linear2"].weight[0, 0] = float("nan")
    results = train_batched(list(nets), list(gens), Xtr, Ytr, steps=120, batch_size=32, lr_schedule=SCHEDULE,
                            max_group=2)  # the NaN model shares a batch with model 0; model 2 is alone
    assert [r.diverged_at for r in results] == [None, 0, None]
    assert [r.diverged_rule for r in results] == [None, "non-finite loss", None]
    assert results[1].steps_done == 1 and torch.isnan(results[1].losses[0])
    for m, seed in ((0, 1), (2, 3)):  # its batch-mate and the model in the other batch
        [alone], [alone_net], _ = engine([(NETWORKS["shallow_bn"], seed)], Xtr, Ytr, 120)
        assert (results[m].losses - alone.losses).abs().max().item() < 1e-5
        assert max_param_diff(nets[m], alone_net) < 1e-5
    assert torch.isnan(nets[1].layers["linear2"].weight).any()  # written back as it was when it stopped


def _frames(recorder):
    stats = recorder.stats_frame().set_index(["step", "layer", "kind", "stat"]).value.sort_index()
    hists = recorder.histogram_frame().set_index(["step", "layer", "kind", "bin_left"]).fraction.sort_index()
    return stats, hists


@pytest.mark.parametrize("name", ["shallow", "shallow_bn", "deep_bn"])
def test_statistics_match_the_hooks_on_the_reference_engine(name, splits):
    Xtr, Ytr = splits["splits"]["train"]
    steps = 61

    def plan():
        return StatsPlan(every=20, update_every=10, histogram_every=30, snapshot_steps=(0, 20), bins=20,
                         last_step=steps - 1)

    ref_rec = StatsRecorder(plan())
    reference_run(NETWORKS[name], SEED, Xtr, Ytr, steps, callbacks_for=lambda net: NetworkHooks(net, ref_rec))
    rec = StatsRecorder(plan())
    engine([(NETWORKS[name], SEED), (NETWORKS[name], 5)], Xtr, Ytr, steps, recorders=[rec, None])
    ref_stats, ref_hists = _frames(ref_rec)
    stats, hists = _frames(rec)
    assert list(stats.index) == list(ref_stats.index)  # same steps, layers, parameter names, figures
    kinds = set(stats.index.get_level_values("kind"))
    assert {"activation", "activation_grad", "preactivation", "update", "weight_grad"} <= kinds
    assert ("batchnorm" in kinds) == name.endswith("_bn")
    close = np.isclose(stats.values, ref_stats.values, rtol=1e-3, atol=1e-4, equal_nan=True)
    assert close.all(), pd.DataFrame({"engine": stats, "reference": ref_stats})[~close]
    assert list(hists.index.droplevel("bin_left").unique()) == list(ref_hists.index.droplevel("bin_left").unique())
    # bin edges of data-ranged histograms and values near edges may move by float rounding
    assert (hists.values - ref_hists.values).__abs__().max() < 0.01
    assert rec.saturation_maps.keys() == ref_rec.saturation_maps.keys()
    for layer, smap in rec.saturation_maps.items():
        assert smap.shape == ref_rec.saturation_maps[layer].shape
        assert (smap != ref_rec.saturation_maps[layer]).float().mean() < 0.001


def test_engine_refuses_to_batch_different_architectures(splits):
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = zip(*[reference.init_network(NETWORKS[n], 1, 3) for n in ("shallow", "shallow_bn")])
    assert architecture(nets[0]) != architecture(nets[1])
    with pytest.raises(ValueError, match="architecture"):
        train_batched(list(nets), list(gens), Xtr, Ytr, steps=5, batch_size=32, lr_schedule=SCHEDULE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_one_model_on_cuda_trains_as_on_cpu(splits):
    Xtr, Ytr = splits["splits"]["train"]
    [cpu], _, _ = engine([(NETWORKS["deep_bn"], SEED)], Xtr, Ytr, 200)
    [gpu], [net], _ = engine([(NETWORKS["deep_bn"], SEED)], Xtr, Ytr, 200, device=torch.device("cuda"))
    assert gpu.losses.device.type == "cpu" and next(net.parameters()).device.type == "cuda"
    assert (gpu.losses - cpu.losses).abs().max().item() < 1e-3


def test_group_size_is_the_cache_budget_over_what_the_engine_allocates(splits):
    """The lecture's nets fit the pipeline's 5 seeds and their 5 twins in one batch; the deep ones fewer than
    the shallow ones."""
    sizes = {}
    for name, spec in NETWORKS.items():
        net, _ = reference.init_network(spec, 1, 3)
        sizes[name] = group_size(architecture(net), 32, 3)
    assert min(sizes.values()) >= 10
    assert sizes["deep_bn"] < sizes["deep"] < sizes["shallow_bn"] <= sizes["shallow"]


# -- sensitivity twins: the parameter distance between a base run and its perturbed twin ----------------

def _twin_runs(trainer, spec, perturbation, Xtr, Ytr, steps=200, every=50):
    """Seeds 1 and 2 with their twins (models 2 and 3), statistics every ``every`` steps on the bases."""
    members = [(1, 0.0), (2, 0.0), (1, perturbation), (2, perturbation)]
    nets, gens = zip(*[reference.init_network(spec, seed, 3, w1_perturbation=p) for seed, p in members])
    plan = StatsPlan(every=every, update_every=every, histogram_every=steps, snapshot_steps=(), bins=5,
                     last_step=steps - 1)
    recorders = [StatsRecorder(plan), StatsRecorder(plan), None, None]
    return trainer(list(nets), list(gens), Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE,
                   recorders=recorders, twins={2: 0, 3: 1})


@pytest.mark.parametrize("trainer", [train_batched, reference.train_reference_runs], ids=["batched", "reference"])
def test_a_twin_without_perturbation_stays_at_distance_zero(trainer, splits):
    Xtr, Ytr = splits["splits"]["train"]
    results = _twin_runs(trainer, NETWORKS["shallow_bn"], 0.0, Xtr, Ytr)
    for base in (0, 1):
        steps, distances = results[base].extra["param_distance"]
        assert steps.tolist() == [0, 50, 100, 150, 199] and (distances == 0).all()
    assert all("param_distance" not in results[twin].extra for twin in (2, 3))


def test_a_real_twin_drifts_away_and_both_engines_measure_the_same_drift(splits):
    Xtr, Ytr = splits["splits"]["train"]
    spec = NETWORKS["deep_bn"]
    batched = _twin_runs(train_batched, spec, 1e-3, Xtr, Ytr)
    reference_ = _twin_runs(reference.train_reference_runs, spec, 1e-3, Xtr, Ytr)
    for base in (0, 1):
        steps, distances = batched[base].extra["param_distance"]
        ref_steps, ref_distances = reference_[base].extra["param_distance"]
        assert steps.tolist() == ref_steps.tolist() == [0, 50, 100, 150, 199]
        assert np.isfinite(distances).all() and (distances > 0).all() and distances[-1] > distances[0]
        # step 0 is the perturbation itself: 1e-3 x |W1|, to the float32 rounding of W1 x 1.001 (6e-8 / 1e-3)
        net, _ = reference.init_network(spec, base + 1, 3)
        assert distances[0] == pytest.approx(1e-3 * net.layers["linear1"].weight.norm().item(), rel=1e-4)
        assert distances == pytest.approx(ref_distances, rel=1e-3)


def test_twins_in_different_groups_are_measured_as_in_one(splits):
    Xtr, Ytr = splits["splits"]["train"]

    def split_in_two(*args, **kwargs):
        return train_batched(*args, **kwargs, max_group=2, divergence_check_every=30)

    one = _twin_runs(train_batched, NETWORKS["shallow"], 1e-3, Xtr, Ytr)
    two = _twin_runs(split_in_two, NETWORKS["shallow"], 1e-3, Xtr, Ytr)
    for base in (0, 1):
        assert one[base].extra["param_distance"][1] == pytest.approx(two[base].extra["param_distance"][1], rel=1e-4)


def test_the_benchmark_reads_the_pipelines_names_file_and_says_how_to_get_it(tmp_path, monkeypatch):
    from actgrad.tools import bench

    monkeypatch.chdir(tmp_path)
    args = bench.parse_args(["--quick"])
    assert args.names == "data/names.txt"
    with pytest.raises(SystemExit) as exit_:
        bench.run(args)
    message = str(exit_.value)
    assert "\n" not in message and "snakemake --cores 1 data/names.txt" in message and "--names PATH" in message
