"""The mean-field theory against values worked out by hand, closed forms, Monte Carlo nets and the project's own net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actgrad.results import theory

LECTURE_SEED = 2147483647

# Worked out by hand for the deep tanh net (input second moment 1, no BatchNorm, zero bias), layers 1-5.
HAND_ACTIVATION_STD = {
    0.5: [0.417, 0.200, 0.099, 0.049, 0.025],
    5 / 3: [0.759, 0.693, 0.669, 0.659, 0.654],
    3.0: [0.863, 0.842, 0.838, 0.837, 0.837],
}
HAND_SATURATION_PCT_5_3 = [20.9, 9.8, 7.0, 6.0, 5.7]


@pytest.mark.parametrize("gain", sorted(HAND_ACTIVATION_STD))
def test_tanh_activation_std_matches_the_hand_worked_values(gain):
    layers = theory.propagate(5, gain, "tanh", input_second_moment=1.0)
    assert [p.layer for p in layers] == [1, 2, 3, 4, 5]
    assert [p.activation_std for p in layers] == pytest.approx(HAND_ACTIVATION_STD[gain], abs=6e-4)


def test_tanh_saturation_matches_the_hand_worked_values():
    layers = theory.propagate(5, 5 / 3, "tanh")
    assert [100 * p.saturation for p in layers] == pytest.approx(HAND_SATURATION_PCT_5_3, abs=0.06)


def test_quadrature_agrees_with_adaptive_integration():
    from scipy.integrate import quad

    for q in (0.01, 1.0, 9.0, 25.0):
        exact = quad(lambda z, q=q: np.tanh(math.sqrt(q) * z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                     -40, 40, limit=400, points=[0.0])[0]
        assert float(theory.activation_second_moment("tanh", q)) == pytest.approx(exact, rel=1e-8)
        sat = quad(lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi), math.atanh(0.97) / math.sqrt(q), 60)[0]
        assert float(theory.saturation_share(q)) == pytest.approx(2 * sat, rel=1e-8)


def test_relu_length_halves_at_gain_1_and_holds_at_sqrt_2():
    q1 = [p.q for p in theory.propagate(6, 1.0, "relu", input_second_moment=1.0)]
    assert q1 == pytest.approx([1 / 2 ** k for k in range(6)], rel=1e-12)
    q2 = [p.q for p in theory.propagate(6, math.sqrt(2), "relu", input_second_moment=1.0)]
    assert q2 == pytest.approx([2.0] * 6, rel=1e-12)
    assert theory.critical_gain("relu") == pytest.approx(math.sqrt(2), rel=1e-9)
    assert theory.chi_1(1.0, "relu") == pytest.approx(0.5)
    # ReLU's closed forms agree with the quadrature the other activations use.
    def relu(x):
        return np.maximum(x, 0.0)

    for q in (0.3, 2.0):
        assert float(theory.activation_second_moment("relu", q)) == pytest.approx(
            float(theory.gaussian_expectation(lambda x: relu(x) ** 2, q)), rel=1e-3)
        assert float(theory.activation_mean("relu", q)) == pytest.approx(
            float(theory.gaussian_expectation(relu, q)), rel=1e-2)  # a kink: quadrature to ~0.5 %


def test_fixed_point_and_the_order_to_chaos_boundary():
    # Without bias, tanh's boundary is gain 1: q* = 0 below it (ordered), q* > 0 above it (chaotic).
    assert theory.critical_gain("tanh") == pytest.approx(1.0, abs=1e-6)
    assert theory.fixed_point(0.8, "tanh") == 0.0
    assert theory.chi_1(0.8, "tanh") == pytest.approx(0.64)
    q_star = theory.fixed_point(5 / 3, "tanh")
    assert float(theory.length_map(q_star, 5 / 3, "tanh")) == pytest.approx(q_star, rel=1e-10)
    assert theory.chi_1(5 / 3, "tanh") > 1  # the lecture's gain is on the chaotic side, where gradients grow
    # With bias variance 0.05 the boundary moves to gain ~1.33 (Schoenholz et al.'s Fig. 1: sigma_w^2 ~ 1.76).
    g_c = theory.critical_gain("tanh", bias_var=0.05)
    assert 1.30 < g_c < 1.36
    assert theory.chi_1(g_c, "tanh", bias_var=0.05) == pytest.approx(1.0, abs=1e-6)
    # The correlation depth scale diverges at the boundary and is finite on both sides.
    near = theory.depth_scales(g_c * 1.001, "tanh", bias_var=0.05)[1]
    far = theory.depth_scales(g_c * 1.3, "tanh", bias_var=0.05)[1]
    ordered = theory.depth_scales(g_c * 0.7, "tanh", bias_var=0.05)[1]
    assert near > 10 * far and near > 10 * ordered


def test_gelu_goes_through_the_quadrature_and_its_boundary_keeps_q():
    g_c = theory.critical_gain("gelu")
    # With no bias GELU's chi_1 jumps where one layer maps q0 = 1 to itself.
    assert float(theory.length_map(1.0, g_c, "gelu")) == pytest.approx(1.0, abs=1e-6)
    assert theory.chi_1(g_c * 0.99, "gelu") < 1 < theory.chi_1(g_c * 1.01, "gelu")


def test_normalisation_before_the_nonlinearity_makes_the_gain_irrelevant():
    by_gain = [theory.propagate(5, g, "tanh", norm="batchnorm") for g in (0.5, 5 / 3, 3.0)]
    for layers in by_gain:
        assert [p.q for p in layers] == [1.0] * 5
        assert [p.grad_std_rel_last for p in layers] == pytest.approx(
            [p.grad_std_rel_last for p in by_gain[0]])
    assert [p.q for p in theory.propagate(3, 4.0, "gelu", norm="layernorm")] == [1.0] * 3


def _wide_nets(gain, activation, width=600, depth=5, batch=100, nets=6, seed=0, batchnorm=False):
    """Forward and backward through ``nets`` wide random nets: per-layer statistics averaged over the nets.

    Averaging over independent draws matters for ReLU and GELU: their examples become correlated
    layer by layer, so one draw's batch shares one random fluctuation of the length.
    """
    g = torch.Generator().manual_seed(seed)
    fn = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    sums = np.zeros((depth, 6))
    for _ in range(nets):
        x = torch.randn((batch, width), generator=g, dtype=torch.float32, requires_grad=True)
        pres, acts = [], []
        for _ in range(depth):
            w = torch.randn((width, width), generator=g, dtype=torch.float32) * gain / math.sqrt(width)
            h = x @ w
            if batchnorm:
                h = (h - h.mean(0)) / torch.sqrt(h.var(0) + 1e-5)
            x = fn(h)
            x.retain_grad()
            pres.append(h)
            acts.append(x)
        # Backward a top gradient independent of the forward pass (the theory's assumption).
        acts[-1].backward(torch.randn(acts[-1].shape, generator=g, dtype=torch.float32))
        for i, (h, a) in enumerate(zip(pres, acts)):
            sums[i] += [h.pow(2).mean().item(), a.pow(2).mean().item(), a.mean().item(),
                        (a.abs() > theory.SATURATION).double().mean().item(), a.grad.pow(2).mean().item(), 0]
    mean = sums / nets
    return {"pre_std": np.sqrt(mean[:, 0]), "act_std": np.sqrt(mean[:, 1] - mean[:, 2] ** 2), "act_mean": mean[:, 2],
            "saturation": mean[:, 3], "grad_rel_last": np.sqrt(mean[:, 4] / mean[-1, 4])}


@pytest.mark.parametrize("activation,gain", [("tanh", 0.5), ("tanh", 5 / 3), ("tanh", 3.0), ("relu", math.sqrt(2)),
                                             ("gelu", 1.7)])
def test_matches_a_monte_carlo_wide_net(activation, gain):
    measured = _wide_nets(gain, activation)
    pred = theory.propagate(5, gain, activation, input_second_moment=1.0)
    assert measured["pre_std"] == pytest.approx([p.preactivation_std for p in pred], rel=0.03)
    assert measured["act_std"] == pytest.approx([p.activation_std for p in pred], rel=0.03)
    assert measured["act_mean"] == pytest.approx([p.activation_mean for p in pred], rel=0.04, abs=0.01)
    assert measured["grad_rel_last"] == pytest.approx([p.grad_std_rel_last for p in pred], rel=0.04)
    if activation == "tanh":
        assert measured["saturation"] == pytest.approx([p.saturation for p in pred], abs=0.01)


def test_batchnorm_gradients_match_a_wide_net_with_real_batch_statistics():
    # Wide, with independent inputs and real batch statistics over 64 examples: the gain drops out.
    pred = theory.propagate(5, 3.0, "tanh", norm="batchnorm")
    for gain in (0.5, 3.0):
        measured = _wide_nets(gain, "tanh", batch=64, nets=4, batchnorm=True, seed=1)
        assert measured["pre_std"] == pytest.approx([1.0] * 5, rel=0.01)
        assert measured["act_std"] == pytest.approx([p.activation_std for p in pred], rel=0.02)
        assert measured["grad_rel_last"] == pytest.approx([p.grad_std_rel_last for p in pred], rel=0.04)


def test_predict_network_speaks_the_statistics_vocabulary():
    from actgrad.study.settings import MODEL_DEFAULTS
    from actgrad.training.model import build_network
    from actgrad.training.stats import DEAD, SATURATION, NetworkHooks, StatsPlan, StatsRecorder

    assert (theory.SATURATION, theory.DEAD) == (SATURATION, DEAD)
    spec = dict(MODEL_DEFAULTS["deep"], model="deep", batchnorm=False, gain=5 / 3, n_layers=3, n_hidden=16,
                batch_size=32)
    net = build_network(spec, torch.Generator().manual_seed(1), 3)
    recorder = StatsRecorder(StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=(0,),
                                        bins=10, last_step=0))
    hooks = NetworkHooks(net, recorder)
    hooks.before_step(0)
    x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    net.loss(x, y).backward()
    hooks.after_backward(0, 0.1)
    measured = recorder.stats_frame()

    predicted = theory.predict_network(spec, 1.0)
    assert list(predicted.columns) == ["step", "layer", "kind", "stat", "value", "source"]
    assert set(predicted["source"]) == {"predicted"} and set(predicted["step"]) == {0}
    measured_keys = set(zip(measured.layer, measured.kind, measured.stat))
    shared = {k for k in zip(predicted.layer, predicted.kind, predicted.stat)
              if k[1] != "mean_field" and k[2] != "std_rel_last"}
    assert shared <= measured_keys
    assert {(f"tanh{i}", "activation_grad", "std") for i in (1, 2, 3)} <= shared
    value = predicted.set_index(["layer", "kind", "stat"])["value"]
    layers = theory.propagate(3, 5 / 3, "tanh")
    assert value[("tanh3", "activation", "std")] == pytest.approx(layers[-1].activation_std)
    assert value[("tanh1", "activation", "saturated_pct")] == pytest.approx(100 * layers[0].saturation)

    relu = theory.predict_network(dict(spec, activation="relu"), 1.0)
    assert "saturated_pct" not in set(relu.stat) and "nonpositive_pct" in set(relu.stat)
    # The shallow net: one hidden layer, its W1 scale and bias as the variant says.
    mlp = dict(MODEL_DEFAULTS["mlp"], model="mlp", init={"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0})
    shallow = theory.predict_network(mlp, 1.0).set_index(["layer", "kind", "stat"])["value"]
    assert shallow[("tanh1", "preactivation", "std")] == pytest.approx(math.sqrt(0.04 * 30 + 0.0001))


def test_bad_inputs_get_one_line_naming_the_key():
    with pytest.raises(ValueError, match="activation: 'sigmoid'"):
        theory.propagate(3, 1.0, "sigmoid")
    with pytest.raises(ValueError, match="norm: 'groupnorm'"):
        theory.propagate(3, 1.0, "tanh", norm="groupnorm")
    with pytest.raises(ValueError, match="n_layers"):
        theory.propagate(0, 1.0)


def test_phase_curves_over_gains():
    gains = np.geomspace(0.25, 5, 12)
    curves = theory.phase_curves(gains, 5)
    assert len(curves) == 24 and set(curves["norm"]) == {"none", "batchnorm"}
    plain = curves[curves.norm == "none"].sort_values("gain")
    assert plain["last_activation_std"].is_monotonic_increasing
    assert plain["last_saturation_pct"].is_monotonic_increasing
    bn = curves[curves.batchnorm]
    assert bn["last_activation_std"].nunique() == 1 and bn["grad_ratio_first_last"].nunique() == 1
    row = plain.iloc[5]
    layers = theory.propagate(5, row.gain, "tanh")
    assert row.last_activation_std == pytest.approx(layers[-1].activation_std)
    assert row.grad_ratio_first_last == pytest.approx(layers[0].grad_std_rel_last)


# -- Monte Carlo nets for the Jacobian's prediction: square layers, the project's ``x @ W`` convention ---------------
def random_weights(n_layers: int, width: int, gain: float, weights: str = "gaussian", generator=None) -> list:
    """``n_layers`` square torch matrices: ``randn * gain / sqrt(width)``, or orthogonal times ``gain``."""
    out = []
    for _ in range(n_layers):
        a = torch.randn((width, width), generator=generator, dtype=torch.float64)
        if weights == "gaussian":
            out.append(a * gain / math.sqrt(width))
        elif weights == "orthogonal":
            qm, r = torch.linalg.qr(a)
            out.append(qm * torch.sign(torch.diagonal(r)) * gain)  # the sign fix makes it Haar-distributed
        else:
            raise ValueError(f"weights: {weights!r} is not one of gaussian, orthogonal")
    return out


def jacobian_singular_values(weights: list, x, activation: str = "tanh", biases: list | None = None):
    """Singular values of ``d a_L / d x`` for each row of ``x``, for ``a_l = phi(a_{l-1} @ W_l + b_l)``.

    ``weights`` are torch matrices (fan_in x fan_out, the project's ``x @ W`` convention), ``x`` a
    (batch, fan_in) tensor; returns (batch, min(fan_in, fan_out_last)). Built as the explicit
    product ``W_1 D_1 W_2 D_2 ...`` per example: meant for small nets (widths of a few hundred).
    """
    a = x.to(weights[0].dtype)
    jac = None
    for i, w in enumerate(weights):
        h = a @ w
        if biases is not None and biases[i] is not None:
            h = h + biases[i]
        if activation == "tanh":
            a, d = torch.tanh(h), 1 - torch.tanh(h) ** 2
        elif activation == "relu":
            a, d = torch.relu(h), (h > 0).to(h.dtype)
        elif activation == "gelu":
            cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
            a, d = h * cdf, cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        else:
            a, d = h, torch.ones_like(h)
        step = w.unsqueeze(0) * d.unsqueeze(1)  # (batch, fan_in, fan_out): W with columns scaled by phi'
        jac = step if jac is None else jac @ step
    return torch.linalg.svdvals(jac)


def test_orthogonal_deep_linear_net_has_an_all_ones_spectrum():
    g = torch.Generator().manual_seed(0)
    weights = random_weights(8, 64, 1.0, "orthogonal", generator=g)
    x = torch.randn((10, 64), generator=g, dtype=torch.float32)
    sv = jacobian_singular_values(weights, x, activation="linear")
    assert sv.shape == (10, 64)
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-10)
    assert theory.jacobian_spectrum(8, 1.0, "linear", "orthogonal")["var_sq"] == 0.0


@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
def test_jacobian_spectrum_matches_the_free_probability_prediction(weights):
    g = torch.Generator().manual_seed(2)
    n_layers, width, gain = 4, 300, 1.2
    ws = random_weights(n_layers, width, gain, weights, generator=g)
    x = torch.randn((4, width), generator=g, dtype=torch.float32)
    lam = jacobian_singular_values(ws, x, activation="tanh") ** 2
    pred = theory.jacobian_spectrum(n_layers, gain, "tanh", weights)
    assert lam.mean().item() == pytest.approx(pred["mean_sq"], rel=0.05)
    assert lam.var(dim=1).mean().item() == pytest.approx(pred["var_sq"], rel=0.15)
    # Linear Gaussian nets: mean 1, variance L (Marchenko-Pastur per layer).
    lin = theory.jacobian_spectrum(n_layers, 1.0, "linear", "gaussian")
    assert (lin["mean_sq"], lin["var_sq"]) == pytest.approx((1.0, n_layers))


@pytest.mark.parametrize("gain", [0.5, 5 / 3, 3.0])
def test_the_projects_deep_net_at_init_agrees_with_theory(splits, gain):
    """The lecture's 5 x 100 net (seed 2147483647) on 4000 training examples, no BatchNorm."""
    from actgrad.study.settings import MODEL_DEFAULTS
    from actgrad.training.loop import init_network

    spec = dict(MODEL_DEFAULTS["deep"], model="deep", batchnorm=False, gain=gain, batch_size=32)
    net, _ = init_network(spec, LECTURE_SEED, splits["block_size"])
    X = splits["splits"]["train"][0]
    X = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:4000]]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n, m in net.activation_layers()]
    with torch.no_grad():
        m_in = net.layers["embedding"](X).pow(2).mean().item()
        net(X)
    for h in hooks:
        h.remove()
    pred = theory.propagate(spec["n_layers"], gain, "tanh", input_second_moment=m_in)
    for p, (name, a) in zip(pred, seen.items()):
        assert name == f"tanh{p.layer}"
        assert a.std().item() == pytest.approx(p.activation_std, rel=0.05)
        assert 100 * (a.abs() > theory.SATURATION).float().mean().item() == pytest.approx(100 * p.saturation, abs=2.0)
