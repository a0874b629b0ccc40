"""Beyond the lecture (issue 19): LayerNorm, GELU and orthogonal weights, in the models, both engines, the config
and the statistics; and the input-output Jacobian's spectrum of a real network."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LECTURE_SEED, REPO, max_param_diff

from actgrad.study import load, settings
from actgrad.training import loop as reference
from actgrad.training.engine import ops, train_batched
from actgrad.training.engine.layout import Layer
from actgrad.training.model import GELU, LayerNorm, jacobian_spectrum, orthogonal_like
from actgrad.training.networks import FIXED_INIT, LECTURE_NETWORKS
from actgrad.training.stats import NetworkHooks, StatsPlan, StatsRecorder, activation_shares

SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 200, "lr": 0.05}]
SHALLOW, SHALLOW_BN = LECTURE_NETWORKS["shallow"], LECTURE_NETWORKS["shallow+BN"]
DEEP, DEEP_BN = LECTURE_NETWORKS["deep"], LECTURE_NETWORKS["deep+BN"]
OPTIONS = {
    "shallow_ln": dict(SHALLOW_BN, batchnorm=False, norm="layernorm"),
    "shallow_ln_bias": dict(SHALLOW, norm="layernorm"),  # a bias before the LayerNorm
    "shallow_gelu": dict(SHALLOW, activation="gelu"),
    "shallow_orthogonal": dict(SHALLOW, init=dict(FIXED_INIT, W1="orthogonal", W2="orthogonal")),
    "deep_ln": dict(DEEP, norm="layernorm"),
    "deep_gelu_bn": dict(DEEP_BN, activation="gelu"),
    # Small, as test_engine's ReLU + BatchNorm net: a ReLU input within rounding of 0 takes a different side of the
    # kink in each engine, and the runs part by more than rounding (seed 7 at 5 x 100: |x| = 2e-7 at step 9).
    "deep_relu_ln": dict(DEEP, norm="layernorm", activation="relu", n_layers=2, n_hidden=64),
    "deep_orthogonal": dict(DEEP, weight_init="orthogonal"),
    "deep_gelu_ln_orthogonal": dict(DEEP, norm="layernorm", activation="gelu", weight_init="orthogonal", gain=1.0),
}


# One thread, as the pipeline trains: small ops with several threads on a busy machine crawl.
pytestmark = pytest.mark.usefixtures("one_thread")


# -- the ops against PyTorch's own ------------------------------------------------------------------------

def test_layernorm_op_is_f_layer_norm_forward_and_backward():
    """The engine's feature-major LayerNorm against F.layer_norm and autograd, for 3 models at once."""
    torch.manual_seed(0)
    M, Fe, B = 3, 7, 5
    x = torch.randn(M, B, Fe, dtype=torch.float64) * 3 + 1
    gamma, beta = torch.randn(M, Fe, dtype=torch.float64), torch.randn(M, Fe, dtype=torch.float64)
    d = torch.randn(M, B, Fe, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    gs, bs = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    ref = torch.stack([F.layer_norm(xs[m], (Fe,), gs[m], bs[m], 1e-5) for m in range(M)])
    ref.backward(d)

    layer = Layer("layernorm", "layernorm1", fan_in=Fe, fan_out=Fe, eps=1e-5, param_shape=(Fe,))
    new = lambda *shape: torch.empty(*shape, dtype=torch.float64)  # noqa: E731
    xin = x.transpose(1, 2).contiguous()  # the engine's (M, features, batch)
    g_grad, b_grad = new(M, Fe, 1), new(M, Fe, 1)
    op = ops.LayerNorm(layer, gamma.unsqueeze(2), g_grad, beta.unsqueeze(2), b_grad, xin, new(M, Fe, B),
                       new(M, Fe, B), *(new(M, 1, B) for _ in range(4)))
    op.forward()
    assert torch.allclose(op.out.transpose(1, 2), ref.detach(), atol=1e-12)
    dx = op.backward(d.transpose(1, 2).contiguous(), None)
    assert torch.allclose(dx.transpose(1, 2), xs.grad, atol=1e-12)
    assert torch.allclose(g_grad.squeeze(2), gs.grad, atol=1e-12)
    assert torch.allclose(b_grad.squeeze(2), bs.grad, atol=1e-12)


def test_gelu_op_is_the_exact_gelu_and_its_backward_is_autogradsbit_for_bit():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4) * 3
    d = torch.randn(2, 6, 4)
    xs = x.clone().requires_grad_()
    ref = F.gelu(xs)
    ref.backward(d)
    op = ops.GELU(Layer("act", "gelu1", flavour="gelu"), x.clone(), torch.empty_like(x), out=torch.empty_like(x))
    op.forward()
    assert torch.equal(op.out, ref.detach()) and torch.equal(op.x, x)  # the input is kept for the backward
    assert torch.equal(op.backward(d, None), xs.grad)
    # the erf form, not the tanh approximation
    erf_form = x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert torch.allclose(op.out, erf_form, atol=1e-6)
    assert not torch.allclose(op.out, F.gelu(x, approximate="tanh"), atol=1e-6)


