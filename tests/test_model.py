"""The networks start where the lecture's start, and train the way the lecture's train."""

import math

import pytest
import torch
from conftest import LECTURE_SEED, REPO

from actgrad.study import load, settings
from actgrad.training import evaluation, lecture
from actgrad.training import loop as reference
from actgrad.training.divergence import DivergenceRule
from actgrad.training.model import BatchNorm1d, Scratch

DEFAULT = load.load(REPO / "config" / "config.yaml")
EXPECTED = -math.log(1 / 27)


def spec(name, **changes):
    s = settings.variant_spec(DEFAULT, name)
    s.update(changes)
    if "batchnorm" in changes and "norm" not in changes:  # the spec's two spellings of the norm agree
        s["norm"] = "batchnorm" if changes["batchnorm"] else "none"
    return s


def test_a_spec_whose_norm_and_batchnorm_disagree_builds_nothing():
    with pytest.raises(ValueError, match="batchnorm: False contradicts norm: batchnorm"):
        reference.init_network(dict(settings.variant_spec(DEFAULT, "deep_bn_gain1"), batchnorm=False), 1, 3)


def first_loss(s, splits, seed=LECTURE_SEED):
    net, g = reference.init_network(s, seed, 3)
    Xtr, Ytr = splits["splits"]["train"]
    return reference.train_reference(net, g, Xtr, Ytr, steps=1, batch_size=32, lr_schedule=s["lr_schedule"]).losses[0]


def test_initial_losses_of_the_default_variants(splits):
    losses = {name: first_loss(spec(name), splits).item() for name in DEFAULT["variants"]}
    assert losses["original"] > 20  # confidently wrong: 27.88 with the lecture's seed
    for name, loss in losses.items():
        if name != "original":
            assert abs(loss - EXPECTED) < 0.1, (name, loss)
    # The lecture's printed step-0 losses
    assert round(losses["original"], 4) == 27.8817
    assert round(losses["batchnorm"], 4) == 3.3239


@pytest.mark.parametrize("name, lecture_kwargs", [
    ("original", {}),
    ("fix_softmax", dict(W2_scale=0.01, b2_scale=0)),
    ("fix_tanh", dict(W1_scale=0.2, b1_scale=0.01, W2_scale=0.01, b2_scale=0)),
    ("kaiming", dict(kaiming_gain=5 / 3, b1_scale=0.01, W2_scale=0.01, b2_scale=0)),
    ("batchnorm", dict(batchnorm=True, hidden_bias="not_drawn", kaiming_gain=5 / 3, W2_scale=0.01, b2_scale=0)),
])
def test_mlp_training_is_bit_for_bit_the_lectures(name, lecture_kwargs, splits):
    Xtr, Ytr = splits["splits"]["train"]
    ref, ref_params = lecture.mlp_loop(Xtr, Ytr, steps=200, **lecture_kwargs)
    s = spec(name)
    net, g = reference.init_network(s, LECTURE_SEED, 3)
    res = reference.train_reference(net, g, Xtr, Ytr, steps=200, batch_size=32, lr_schedule=s["lr_schedule"])
    assert torch.equal(res.losses, torch.tensor(ref))
    assert torch.equal(net.layers["linear1"].weight.data, ref_params["W1"].data)
    if s["batchnorm"]:
        bn = net.layers["batchnorm1"]
        assert torch.equal(bn.running_mean, ref_params["bnmean_running"])
        assert torch.equal(bn.running_spread, ref_params["bnstd_running"])


@pytest.mark.parametrize("batchnorm, gain", [(True, 1.0), (False, 5 / 3), (False, 0.5)])
def test_deep_training_is_bit_for_bit_the_lectures(batchnorm, gain, splits):
    Xtr, Ytr = splits["splits"]["train"]
    ref, C, layers = lecture.deep_loop(Xtr, Ytr, steps=50, batchnorm=batchnorm, gain=gain)
    s = spec("deep_bn_gain1", batchnorm=batchnorm, gain=gain)
    net, g = reference.init_network(s, LECTURE_SEED, 3)
    res = reference.train_reference(net, g, Xtr, Ytr, steps=50, batch_size=32, lr_schedule=s["lr_schedule"])
    assert torch.equal(res.losses, torch.tensor(ref))
    assert torch.equal(net.layers["embedding"].weight.data, C.data)
    assert torch.equal(net.layers["linear6"].weight.data, layers[-2 if batchnorm else -1].weight.data)
    if batchnorm:
        assert torch.equal(net.layers["batchnorm6"].running_spread.flatten(), layers[-1].running_var.flatten())


