"""The statistics (results/significance.py, study/comparisons.py): comparisons from the config, Welch + Holm, Hedges'
g, seeds needed, the lecture's number in our spread, and chaos as a rate - each against a hand-computed case or an
independent computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from scipy import special, stats

from actgrad.results import significance
from actgrad.study import comparisons
from actgrad.study import load as cfg
from actgrad.study.comparisons import Comparison
from actgrad.study.settings import ConfigError

BEFORE = [2.1612, 2.1655, 2.1590, 2.1703, 2.1631]
AFTER = [2.1301, 2.1389, 2.1254, 2.1342, 2.1420, 2.1297]


def load_with(tmp_path, extra: dict) -> dict:
    """config/config.yaml with ``extra`` merged on top, loaded the way the workflow loads a config."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "config" / "config.yaml"), **extra}, sort_keys=False))
    return cfg.load(path)


# ---- Holm ----------------------------------------------------------------------------------------------------


def test_holm_on_a_known_vector():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> running max 0.06.
    assert significance.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1; the running maximum carries the cap.
    assert significance.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_holm_leaves_untested_comparisons_out_of_m():
    out = significance.holm([0.01, np.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


# ---- Welch and Hedges --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_welch_test_matches_scipy(confidence):
    ours = significance.welch_test(BEFORE, AFTER, confidence)
    res = stats.ttest_ind(AFTER, BEFORE, equal_var=False)
    ci = res.confidence_interval(confidence)
    assert ours["t"] == pytest.approx(res.statistic, rel=1e-12)
    assert ours["p"] == pytest.approx(res.pvalue, rel=1e-9)
    assert ours["df"] == pytest.approx(res.df, rel=1e-12)
    assert (ours["ci_low"], ours["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert ours["difference"] == pytest.approx(np.mean(AFTER) - np.mean(BEFORE))


def test_welch_test_needs_two_values_and_some_spread():
    assert math.isnan(significance.welch_test([2.1], AFTER)["p"])
    assert math.isnan(significance.welch_test([2.1, 2.1], [2.0, 2.0])["p"])


def test_hedges_g_by_hand():
    a, b = np.array(BEFORE), np.array(AFTER)
    df = len(a) + len(b) - 2
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / df)
    exact_j = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
    g = significance.hedges_g(BEFORE, AFTER)
    assert g == pytest.approx(exact_j * (b.mean() - a.mean()) / pooled, rel=1e-12)
    # The textbook approximation J = 1 - 3 / (4 df - 1) agrees to a few parts in 10^4, and after is lower: g < 0.
    assert g == pytest.approx((1 - 3 / (4 * df - 1)) * (b.mean() - a.mean()) / pooled, rel=1e-3)
    assert g < 0


# ---- Power -----------------------------------------------------------------------------------------------------


def test_seeds_needed_textbook_values():
    # Two-sided two-sample t-test, alpha 0.05, power 0.8, per group: d = 1 -> 17, 0.8 -> 26, 0.5 -> 64 (Cohen 1988).
    assert significance.seeds_needed(1.0, 1.0, 1.0, 0.05) == 17
    assert significance.seeds_needed(-0.8, 2.0, 2.0, 0.05 / 2) > significance.seeds_needed(0.8, 1.0, 1.0, 0.05) == 26
    assert significance.seeds_needed(0.5, 1.0, 1.0, 0.05) == 64


def test_seeds_needed_is_the_first_n_reaching_the_power():
    for diff, sd_a, sd_b, alpha in [(0.006, 0.004, 0.004, 0.05), (0.003, 0.002, 0.005, 0.01), (1.0, 0.1, 0.1, 0.05)]:
        n = significance.seeds_needed(diff, sd_a, sd_b, alpha)
        assert significance.welch_power(diff, sd_a, sd_b, n, alpha) >= 0.8
        assert n == 2 or significance.welch_power(diff, sd_a, sd_b, n - 1, alpha) < 0.8


def test_seeds_needed_against_simulated_welch_tests():
    """Simulated Welch tests (scipy) with n - 1 and n seeds fall on either side of 80 % power."""
    rng = np.random.default_rng(17)
    diff, sd_a, sd_b, alpha = 0.01, 0.006, 0.009, 0.05 / 3
    n = significance.seeds_needed(diff, sd_a, sd_b, alpha)
    reps = 40_000
    simulated = {}
    for k in (n - 1, n):
        a = rng.normal(0.0, sd_a, (reps, k))
        b = rng.normal(diff, sd_b, (reps, k))
        simulated[k] = float((stats.ttest_ind(b, a, axis=1, equal_var=False).pvalue < alpha).mean())
    assert simulated[n] >= 0.8 - 0.01, simulated
    assert simulated[n - 1] < 0.8 + 0.01, simulated
    # The noncentral-t power and the simulation agree.
    assert significance.welch_power(diff, sd_a, sd_b, n, alpha) == pytest.approx(simulated[n], abs=0.015)


def test_seeds_needed_undefined_cases():
    assert math.isnan(significance.seeds_needed(0.0, 1.0, 1.0, 0.05))
    assert math.isnan(significance.seeds_needed(0.1, 0.0, 0.0, 0.05))
    assert math.isnan(significance.seeds_needed(1e-6, 1.0, 1.0, 0.05, max_seeds=1000))


# ---- The significance table ----------------------------------------------------------------------------------


def runs_frame(values: dict[str, list[float]], diverged: dict[str, int] | None = None) -> pd.DataFrame:
    rows = [{"variant": v, "seed": i, "status": "ok", "val_loss": x} for v, xs in values.items()
            for i, x in enumerate(xs)]
    for v, k in (diverged or {}).items():
        rows += [{"variant": v, "seed": 100 + i, "status": "diverged", "val_loss": np.nan} for i in range(k)]
    return pd.DataFrame(rows)


def test_significance_table_corrects_within_each_family():
    base = [2.100, 2.104, 2.098, 2.102, 2.101]
    values = {
        "a": base,
        "better": [x - 0.02 for x in base[::-1]],       # clearly lower: improves
        "worse": [x + 0.02 for x in base[1:] + base[:1]],  # clearly higher: worsens
        # Uncorrected p a little under 0.05 (t = 2.47 at df 8), one up and one down: Holm over four comparisons
        # must call neither (ranked 3rd and 4th, each needs p < 0.05 / 2 first).
        "marginal": [x + 0.0035 for x in base[2:] + base[:2]],
        "marginal_down": [x - 0.0035 for x in base[3:] + base[:3]],
        "alone": [2.0],
    }
    runs = runs_frame(values, diverged={"worse": 2})
    comparisons = [Comparison("f", "a", "better"), Comparison("f", "a", "worse"), Comparison("f", "a", "marginal"),
                   Comparison("f", "a", "marginal_down"), Comparison("g", "a", "marginal"),
                   Comparison("g", "a", "alone")]
    table = significance.significance_table(runs, comparisons)
    assert list(table.columns) == significance.SIGNIFICANCE_COLUMNS
    p_marginal = stats.ttest_ind(values["marginal"], values["a"], equal_var=False).pvalue
    assert 0.0167 < p_marginal < 0.05
    f, g = table[table.family == "f"], table[table.family == "g"]
    assert list(f.p_holm) == pytest.approx(list(significance.holm(f.p)))
    assert list(f.verdict) == [significance.IMPROVES, significance.WORSENS, significance.NOT_DETECTED,
                               significance.NOT_DETECTED]
    # Alone in its tested family (the one-seed comparison is not counted), the marginal one is detected.
    assert list(g.m_family) == [1, 1] and g.p_holm.iloc[0] == pytest.approx(p_marginal)
    assert list(g.verdict) == [significance.WORSENS, significance.TOO_FEW_SEEDS]
    # Seeds needed only where nothing was detected, at alpha / m.
    row = f.iloc[2]
    assert row.power_alpha == pytest.approx(0.05 / 4)
    assert row.seeds_needed == significance.seeds_needed(row.difference, row.sd_before, row.sd_after, 0.05 / 4)
    assert row.seeds_needed > 5
    assert f.seeds_needed.iloc[:2].isna().all() and f.seeds_needed.iloc[3] > 5 and g.seeds_needed.isna().all()
    # Diverged runs are counted, not averaged; the inputs are in the row.
    worse = f.iloc[1]
    assert (worse.n_after, worse.diverged_after) == (5, 2)
    assert np.mean([float(x) for x in worse.values_after.split(";")]) == pytest.approx(worse.mean_after)
    assert worse.ci_low > 0 and f.iloc[0].ci_high < 0


def test_no_verdict_calls_anything_equal():
    runs = runs_frame({"a": [1.0, 1.1, 0.9], "b": [1.0, 1.1, 0.9]})
    table = significance.significance_table(runs, [Comparison("f", "a", "b")])
    assert table.verdict.iloc[0] == significance.NOT_DETECTED
    assert not any("equal" in v for v in (significance.IMPROVES, significance.WORSENS, significance.NOT_DETECTED,
                                            significance.TOO_FEW_SEEDS,
                                           significance.NO_SPREAD))
    # A zero observed difference cannot be detected by any number of seeds.
    assert pd.isna(table.seeds_needed.iloc[0])


def test_seeds_without_spread_make_no_verdict():
    table = significance.significance_table(runs_frame({"a": [1.0, 1.0], "b": [2.0, 2.0]}), [Comparison("f", "a", "b")])
    row = table.iloc[0]
    assert row.verdict == significance.NO_SPREAD and row.difference == 1.0 and math.isnan(row.p) and row.m_family == 0


def test_method_text_names_its_references():
    text = significance.method_text(alpha=0.01, power=0.9)
    for needle in ("Welch 1947", "Holm 1979", "Hedges 1981", "0.01", "90 %", "Welch-Satterthwaite"):
        assert needle in text


# ---- Comparisons from the config -------------------------------------------------------------------------------


def test_default_comparisons_of_the_default_study():
    config = cfg.load(REPO / "config" / "config.yaml")
    got = [(c.family, c.before, c.after) for c in comparisons.resolve_comparisons(config)]
    steps = ["original", "fix_softmax", "fix_tanh", "kaiming", "batchnorm", "batchnorm_table"]
    assert got == [("mlp_consecutive", a, b) for a, b in zip(steps[:-1], steps[1:])] + [
        ("gain_vs_deep_gain5_3", "deep_gain5_3", "deep_gain1"),
        ("gain_vs_deep_gain5_3", "deep_gain5_3", "deep_gain0_5"),
        ("gain_vs_deep_gain5_3", "deep_gain5_3", "deep_gain3"),
        ("gain_vs_deep_bn_gain5_3", "deep_bn_gain5_3", "deep_bn_gain1"),
        ("batchnorm_vs_none", "deep_gain5_3", "deep_bn_gain5_3"),
        ("batchnorm_vs_none", "deep_gain1", "deep_bn_gain1"),
    ]


def test_default_deep_comparisons_only_between_otherwise_equal_variants(tmp_path):
    # A 3-layer variant at gain 1 has no 5/3 baseline of its own and no BatchNorm twin: it is compared with nothing.
    config = load_with(tmp_path, {"variants": {"deep3_gain1": {"model": "deep", "batchnorm": False, "gain": 1.0,
                                                               "n_layers": 3}}})
    got = comparisons.resolve_comparisons(config)
    assert all("deep3_gain1" not in (c.before, c.after) for c in got)


def test_configured_families(tmp_path):
    config = load_with(tmp_path, {"comparisons": {"alpha": 0.01, "families": {
        "steps": {"consecutive": ["original", "fix_tanh", "kaiming"]},
        "vs_kaiming": {"baseline": "kaiming", "against": ["batchnorm"]},
        "deep_all": {"baseline": "deep_gain5_3"},
        "bn": {"pairs": [["deep_gain1", "deep_bn_gain1"]]},
    }}})
    got = [(c.family, c.before, c.after) for c in comparisons.resolve_comparisons(config)]
    assert got == [
        ("steps", "original", "fix_tanh"), ("steps", "fix_tanh", "kaiming"),
        ("vs_kaiming", "kaiming", "batchnorm"),
        # Without 'against': every other variant of the baseline's model, in config order.
        ("deep_all", "deep_gain5_3", "deep_gain1"), ("deep_all", "deep_gain5_3", "deep_gain0_5"),
        ("deep_all", "deep_gain5_3", "deep_gain3"), ("deep_all", "deep_gain5_3", "deep_bn_gain5_3"),
        ("deep_all", "deep_gain5_3", "deep_bn_gain1"),
        ("bn", "deep_gain1", "deep_bn_gain1"),
    ]
    assert comparisons.comparison_settings(config) == {"metric": "val_loss", "alpha": 0.01, "power": 0.8}


def test_sweep_grids_compare_along_the_grid(tmp_path):
    lrs = {f"lr{i}": {"init": {"W2": 0.01, "b2": 0}, "lr_schedule": [{"from_step": 0, "lr": lr}]}
           for i, lr in enumerate([0.05, 0.1, 0.2])}
    config = load_with(tmp_path, {"variants": lrs})
    got = [(c.family, c.before, c.after)
           for c in comparisons.resolve_comparisons(config, grids={"lr_sweep": [list(lrs)]})]
    # The grid's variants are compared along it only, not appended to the mlp chain.
    assert got[-2:] == [("lr_sweep", "lr0", "lr1"), ("lr_sweep", "lr1", "lr2")]
    assert got[:-2] == [(c.family, c.before, c.after)
                        for c in comparisons.default_comparisons(config,
                                                                 [n for n in config["variants"] if n not in lrs])]
    assert ("mlp_consecutive", "batchnorm_table", "lr0") in [(c.family, c.before, c.after)
                                                              for c in comparisons.resolve_comparisons(config)]
    with pytest.raises(ConfigError, match=r"^grid lr_sweep/0/1: 'lr9' is not a variant"):
        comparisons.resolve_comparisons(config, grids={"lr_sweep": [["lr1", "lr9"]]})


def test_grid_lines_of_a_two_key_grid():
    # gain (3 values) x batchnorm (2 values); the names are given out of order on purpose.
    points = {(g, b): f"s__g{g}__bn{b}" for b in (1, 0) for g in (2, 0, 1)}
    lines = comparisons.grid_lines("s", points, ["gain", "batchnorm"])
    assert lines == {
        "s_gain": [["s__g0__bn0", "s__g1__bn0", "s__g2__bn0"], ["s__g0__bn1", "s__g1__bn1", "s__g2__bn1"]],
        "s_batchnorm": [["s__g0__bn0", "s__g0__bn1"], ["s__g1__bn0", "s__g1__bn1"], ["s__g2__bn0", "s__g2__bn1"]],
    }
    # A key with a single value gives no line.
    assert comparisons.grid_lines("t", {(0, 0): "a", (0, 1): "b"}, ["gain", "lr"]) == {"t_lr": [["a", "b"]]}


@pytest.mark.parametrize("family, message", [
    ({"pairs": [["original", "kaiming"], ["fix_tanh", "kaimng"]]},
     r"^comparisons/families/x/pairs/1/1: 'kaimng' is not a variant \(did you mean 'kaiming'\?\)$"),
    ({"consecutive": ["original", "nope_at_all"]}, r"^comparisons/families/x/consecutive/1: 'nope_at_all' is not"),
    ({"baseline": "deep_gain7"}, r"^comparisons/families/x/baseline: 'deep_gain7' is not a variant"),
    ({"baseline": "kaiming", "against": ["kaiming"]}, r"^comparisons/families/x/against/0: compares 'kaiming' with"),
    ({"pairs": [["original", "kaiming"], ["kaiming", "original"]]}, r"^comparisons/families/x/pairs/1: compares "
                                                                     r"'kaiming' and 'original' again"),
    ({"consecutive": ["original", "kaiming"], "pairs": [["original", "kaiming"]]},
     r"^comparisons/families/x: give exactly one of"),
    ({"against": ["kaiming"]}, r"^comparisons/families/x: give exactly one of"),
])
def test_bad_comparisons_name_their_key(tmp_path, family, message):
    # Loading the config checks its comparisons: the workflow stops before any job, in one line.
    with pytest.raises(ConfigError, match=message) as e:
        load_with(tmp_path, {"comparisons": {"families": {"x": family}}})
    assert "\n" not in str(e.value)
    config = load_with(tmp_path, {})
    config["comparisons"]["families"] = {"x": family}
    with pytest.raises(ConfigError, match=message):
        comparisons.check_comparisons(config)


@pytest.mark.parametrize("comparisons, message", [
    ({"families": {"x": {"baselin": "kaiming"}}}, "did you mean 'baseline'"),
    ({"families": {"x": {"consecutive": ["kaiming"]}}}, "comparisons/families/x/consecutive"),
    ({"families": {"x": {"pairs": [["a", "b", "c"]]}}}, "comparisons/families/x/pairs/0"),
    ({"metric": "val"}, "comparisons/metric: 'val' is not one of"),
    ({"alpha": 1.5}, "comparisons/alpha"),
])
def test_schema_rejects_malformed_comparisons(tmp_path, comparisons, message):
    with pytest.raises(ConfigError, match=message):
        load_with(tmp_path, {"comparisons": comparisons})


# ---- The lecture's number inside our spread ------------------------------------------------------------------


def test_reference_in_spread():
    values = [2.158, 2.160, 2.161, 2.163, 2.165]
    out = significance.reference_in_spread(2.1682, values)
    z = (2.1682 - np.mean(values)) / np.std(values, ddof=1)
    assert out["z"] == pytest.approx(z) and (out["n_below"], out["n_above"], out["rank"]) == (5, 0, 6)
    assert out["sentence"] == (f"the lecture's 2.1682 is {z:.1f} sd above our mean of 5 seeds "
                               f"({np.mean(values):.4f}, sd {np.std(values, ddof=1):.4f}); it would rank 6th of 6, "
                               "lowest first")
    below = significance.reference_in_spread(2.1595, values, label="the notes'")
    assert below["rank"] == 2 and below["z"] < 0
    assert below["sentence"].startswith("the notes' 2.1595 is 0.7 sd below our mean")
    assert "2nd of 6" in below["sentence"]


def test_reference_in_spread_with_one_or_no_seed():
    assert significance.reference_in_spread(2.13, [2.1301], precision=2)["sentence"] == (
        "the lecture's 2.13 is equal to our single seed's 2.13 (no spread to measure)")
    assert "0.0050 below our single seed's" in significance.reference_in_spread(2.1, [2.105])["sentence"]
    assert significance.reference_in_spread(2.1, [np.nan])["sentence"].startswith("no finished seed")


# ---- Chaos as a rate -------------------------------------------------------------------------------------------


def twin_trajectories(rate: float, steps: np.ndarray, d0: float = 1e-7, dim: int = 50, seed: int = 0):
    """theta_A: a random walk; theta_B = theta_A + d0 exp(rate t) u along a fixed unit vector u."""
    rng = np.random.default_rng(seed)
    theta_a = np.cumsum(rng.normal(size=(len(steps), dim)), axis=0)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    theta_b = theta_a + d0 * np.exp(rate * steps)[:, None] * u
    return theta_a, theta_b


@pytest.mark.parametrize("rate", [2e-3, -5e-4])
def test_lyapunov_recovers_a_known_exponential_divergence(rate):
    steps = np.arange(0, 10_001, 1000)
    theta_a, theta_b = twin_trajectories(rate, steps)
    distances = np.linalg.norm(theta_a - theta_b, axis=1)
    lam = significance.lyapunov_exponents(steps, distances)
    assert math.isnan(lam[0])
    assert lam[1:] == pytest.approx(np.full(len(steps) - 1, rate), rel=1e-6)
    assert significance.lyapunov_at(steps, distances, 10_000) == pytest.approx(rate, rel=1e-6)
    assert math.isnan(significance.lyapunov_at(steps, distances, 10_500))


def test_lyapunov_of_a_wobbling_divergence_tends_to_its_rate():
    steps = np.arange(0, 200_001, 1000)
    distances = 1e-7 * np.exp(1e-3 * steps + 0.5 * np.sin(steps / 7000))
    lam = significance.lyapunov_exponents(steps, distances)
    # The wobble's share of lambda(t) falls as 1/t: at most 0.5 / t.
    assert abs(lam[-1] - 1e-3) <= 0.5 / 200_000 + 1e-15
    assert abs(lam[1] - 1e-3) > 10 * abs(lam[-1] - 1e-3)


@pytest.mark.parametrize("steps, distances", [([1, 2], [1e-7, 1e-6]), ([0, 1], [0.0, 1e-6]), ([0, 2, 1], [1, 2, 3]),
                                              ([0, 1], [1.0])])
def test_lyapunov_rejects_a_bad_trace(steps, distances):
    with pytest.raises(ValueError):
        significance.lyapunov_exponents(steps, distances)


def test_twin_decorrelation_is_one_for_independent_runs():
    rng = np.random.default_rng(3)
    seeds = rng.normal(2.1, 0.01, 20_000)
    unrelated = np.abs(rng.normal(2.1, 0.01, 20_000) - rng.normal(2.1, 0.01, 20_000))
    assert significance.twin_decorrelation(unrelated, seeds) == pytest.approx(1.0, abs=0.03)
    assert significance.twin_decorrelation(unrelated * 1e-4, seeds) < 0.01
    assert math.isnan(significance.twin_decorrelation([0.01], [2.1]))


def test_chaos_verdict():
    seeds = [2.158, 2.160, 2.161, 2.163, 2.165]
    sd = np.std(seeds, ddof=1)
    chaotic = significance.chaos_verdict(twin_gaps=[sd, 0.5 * sd, 1.5 * sd], seed_values=seeds)
    assert chaotic["chaotic"] is True and "seed spread" in chaotic["basis"]
    assert significance.chaos_verdict(twin_gaps=[1e-5] * 5, seed_values=seeds)["chaotic"] is False
    # One seed: the parameter trace decides, against growth by 0.1 / perturbation (1e6 here).
    steps = np.arange(0, 10_001, 1000)
    fast = 1e-7 * np.exp(2e-3 * steps)   # grows by e^20 = 4.9e8
    slow = 1e-7 * (1 + steps / 100)       # grows by 101
    by_trace = significance.chaos_verdict(seed_values=[2.16], steps=steps, distances=fast, perturbation=1e-7)
    assert by_trace["chaotic"] is True and by_trace["lyapunov_end"] == pytest.approx(2e-3)
    assert significance.chaos_verdict(steps=steps, distances=slow, perturbation=1e-7)["chaotic"] is False
    # the lecture notes' original run grew 4.7e6-fold: chaotic; just under the threshold is not
    assert significance.chaos_verdict(steps=[0, 200_000], distances=[1.0, 4.7e6], perturbation=1e-7)["chaotic"] is True
    assert significance.chaos_verdict(steps=[0, 200_000], distances=[1.0, 0.99e6],
                                      perturbation=1e-7)["chaotic"] is False
    assert significance.chaos_verdict()["chaotic"] is None