# -- the models -----------------------------------------------------------------------------------------

def test_orthogonal_weights_are_orthogonal_times_the_gain():
    g = torch.Generator().manual_seed(3)
    square, wide, narrow = (orthogonal_like(torch.randn(shape, generator=g)) for shape in
                            ((50, 50), (30, 100), (100, 27)))
    assert torch.allclose(square.T @ square, torch.eye(50), atol=1e-5)
    assert torch.allclose(square @ square.T, torch.eye(50), atol=1e-5)
    assert torch.allclose(wide @ wide.T, 100 / 30 * torch.eye(30), atol=1e-5)  # orthonormal rows, scaled
    assert torch.allclose(narrow.T @ narrow, torch.eye(27), atol=1e-5)  # orthonormal columns
    # The deep net: gain on every Linear but the last, last_layer_scale on the last; the mlp: gain on W1 and W2.
    net, _ = reference.init_network(dict(DEEP, batchnorm=False, weight_init="orthogonal", gain=1.7), 1, 3)
    W = {name: layer.weight.detach() for name, layer in net.layers.items() if name.startswith("linear")}
    assert torch.allclose(W["linear3"].T @ W["linear3"], 1.7 ** 2 * torch.eye(100), atol=1e-4)
    assert torch.allclose(W["linear1"] @ W["linear1"].T, 1.7 ** 2 * 100 / 30 * torch.eye(30), atol=1e-4)
    assert torch.allclose(W["linear6"].T @ W["linear6"], 0.1 ** 2 * torch.eye(27), atol=1e-6)
    mlp, _ = reference.init_network(dict(SHALLOW, init=dict(FIXED_INIT, W2="orthogonal"), gain=2.0), 1, 3)
    W2 = mlp.layers["linear2"].weight.detach()
    assert torch.allclose(W2.T @ W2, 4.0 * torch.eye(27), atol=1e-4)


def test_orthogonal_draws_leave_the_random_stream_where_it_was():
    for gaussian, orthogonal in ((DEEP, dict(DEEP, weight_init="orthogonal")),
                                 (SHALLOW, dict(SHALLOW, init=dict(FIXED_INIT, W1="orthogonal")))):
        a, ga = reference.init_network(gaussian, LECTURE_SEED, 3)
        b, gb = reference.init_network(orthogonal, LECTURE_SEED, 3)
        assert torch.equal(ga.get_state(), gb.get_state())  # the minibatches are the same
        assert torch.equal(a.layers["embedding"].weight, b.layers["embedding"].weight)
        assert not torch.equal(a.layers["linear1"].weight, b.layers["linear1"].weight)