def test_hidden_bias_settings_and_the_random_stream():
    base = spec("fix_tanh")
    nets = {mode: reference.init_network(dict(base, hidden_bias=mode), LECTURE_SEED, 3)[0]
            for mode in ("added", "drawn_not_added", "not_drawn")}
    added, unused, absent = (nets[m].layers for m in ("added", "drawn_not_added", "not_drawn"))
    # (a) and (b) draw identical parameters; (b) keeps b1 but neither adds nor trains it.
    assert torch.equal(added["linear2"].weight, unused["linear2"].weight)
    assert torch.equal(added["linear1"].bias, unused["linear1"].unused_bias)
    assert unused["linear1"].bias is None
    assert "layers.linear1.bias" not in dict(nets["drawn_not_added"].named_parameters())
    # (c) draws W2 from where (a) draws b1.
    g = torch.Generator().manual_seed(LECTURE_SEED)
    torch.randn((27, 10), generator=g)
    torch.randn((30, 200), generator=g)
    b1_draw = torch.randn(200, generator=g)
    g2 = torch.Generator().manual_seed(LECTURE_SEED)
    torch.randn((27, 10), generator=g2)
    torch.randn((30, 200), generator=g2)
    w2_draw = torch.randn((200, 27), generator=g2)
    assert torch.equal(added["linear1"].bias, b1_draw * 0.01)
    assert torch.equal(absent["linear2"].weight, w2_draw * 0.01)
    assert w2_draw.flatten()[0] == b1_draw[0]  # the same point of the random stream
    # The default batchnorm variant is (c), as the notebook's.
    assert spec("batchnorm")["hidden_bias"] == "not_drawn"


def test_batchnorm_forward_and_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(32, 5) * 3 + 2
    for flavour, spread_fn in (("std", lambda t: t.std(0)), ("var", lambda t: t.var(0))):
        bn = BatchNorm1d(5, momentum=0.1, eps=1e-5 if flavour == "var" else 0.0, normalize_by=flavour)
        out = bn(x)
        assert torch.allclose(out.mean(0), torch.zeros(5), atol=1e-5)
        assert torch.allclose(out.std(0), torch.ones(5), atol=1e-3)
        assert torch.allclose(bn.running_mean.flatten(), 0.1 * x.mean(0), atol=1e-6)
        assert torch.allclose(bn.running_spread.flatten(), 0.9 + 0.1 * spread_fn(x), atol=1e-6)
        bn.eval()
        frozen = bn.running_mean.clone()
        bn(x)
        assert torch.equal(bn.running_mean, frozen)  # evaluation does not update the statistics
    with pytest.raises(ValueError, match="normalize_by"):
        BatchNorm1d(5, momentum=0.1, normalize_by="l2")


def test_calibration_matches_the_lectures_pass_over_the_training_split(splits):
    Xtr, _ = splits["splits"]["train"]
    s = spec("batchnorm")
    net, _ = reference.init_network(s, LECTURE_SEED, 3)
    net.calibrate_batchnorm(Xtr)
    with torch.no_grad():
        hpreact = net.layers["embedding"](Xtr) @ net.layers["linear1"].weight
    bn = net.layers["batchnorm1"]
    assert torch.equal(bn.running_mean, hpreact.mean(0, keepdim=True))
    assert torch.equal(bn.running_spread, hpreact.std(0, keepdim=True))


@pytest.mark.parametrize("variant", ["batchnorm", "deep_bn_gain1"])
def test_calibration_in_chunks_gives_the_same_statistics_and_logits(variant, splits):
    Xtr, _ = splits["splits"]["train"]
    X = Xtr[:20000]
    whole, _ = reference.init_network(spec(variant), LECTURE_SEED, 3)
    chunked, _ = reference.init_network(spec(variant), LECTURE_SEED, 3)
    logits = whole.calibrate_batchnorm(X)
    logits_chunked = chunked.calibrate_batchnorm(X, chunk=3000)  # not a divisor of the rows
    assert torch.equal(logits, logits_chunked)
    for (_, a), (_, b) in zip(whole.batchnorm_layers(), chunked.batchnorm_layers()):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_spread, b.running_spread)


def test_evaluations_sharing_a_scratch_give_what_fresh_ones_give(splits):
    Xtr, Ytr = splits["splits"]["train"]
    X, Y = Xtr[:20000], Ytr[:20000]  # more rows than one chunk
    scratch = Scratch()
    for seed in (LECTURE_SEED, 1):
        fresh, _ = reference.init_network(spec("deep_bn_gain1"), seed, 3)
        shared, _ = reference.init_network(spec("deep_bn_gain1"), seed, 3)
        assert evaluation.evaluate(fresh, X, Y, calibrate=True) == evaluation.evaluate(shared, X, Y, calibrate=True,
                                                                             scratch=scratch)
        assert evaluation.evaluate(fresh, X[:9000], Y[:9000]) == evaluation.evaluate(shared, X[:9000], Y[:9000],
                                                                           scratch=scratch)
        for (_, a), (_, b) in zip(fresh.batchnorm_layers(), shared.batchnorm_layers()):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_spread, b.running_spread)
        assert torch.equal(fresh.calibrate_batchnorm(X, chunk=3000),
                           shared.calibrate_batchnorm(X, chunk=3000, scratch=scratch))


