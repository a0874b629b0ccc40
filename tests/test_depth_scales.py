"""Schoenholz et al.'s depth scales (theory.depth_scale_analysis): hand-worked values in both phases, the
closed forms of ReLU, GELU by quadrature, and Monte Carlo nets of the project's own construction
(model.build_deep: every hidden Linear randn / sqrt(fan_in) * gain, so sigma_w = gain, biases zero)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from actgrad.results import theory
from actgrad.training.model import build_deep


def _sech2_mean(q):
    # E[tanh'(sqrt(q) z)] by a plain 1-D trapezoid rule: independent of the module's 2-D pair quadrature.
    z = np.linspace(-12, 12, 24001)
    w = np.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return float((1 - np.tanh(math.sqrt(q) * z) ** 2) @ w)


# -- hand-worked values -------------------------------------------------------------------


def test_tanh_ordered_without_bias_is_the_zero_length_limit():
    d = theory.depth_scale_analysis(0.5, "tanh")
    # q* = 0; there tanh'(0) = 1, so chi_1 = sigma_w^2 = 0.25, and the length map's slope at 0 is the same.
    assert d.phase == "ordered" and d.q_star == 0.0 and d.note == "zero-length limit"
    assert d.chi_1 == pytest.approx(0.25, abs=1e-12) and d.chi_q == pytest.approx(0.25, abs=1e-12)
    assert d.c_star == 1.0 and d.chi_c == pytest.approx(0.25, abs=1e-12)
    assert d.xi_c == pytest.approx(-1 / math.log(0.25), rel=1e-12)
    assert d.xi_q == d.xi_c == d.xi_grad
    assert d.trainable_depth == pytest.approx(6 * -1 / math.log(0.25), rel=1e-12)


def test_tanh_critical_point_has_infinite_depth_scales():
    d = theory.depth_scale_analysis(1.0, "tanh")
    assert d.phase == "critical"
    assert math.isinf(d.xi_c) and math.isinf(d.xi_grad) and math.isinf(d.trainable_depth)
    # Either side of it they are finite and grow towards it.
    below = [theory.depth_scale_analysis(g, "tanh").xi_c for g in (0.5, 0.9, 0.99)]
    above = [theory.depth_scale_analysis(g, "tanh").xi_c for g in (3.0, 1.4, 1.05)]
    assert below == sorted(below) and above == sorted(above) and max(below + above) < math.inf


@pytest.mark.parametrize("gain", [1.4, 5 / 3, 3.0])
def test_tanh_chaotic_without_bias_settles_at_zero_correlation(gain):
    d = theory.depth_scale_analysis(gain, "tanh")
    assert d.phase == "chaotic" and d.note == ""
    assert float(theory.length_map(d.q_star, gain, "tanh")) == pytest.approx(d.q_star, rel=1e-10)
    # The length map's slope at q*, by a central difference.
    h = 1e-5 * d.q_star
    slope = (float(theory.length_map(d.q_star + h, gain)) - float(theory.length_map(d.q_star - h, gain))) / (2 * h)
    assert d.chi_q == pytest.approx(slope, rel=1e-6)
    assert d.xi_q == pytest.approx(-1 / math.log(slope), rel=1e-6)
    # c* = 0 (tanh is odd, no bias), where E[phi'(u1) phi'(u2)] factorises: chi_c = gain^2 E[sech^2]^2 < 1 < chi_1.
    assert d.c_star == 0.0
    assert d.chi_c == pytest.approx(gain ** 2 * _sech2_mean(d.q_star) ** 2, rel=1e-7)
    assert d.chi_c < 1 < d.chi_1
    assert d.xi_c == pytest.approx(-1 / math.log(d.chi_c), rel=1e-12)
    assert d.xi_grad == pytest.approx(1 / math.log(d.chi_1), rel=1e-12)  # growth: Schoenholz's xi_nabla is -xi_grad


def test_depth_scale_table_of_the_issue():
    table = theory.depth_scale_table([0.5, 0.85, 1.4, 5 / 3, 3.0], "tanh")
    print("\n" + table[["gain", "phase", "q_star", "xi_q", "c_star", "chi_c", "xi_c", "chi_1", "xi_grad",
                        "trainable_depth"]].to_string(float_format=lambda v: f"{v:.4g}"))
    assert list(table["phase"]) == ["ordered", "ordered", "chaotic", "chaotic", "chaotic"]
    assert table["xi_c"].tolist() == pytest.approx([0.7213, 3.0766, 22.758, 12.118, 4.6573], rel=1e-4)
    assert table["xi_q"].tolist() == pytest.approx([0.7213, 3.0766, 1.7314, 1.1878, 0.60281], rel=1e-4)
    assert table["xi_grad"].tolist() == pytest.approx([0.7213, 3.0766, 10.478, 5.2499, 1.6116], rel=1e-4)
    # The old (xi_q, xi_c) pair is the same analysis.
    assert theory.depth_scales(3.0) == (table["xi_q"].iloc[-1], table["xi_c"].iloc[-1])


def test_tanh_with_bias_has_an_interior_correlation_fixed_point_when_chaotic():
    d = theory.depth_scale_analysis(2.0, "tanh", bias_var=0.05)
    assert d.phase == "chaotic" and 0 < d.c_star < 1
    assert theory.correlation_map(d.c_star, d.q_star, 2.0, "tanh", 0.05) == pytest.approx(d.c_star, abs=1e-10)
    h = 1e-4
    slope = (theory.correlation_map(d.c_star + h, d.q_star, 2.0, "tanh", 0.05)
             - theory.correlation_map(d.c_star - h, d.q_star, 2.0, "tanh", 0.05)) / (2 * h)
    assert d.chi_c == pytest.approx(slope, rel=1e-5)
    ordered = theory.depth_scale_analysis(1.0, "tanh", bias_var=0.05)
    assert ordered.phase == "ordered" and ordered.q_star > 0 and ordered.note == ""
    assert ordered.c_star == 1.0 and ordered.chi_c == ordered.chi_1 < 1


def test_relu_closed_forms():
    # The arc-cosine kernels against the 2-D quadrature (a kink: ~1e-3), and their ends.
    for c in (-0.5, 0.0, 0.3, 0.9):
        pair, dpair = theory.relu_pair_moments(c, 2.0)
        assert pair == pytest.approx(theory._pair_expectation(lambda x: np.maximum(x, 0), c, 2.0), rel=3e-3)
        # P(u1 > 0, u2 > 0) by sampling (a step: the quadrature's node at 0 gets it wrong), +-0.0013 at 3 sigma
        z = np.random.default_rng(0).standard_normal((2, 1_000_000))
        both = (z[0] > 0) & (c * z[0] + math.sqrt(1 - c * c) * z[1] > 0)
        assert dpair == pytest.approx(both.mean(), abs=2e-3)
    assert theory.relu_pair_moments(1.0, 3.0) == pytest.approx((1.5, 0.5))
    assert theory.relu_pair_moments(0.0, 3.0) == pytest.approx((3 / (2 * math.pi), 0.25))
    # Without bias: c* = 1, chi_c = chi_1 = gain^2 / 2 below the boundary (the zero-length limit), critical at sqrt(2).
    d = theory.depth_scale_analysis(1.0, "relu")
    assert (d.phase, d.c_star, d.chi_c, d.chi_1) == ("ordered", 1.0, 0.5, 0.5)
    assert d.xi_c == pytest.approx(1 / math.log(2)) and d.xi_q == pytest.approx(1 / math.log(2))
    crit = theory.depth_scale_analysis(math.sqrt(2), "relu")
    assert crit.phase == "critical" and math.isinf(crit.xi_c) and crit.q_star == 1.0
    # Above it q grows as (gain^2 / 2)^l: no length fixed point, and the scale-free correlation map's slope at 1 is 1.
    up = theory.depth_scale_analysis(2.0, "relu")
    assert up.note == "unbounded length" and math.isnan(up.xi_q) and up.chi_q == 2.0
    assert up.chi_c == 1.0 and math.isinf(up.xi_c) and up.xi_grad == pytest.approx(1 / math.log(2))
    # With bias: q* = sigma_b^2 / (1 - gain^2 / 2), and the same chi_c = chi_1.
    b = theory.depth_scale_analysis(1.0, "relu", bias_var=0.1)
    assert b.q_star == pytest.approx(0.2) and b.chi_c == 0.5 and b.note == ""


def test_gelu_by_quadrature():
    # No bias: phi(0) = 0 and phi'(0) = 1/2, so below the boundary q* = 0 and chi_1 = chi_c = gain^2 / 4.
    d = theory.depth_scale_analysis(1.5, "gelu")
    assert d.q_star == 0.0 and d.chi_c == pytest.approx(1.5 ** 2 / 4, rel=1e-9)
    assert theory.depth_scale_analysis(2.5, "gelu").note == "unbounded length"
    # With bias a finite fixed point; ordered there, so c* = 1 and the correlation map's slope at 1 is chi_1.
    b = theory.depth_scale_analysis(1.0, "gelu", bias_var=0.05)
    assert 0 < b.q_star < math.inf and b.c_star == 1.0
    h = 1e-4
    slope = (1 - theory.correlation_map(1 - h, b.q_star, 1.0, "gelu", 0.05)) / h
    assert b.chi_c == pytest.approx(slope, rel=1e-3)


def test_spec_depth_scales_follow_the_deep_nets_convention():
    spec = {"model": "deep", "gain": 5 / 3, "activation": "tanh", "norm": "none", "n_layers": 5}
    assert theory.spec_depth_scales(spec) == theory.depth_scale_analysis(5 / 3, "tanh", 0.0, 25 / 9)
    with pytest.raises(ValueError, match="normalisation"):
        theory.spec_depth_scales({**spec, "norm": "batchnorm"})


# -- Monte Carlo: wide nets of the project's own construction -------------------------------


def _deep_spec(gain, n_layers, width):
    return {"model": "deep", "n_embd": 10, "n_hidden": width, "n_layers": n_layers, "activation": "tanh",
            "norm": "none", "batchnorm": False, "last_layer_scale": 1.0, "gain": gain}


def _correlated_inputs(pairs, c0, second_moment, g):
    # Two 30-vectors (the embedding's output, 3 x 10) of cosine c0 and mean square second_moment, per pair:
    # the first Linear's pre-activations then have variance gain^2 * second_moment and correlation c0.
    a, b = torch.randn(pairs, 30, generator=g), torch.randn(pairs, 30, generator=g)
    a = a / a.norm(dim=1, keepdim=True)
    b = b - (b * a).sum(1, keepdim=True) * a
    b = c0 * a + math.sqrt(1 - c0 * c0) * b / b.norm(dim=1, keepdim=True)
    return a * math.sqrt(30 * second_moment), b * math.sqrt(30 * second_moment)


def _measured_q_and_c(gain, n_layers, c0, second_moment, bias_var=0.0, width=1000, nets=3, pairs=32):
    """Per hidden layer: the pre-activations' mean square and the two inputs' correlation, averaged."""
    qs, cs = [], []
    for seed in range(nets):
        g = torch.Generator().manual_seed(seed)
        net = build_deep(_deep_spec(gain, n_layers, width), g, block_size=3)
        if bias_var:  # the project's biases start at zero; fill them to test the biased theory
            with torch.no_grad():
                for name, layer in net.layers.items():
                    if name.startswith("linear") and layer.bias is not None:
                        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * math.sqrt(bias_var))
        xa, xb = _correlated_inputs(pairs, c0, second_moment, g)
        x, q_net, c_net = torch.cat([xa, xb]), [], []
        with torch.no_grad():
            for name, layer in list(net.layers.items())[1:]:  # after the embedding
                x = layer(x)
                if name.startswith("linear") and len(q_net) < n_layers:
                    ha, hb = x[:pairs].double(), x[pairs:].double()
                    qa, qb = (ha * ha).mean(1), (hb * hb).mean(1)
                    q_net.append(float(((qa + qb) / 2).mean()))
                    c_net.append(float(((ha * hb).mean(1) / (qa * qb).sqrt()).mean()))
        qs.append(q_net)
        cs.append(c_net)
    return np.mean(qs, axis=0), np.mean(cs, axis=0)


def _rate(deviation, lo, hi):
    """The per-layer factor of a geometric fit to the deviations between ``lo`` and ``hi`` (above the noise)."""
    layers = np.flatnonzero((deviation > lo) & (deviation < hi))
    assert len(layers) >= 5, deviation
    return math.exp(np.polyfit(layers, np.log(deviation[layers]), 1)[0])


def test_monte_carlo_chaotic_tanh_decorrelates_at_chi_c():
    gain = 3.0
    d = theory.depth_scale_analysis(gain, "tanh")
    q, c = _measured_q_and_c(gain, 30, 0.9, d.q_star / gain ** 2)
    assert q == pytest.approx(np.full(30, d.q_star), rel=0.05)  # started at q*, stays there (scatter ~1 %)
    # Towards c* = 0 at chi_c = 0.81 per layer (chi_1 = 1.86 would be growth). Tolerance 0.05: the fit over
    # layers with 0.03 < c < 0.35 has width-1000 noise of ~0.01-0.02 on the factor (measured 0.79-0.81).
    assert _rate(np.abs(c - d.c_star), 0.03, 0.35) == pytest.approx(d.chi_c, abs=0.05)
    assert abs(c[-1]) < 0.02


def test_monte_carlo_ordered_tanh_with_bias_correlates_at_chi_c():
    gain, bias_var = 0.9, 0.05
    d = theory.depth_scale_analysis(gain, "tanh", bias_var)
    assert d.c_star == 1.0 and d.chi_c == d.chi_1
    q, c = _measured_q_and_c(gain, 20, 0.5, (d.q_star - bias_var) / gain ** 2, bias_var)
    # Each layer's q scatters by ~3 % (its weights' norm, shared by the pairs); their mean by well under 1 %.
    assert q == pytest.approx(np.full(20, d.q_star), rel=0.08) and q.mean() == pytest.approx(d.q_star, rel=0.02)
    # 1 - c shrinks by chi_c = 0.65 per layer: fit where it is between 0.005 and 0.4 (measured 0.65-0.66).
    assert _rate(1 - c, 0.005, 0.4) == pytest.approx(d.chi_c, abs=0.05)


def test_monte_carlo_ordered_tanh_without_bias_freezes_the_correlation():
    # At bias_var = 0 exactly, q -> 0 at chi_q = gain^2 per layer and the net turns linear: the correlation
    # stays near where it started instead of reaching the bias -> 0+ limit's c* = 1 (the analysis' note).
    gain = 0.7
    d = theory.depth_scale_analysis(gain, "tanh")
    assert d.note == "zero-length limit" and d.chi_q == pytest.approx(0.49)
    q, c = _measured_q_and_c(gain, 30, 0.5, 1.0)
    assert _rate(q, 1e-5, 0.2) == pytest.approx(d.chi_q, abs=0.02)
    assert np.abs(c - 0.5).max() < 0.03  # mean field: 0.5 -> 0.483 in two layers, then frozen


# -- depth as a sweep axis: 100 layers through the config, both engines, the memory estimate and the figures --


def test_a_100_layer_deep_sweep_validates(tmp_path, names_path):
    from conftest import tiny_config, write_config

    from actgrad.study.load import load
    from actgrad.study.settings import variant_spec

    config = tiny_config(names_path, variants=None, sweeps={
        "depth": {"base": {"model": "deep", "batchnorm": False}, "grid": {"n_layers": [2, 100]}}})
    loaded = load(write_config(tmp_path, config))
    specs = [variant_spec(loaded, name) for name in loaded["variants"]]
    assert sorted(s["n_layers"] for s in specs) == [2, 100]


def test_the_memory_estimate_grows_with_depth_and_a_96_layer_job_fits_the_default():
    from actgrad.study.settings import MODEL_DEFAULTS, merge
    from actgrad.training.memory import estimate_training_memory_mb
    from actgrad.training.stats import StatsPlan

    plan = StatsPlan(every=50, update_every=10, histogram_every=50, snapshot_steps=(0, 100), bins=50, last_step=199)
    deep = merge(MODEL_DEFAULTS["deep"], {"model": "deep", "batchnorm": True, "max_steps": 200, "batch_size": 32})
    totals = {n: estimate_training_memory_mb(dict(deep, n_layers=n), 1, 182625, 3, plan)["total"]
              for n in (5, 96)}
    # Measured (peak RSS, fresh process, batched engine): a job training this 96-layer BatchNorm variant for 200
    # steps with this plan peaked at 743 MB; the estimate is 766 MB. The 5-layer net's is far below.
    assert 743 < totals[96] < 4000 and totals[5] < totals[96]


def _first_losses(spec, Xtr, Ytr, steps, engine, w1_perturbation=0.0):
    from actgrad.training import loop as reference
    from actgrad.training.engine import train_batched

    net, g = reference.init_network(spec, 1, 3)
    if w1_perturbation:
        with torch.no_grad():
            w = net.layers["linear1"].weight
            w += w1_perturbation * w.abs() * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    schedule = [{"from_step": 0, "lr": 0.1}]
    if engine == "reference":
        return reference.train_reference(net, g, Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=schedule).losses
    [res] = train_batched([net], [g], Xtr, Ytr, steps=steps, batch_size=32, lr_schedule=schedule)
    assert len([n for n in net.layers if n.startswith("linear")]) == 101
    return res.losses


def test_both_engines_train_a_narrow_100_layer_net_alike(splits, one_thread):
    from actgrad.training.networks import LECTURE_NETWORKS

    Xtr, Ytr = splits["splits"]["train"]
    # At the critical gain float rounding is not amplified through the 100 layers: the engines agree as on 5.
    critical = dict(LECTURE_NETWORKS["deep"], n_layers=100, n_hidden=16, gain=1.0)
    ours, ref = (_first_losses(critical, Xtr, Ytr, 20, e) for e in ("batched", "reference"))
    assert len(ours) == len(ref) == 20 and (ours - ref).abs().max().item() < 5e-6
    # With BatchNorm (and at gain 5/3 without it) 100 layers are chaotic: the reference run moves as far from a
    # 1e-7 relative change of W1 as from the engine's rounding (both ~1e-3 in the first loss, measured). The
    # engines agree to that floor, not to float rounding.
    bn = dict(LECTURE_NETWORKS["deep+BN"], n_layers=100, n_hidden=16)
    ours, ref = (_first_losses(bn, Xtr, Ytr, 1, e) for e in ("batched", "reference"))
    floor = abs(_first_losses(bn, Xtr, Ytr, 1, "reference", 1e-7)[0].item() - ref[0].item())
    assert 1e-5 < floor < 1e-2
    assert abs(ours[0].item() - ref[0].item()) < 10 * floor


def _synthetic_hists(n_layers, steps=(0, 100), bins=10):
    rows = []
    for layer in range(1, n_layers + 1):
        for step in steps:
            for b in range(bins):
                left = -1 + 2 * b / bins
                rows += [(step, f"tanh{layer}", kind, left, left + 2 / bins, 1 / bins)
                         for kind in ("activation", "activation_grad")]
    return pd.DataFrame(rows, columns=["step", "layer", "kind", "bin_left", "bin_right", "fraction"])


def test_per_layer_figures_of_a_96_layer_net_draw_a_bounded_number_of_layers():
    from actgrad.report import figures

    assert figures.shown_layers(5) == [0, 1, 2, 3, 4]  # the lecture's nets: every layer, as before
    chosen = figures.shown_layers(96)
    assert chosen[0] == 0 and chosen[-1] == 95 and len(chosen) == figures.MAX_LAYERS_SHOWN
    hists = _synthetic_hists(96)
    stats = pd.DataFrame(
        [(s, f"tanh{n}", "activation", stat, 0.5) for s in (0, 100) for n in range(1, 97)
         for stat in ("mean", "std", "saturated_pct")]
        + [(s, f"layers.linear{n}.weight", "update", "log10_ratio", -3.0) for s in (0, 100) for n in range(1, 98)]
        + [(s, f"layers.linear{n}.weight", "weight_grad", "std", 1e-3) for s in (0, 100) for n in range(1, 98)],
        columns=["step", "layer", "kind", "stat", "value"])
    heat = figures.heatmap_figure(hists, "t")
    assert sum(ax.get_title().startswith("tanh") for ax in heat.axes) == figures.MAX_LAYERS_SHOWN
    assert "8 of 96 layers shown" in heat._suptitle.get_text()
    dist = figures.distribution_figure(hists, stats, "activation", [0, 100], "t")
    assert [len(ax.get_legend().get_texts()) for ax in dist.axes] == [figures.MAX_LAYERS_SHOWN] * 2
    updates = figures.updates_figure(stats, "t")
    assert len(updates.axes[0].get_lines()) == figures.MAX_LAYERS_SHOWN + 1  # and the guide
    maps = {f"tanh{n}": np.zeros((32, 16)) for n in range(1, 97)}
    init = figures.init_figure(hists, maps, stats)
    assert sum(1 for ax in init.axes if ax.images) == figures.MAX_LAYERS_SHOWN
    for fig in (heat, dist, updates, init):
        figures.plt.close(fig)