def test_norm_key_builds_the_networks_batchnorm_builds_and_layernorm_where_batchnorm_was():
    for spec in (SHALLOW_BN, DEEP_BN):
        old, _ = reference.init_network(spec, 5, 3)
        without_flag = {k: v for k, v in spec.items() if k != "batchnorm"}
        new, _ = reference.init_network(dict(without_flag, norm="batchnorm"), 5, 3)
        assert old.state_dict().keys() == new.state_dict().keys()
        assert all(torch.equal(old.state_dict()[k], new.state_dict()[k]) for k in old.state_dict())
    deep_ln, _ = reference.init_network(dict(DEEP_BN, batchnorm=False, norm="layernorm"), 5, 3)
    names = list(deep_ln.layers)
    assert names[:4] == ["embedding", "linear1", "layernorm1", "tanh1"] and names[-2:] == ["linear6", "layernorm6"]
    assert all(deep_ln.layers[n].bias is None for n in names if n.startswith("linear"))  # the norm's shift instead
    assert torch.equal(deep_ln.layers["layernorm6"].gamma, torch.full((27,), 0.1))  # last_layer_scale
    assert not deep_ln.batchnorm_layers() and len(deep_ln.layernorm_layers()) == 6
    shallow_ln, _ = reference.init_network(dict(SHALLOW, norm="layernorm"), 5, 3)
    assert list(shallow_ln.layers) == ["embedding", "linear1", "layernorm1", "tanh1", "linear2"]
    # LayerNorm is F.layer_norm, per example: the same in training and evaluation, examples independent
    x = torch.randn(8, 200) * 4 + 2
    ln = shallow_ln.layers["layernorm1"]
    assert torch.equal(ln(x), F.layer_norm(x, (200,), ln.gamma, ln.beta, 1e-5))
    assert torch.equal(ln.eval()(x)[:3], ln(x[:3]))


# -- the config -----------------------------------------------------------------------------------------

def _config(**variant):
    return {"names_url": "x", "names_sha256": "0" * 64, "seeds": [1], "variants": {"v": variant}}


def test_the_schema_takes_the_new_keys_and_variant_spec_gives_one_answer():
    config = settings.apply_defaults(_config(model="deep", norm="layernorm", activation="gelu",
                                             weight_init="orthogonal"))
    settings.validate(config)
    spec = settings.variant_spec(config, "v")
    assert (spec["norm"], spec["batchnorm"], spec["activation"], spec["weight_init"]) == (
        "layernorm", False, "gelu", "orthogonal")
    for variant, norm in ((dict(model="deep"), "batchnorm"), (dict(model="deep", batchnorm=False), "none"),
                          (dict(model="mlp"), "none"), (dict(model="mlp", batchnorm=True), "batchnorm"),
                          (dict(model="mlp", norm="batchnorm", batchnorm=True), "batchnorm"),
                          (dict(model="mlp", norm="layernorm", batchnorm=False), "layernorm")):
        config = _config(**variant)
        settings.validate(config)
        spec = settings.variant_spec(settings.apply_defaults(config), "v")
        assert (spec["norm"], spec["batchnorm"]) == (norm, norm == "batchnorm"), variant
    config = _config(model="mlp", init={"W1": "orthogonal", "W2": "orthogonal"})
    settings.validate(config)


def test_the_default_study_is_unchanged_but_for_the_new_keys():
    config = load.load(REPO / "config" / "config.yaml")
    for name in config["variants"]:
        spec = settings.variant_spec(config, name)
        assert spec["norm"] == ("batchnorm" if spec["batchnorm"] else "none")
        assert spec.get("weight_init", "gaussian") == "gaussian" and spec["activation"] in ("tanh", "relu")


@pytest.mark.parametrize("variant, message", [
    (dict(model="deep", batchnorm=True, norm="layernorm"), "variants/v/batchnorm: batchnorm: true contradicts norm"),
    (dict(model="mlp", batchnorm=False, norm="batchnorm"), "variants/v/batchnorm: batchnorm: false contradicts norm"),
    (dict(model="mlp", weight_init="orthogonal"), "variants/v/weight_init: only a 'deep' model has weight_init"),
    (dict(model="deep", norm="groupnorm"), "variants/v/norm: 'groupnorm' is not one of"),
    (dict(model="deep", activation="swish"), "variants/v/activation: 'swish' is not one of"),
    (dict(model="deep", weight_init="uniform"), "variants/v/weight_init: 'uniform' is not one of"),
    (dict(model="mlp", init={"C": "orthogonal"}), "variants/v/init/C: 'orthogonal' is not allowed"),
    (dict(model="mlp", init={"b1": "orthogonal"}), "variants/v/init/b1: 'orthogonal' is not allowed"),
], ids=["bn_true_ln", "bn_false_bn", "mlp_weight_init", "norm", "activation", "weight_init", "C", "b1"])
def test_bad_combinations_are_one_line_naming_the_key(variant, message):
    with pytest.raises(settings.ConfigError) as err:
        settings.validate(_config(**variant))
    lines = [line.strip() for line in str(err.value).splitlines() if line.strip() != "invalid config:"]
    assert len(lines) == 1 and lines[0].startswith(message), str(err.value)