def _activation_values(net, X) -> torch.Tensor:
    """Every activation layer's output on ``X`` in evaluation mode, flattened and joined (through forward hooks,
    independently of evaluate())."""
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append(o)) for _, layer in net.activation_layers()]
    with torch.no_grad():
        net.eval()(X)
    for h in handles:
        h.remove()
    return torch.cat([o.flatten() for o in outs])


def test_saturation_is_the_share_of_activations_above_each_threshold(splits):
    Xtr, Ytr = splits["splits"]["train"]
    X, Y = Xtr[:20000], Ytr[:20000]
    net, _ = reference.init_network(spec("deep_gain3"), LECTURE_SEED, 3)
    with torch.no_grad():
        net.layers["embedding"].weight[5, 3] = float("nan")  # NaN is above no threshold
    _, sat = evaluation.evaluate(net, X, Y, saturation=(0.97, 0.99))
    magnitude = _activation_values(net, X).abs()
    assert magnitude.isnan().any()
    assert sat == {t: 100.0 * int((magnitude > t).sum()) / magnitude.numel() for t in (0.97, 0.99)}
    # At the threshold itself (as a float32) and around it
    edge = torch.tensor([0.97, 0.9700001, 0.96999997, float("inf"), float("nan"), -1.0])
    assert evaluation._count(edge, torch.gt, 0.97, torch.empty_like(edge)) == int((edge > 0.97).sum()) == 2
    assert evaluation._count(edge, torch.le, 0.97, torch.empty_like(edge)) == int((edge <= 0.97).sum()) == 3
    # The same shares by name, and a ReLU net's share at or below zero
    _, named = evaluation.evaluate(net, X, Y, shares=("sat97", "sat99"))
    assert named == {"sat97": sat[0.97], "sat99": sat[0.99]}
    relu, _ = reference.init_network(spec("deep_gain3", activation="relu"), LECTURE_SEED, 3)
    values = _activation_values(relu, X)
    _, shares = evaluation.evaluate(relu, X, Y, shares=("nonpositive",))
    assert shares == {"nonpositive": 100.0 * int((values <= 0).sum()) / values.numel()}
    assert 40 < shares["nonpositive"] < 60  # about half of a ReLU net's units are off at init
    with pytest.raises(ValueError, match="nonnegative"):
        evaluation.evaluate(relu, X, Y, shares=("nonnegative",))


def test_learning_rate_schedule():
    schedule = [{"from_step": 0, "lr": 0.1}, {"from_step": 100000, "lr": 0.01}]
    assert reference.learning_rate(schedule, 99999) == 0.1
    assert reference.learning_rate(schedule, 100000) == 0.01


def test_divergence_stops_the_run_and_names_the_step_and_the_rule(splits):
    Xtr, Ytr = splits["splits"]["train"]
    s = spec("fix_tanh", lr_schedule=[{"from_step": 0, "lr": 1e4}])
    net, g = reference.init_network(s, LECTURE_SEED, 3)
    rule = DivergenceRule(loss_multiple=10, window=20)
    res = reference.train_reference(net, g, Xtr, Ytr, steps=1000, batch_size=32, lr_schedule=s["lr_schedule"],
                                divergence_check_every=10, divergence=rule)
    assert res.diverged_at is not None and res.diverged_at < 1000
    assert res.steps_done == res.diverged_at + 1 == len(res.losses)
    assert res.diverged_rule == rule.window_rule
    assert (res.losses[-rule.window:] > rule.loss_limit).all() and torch.isfinite(res.losses).all()


@pytest.mark.parametrize("batch_size", [32, 7])
def test_the_loss_with_each_minibatchs_statistics_is_the_loss_of_training_mode_minibatch_by_minibatch(batch_size):
    """batch_statistics_loss runs every minibatch in one pass; here the same, one minibatch at a time in
    training mode, as written in the lecture (the last, shorter minibatch counts too)."""
    import torch.nn.functional as F

    from actgrad.training.evaluation import BATCH_STATS_ORDER_SEED, batch_statistics_loss, kept_running_stats
    from actgrad.training.loop import init_network
    from actgrad.training.networks import LECTURE_NETWORKS

    g = torch.Generator().manual_seed(3)
    X, Y = torch.randint(0, 27, (1000, 3), generator=g), torch.randint(0, 27, (1000,), generator=g)
    for name in ("shallow+BN", "deep+BN"):
        net, _ = init_network(LECTURE_NETWORKS[name], 1, 3)
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(BATCH_STATS_ORDER_SEED))
        total = 0.0
        with torch.no_grad(), kept_running_stats(net):
            net.train()
            for start in range(0, len(X), batch_size):
                ix = order[start:start + batch_size]
                total += F.cross_entropy(net(X[ix]), Y[ix], reduction="sum").item()
        running = [bn.running_mean.clone() for _, bn in net.batchnorm_layers()]
        assert batch_statistics_loss(net, X, Y, batch_size) == pytest.approx(total / len(X), rel=1e-6)
        assert all(torch.equal(a, bn.running_mean) for a, (_, bn) in zip(running, net.batchnorm_layers()))