# -- both engines ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_in_the_batched_engine_as_in_the_reference(name, kernels, splits):
    """300 steps from init, two seeds side by side: losses and parameters within float rounding."""
    from actgrad.training import kernels as c_kernels

    if kernels and c_kernels.load() is None:
        pytest.skip("no C compiler: the C-kernel build is tested in test_kernels")
    Xtr, Ytr = splits["splits"]["train"]
    spec, steps = OPTIONS[name], 300
    nets, gens = map(list, zip(*[reference.init_network(spec, seed, 3) for seed in (LECTURE_SEED, 7)]))
    results = train_batched(nets, gens, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE,
                            kernels=kernels)
    for seed, res, net, g in zip((LECTURE_SEED, 7), results, nets, gens):
        ref_net, ref_g = reference.init_network(spec, seed, 3)
        ref = reference.train_reference(ref_net, ref_g, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE)
        assert res.steps_done == ref.steps_done == steps
        assert (res.losses - ref.losses).abs().max().item() < 1e-5
        assert res.losses[-50:].mean() < res.losses[0] - 0.3  # it trained
        assert max_param_diff(net, ref_net) < 1e-5
        assert torch.equal(g.get_state(), ref_g.get_state())
    assert results[0].extra.get("kernels") == ("C" if kernels else "PyTorch")


# -- statistics that fit the activation ----------------------------------------------------------------

def test_relu_and_gelu_record_the_share_at_or_below_zero_and_units_dead_for_the_whole_batch():
    plan = StatsPlan(every=1, update_every=1, histogram_every=100, snapshot_steps=(), bins=5)
    out = torch.tensor([[0.0, 0.5, -0.1, 2.0], [0.0, -0.2, -0.05, 1.0], [0.0, 0.3, -0.1, 0.0]])
    for function in ("relu", "gelu"):
        rec = StatsRecorder(plan, activation_range=None)
        rec.activation(0, f"{function}1", out, function)
        stats = rec.stats_frame().set_index("stat").value
        assert list(stats.index) == ["mean", "std", "nonpositive_pct", "dead_units"]
        assert stats["nonpositive_pct"] == pytest.approx(100 * 8 / 12)
        assert stats["dead_units"] == 2  # units 0 and 2: at or below zero for every example
        assert torch.equal(rec.saturation_maps[f"{function}1"], out <= 0)
    # tanh keeps the lecture's saturation, and its dead units are saturated for every example
    rec = StatsRecorder(plan)
    rec.activation(0, "tanh1", torch.tensor([[0.995, -0.2], [-0.999, 0.98]]))
    stats = rec.stats_frame().set_index("stat").value
    assert list(stats.index) == ["mean", "std", "saturated_pct", "saturated99_pct", "dead_units"]
    assert (stats["saturated_pct"], stats["saturated99_pct"], stats["dead_units"]) == (75.0, 50.0, 1.0)
    assert activation_shares("tanh") == ("sat97", "sat99")
    assert activation_shares("relu") == activation_shares("gelu") == ("nonpositive",)


@pytest.mark.parametrize("name", ["deep_gelu_ln_orthogonal", "shallow_gelu"])
def test_statistics_of_a_gelu_net_match_between_the_engines(name, splits):
    Xtr, Ytr = splits["splits"]["train"]
    steps = 41

    def plan():
        return StatsPlan(every=20, update_every=10, histogram_every=20, snapshot_steps=(0,), bins=10,
                         last_step=steps - 1)

    spec = OPTIONS[name]
    ref_rec = StatsRecorder(plan(), activation_range=None)
    net, g = reference.init_network(spec, LECTURE_SEED, 3)
    hooks = NetworkHooks(net, ref_rec)
    reference.train_reference(net, g, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE, callbacks=[hooks])
    rec = StatsRecorder(plan(), activation_range=None)
    nets, gens = map(list, zip(*[reference.init_network(spec, LECTURE_SEED, 3)]))
    train_batched(nets, gens, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=SCHEDULE, recorders=[rec])
    ours, theirs = (r.stats_frame().set_index(["step", "layer", "kind", "stat"]).value for r in (rec, ref_rec))
    assert list(ours.index) == list(theirs.index)
    assert "nonpositive_pct" in set(ours.index.get_level_values("stat"))
    assert "saturated_pct" not in set(ours.index.get_level_values("stat"))
    assert ours.values == pytest.approx(theirs.values, rel=1e-3, abs=1e-4)
    for layer, smap in rec.saturation_maps.items():
        assert (smap != ref_rec.saturation_maps[layer]).float().mean() < 0.001


# -- the input-output Jacobian ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deep_ln", "deep_gelu_bn", "shallow_ln_bias"])
def test_jacobian_spectrum_is_that_of_each_examples_jacobian(name, splits):
    Xtr, _ = splits["splits"]["train"]
    X = Xtr[:32]
    net, _ = reference.init_network(OPTIONS[name], 3, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spectrum = jacobian_spectrum(net, X)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # By hand: each example alone through the layers after the embedding, BatchNorm at the batch's statistics.
    layers = list(net.layers.values())
    with torch.no_grad():
        emb = layers[0](X)
        stats = {}
        h = emb
        for layer in layers[1:]:
            if hasattr(layer, "running_mean"):
                stats[id(layer)] = (h.mean(0), h.var(0))
            h = layer(h) if not hasattr(layer, "running_mean") else (
                layer.gamma * (h - h.mean(0)) / torch.sqrt(h.var(0) + layer.eps) + layer.beta)

    def one(e):
        h = e.unsqueeze(0)
        for layer in layers[1:]:
            if id(layer) in stats:
                mean, var = stats[id(layer)]
                h = layer.gamma * (h - mean) / torch.sqrt(var + layer.eps) + layer.beta
            else:
                h = layer(h)
        return h.squeeze(0)

    svs = torch.cat([torch.linalg.svdvals(torch.autograd.functional.jacobian(one, e).double()) for e in emb])
    assert svs.numel() == 32 * 27
    assert spectrum["mean"] == pytest.approx(svs.mean().item(), rel=1e-4)
    assert spectrum["std"] == pytest.approx(svs.std().item(), rel=1e-3)
    assert spectrum["max"] == pytest.approx(svs.max().item(), rel=1e-4)
    assert spectrum["min"] == pytest.approx(svs.min().item(), rel=1e-3, abs=1e-7)
    assert spectrum["mean_sq"] == pytest.approx((svs ** 2).mean().item(), rel=1e-4)


def test_orthogonal_weights_narrow_the_jacobian_spectrum(splits):
    """Pennington et al. 2017: at gain 1, orthogonal weights spread the singular values less than Gaussian ones."""
    Xtr, _ = splits["splits"]["train"]
    spreads = {}
    for weights in ("gaussian", "orthogonal"):
        rel = []
        for seed in range(4):
            net, _ = reference.init_network(dict(DEEP, gain=1.0, last_layer_scale=1.0, weight_init=weights), seed, 3)
            s = jacobian_spectrum(net, Xtr[32 * seed:32 * (seed + 1)])
            rel.append(s["std_sq"] / s["mean_sq"])
        spreads[weights] = sum(rel) / len(rel)
    assert spreads["orthogonal"] < 0.8 * spreads["gaussian"], spreads


def test_layernorm_and_gelu_modules_are_what_the_engine_recognises():
    from actgrad.training.engine import architecture

    net, _ = reference.init_network(OPTIONS["deep_gelu_ln_orthogonal"], 1, 3)
    arch = architecture(net)
    assert [L.kind for L in arch[1:4]] == ["linear", "layernorm", "act"] and arch[3].flavour == "gelu"
    assert isinstance(net.layers["gelu1"], GELU) and isinstance(net.layers["layernorm1"], LayerNorm)
