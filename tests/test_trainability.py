"""How deep can it go (results/trainability.csv, the report's section): the rule for "trains", the boundary against
6 xi_c, the gradient ratio at init against the theory, from synthetic runs; and a tiny real study through the
workflow whose report has the section and whose table holds what the runs say."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import NAMES_SHA256, run_snakemake, tiny_config, write_config

from actgrad.report.contents import study_figures, trainability_sweeps
from actgrad.report.trainability import trainability_section
from actgrad.results import theory
from actgrad.results.trainability import (
    DEEPER,
    HOLDS,
    MIXED,
    NO_THEORY,
    SHALLOWER,
    boundary_verdict,
    trainability_curve,
    trainability_table,
    unigram_loss,
)
from actgrad.results.vocabulary import TRAINS_MARGIN
from actgrad.study.load import complete
from actgrad.study.settings import variant_spec

DEPTHS = [2, 10, 40]
GAINS = [0.85, 5 / 3]
BASELINE = 2.82


def _config(grid=None, bn=True):
    sweeps = {"depth": {"base": {"model": "deep", "norm": "none", "n_hidden": 8},
                        "grid": grid or {"n_layers": DEPTHS, "gain": GAINS}}}
    if bn:
        sweeps["depth_bn"] = {"base": {"model": "deep", "norm": "batchnorm", "n_hidden": 8},
                              "grid": {"n_layers": DEPTHS, "gain": [1.0, 3.0]}}
    return complete({"names_url": "names.txt", "names_sha256": NAMES_SHA256, "seeds": [1], "max_steps": 10,
                     "variants": None, "sweeps": sweeps})


def _synthetic(config, val_loss, ratio, status=lambda spec: "ok"):
    """A runs table and per-layer init statistics: val_loss(spec) and the first layer's gradient over the last's,
    ratio(spec), for every variant (one seed)."""
    runs, init = [], []
    for name in config["variants"]:
        spec = variant_spec(config, name)
        st = status(spec)
        runs.append({"variant": name, "seed": 1, "status": st, "init_loss": 3.3,
                     "val_loss": np.nan if st == "diverged" else val_loss(spec)})
        last = spec["n_layers"]
        for layer in range(1, last + 1):  # tanh1 .. tanhL; natural order, not string order (tanh10 < tanh2)
            value = ratio(spec) ** ((last - layer) / max(last - 1, 1)) if last > 1 else 1.0
            init.append({"variant": name, "seed": 1, "layer": f"tanh{layer}", "quantity": "grad_std_rel_last",
                         "value": value})
    return pd.DataFrame(runs), pd.DataFrame(init)


def test_the_rule_fires_at_the_threshold_and_the_boundary_is_read_per_gain():
    config = _config()
    # gain 0.85 trains at 2 and 10 layers only; 5/3 at every depth but 40 exactly at the threshold (trains: <=);
    # BatchNorm at gain 1 trains at 2 only, at gain 3 one run a hair above the threshold (does not train)
    threshold = BASELINE - TRAINS_MARGIN

    def loss(spec):
        d, g, bn = spec["n_layers"], spec["gain"], spec["norm"] == "batchnorm"
        if bn:
            return 2.4 if d == 2 else (threshold + 1e-9 if g == 3.0 and d == 10 else 2.83)
        if g == 0.85:
            return 2.5 if d <= 10 else 2.83
        return threshold if d == 40 else 2.45

    runs, init = _synthetic(config, loss, lambda spec: 1.0)
    table = trainability_table(config, runs, init, BASELINE)
    assert len(table) == 2 * len(DEPTHS) * 2
    cell = table.set_index(["norm", "gain", "n_layers"])
    assert cell.loc[("none", 5 / 3, 40), "trains"] == True  # noqa: E712 (numpy bools)
    assert cell.loc[("batchnorm", 3.0, 10), "trains"] == False  # noqa: E712
    assert cell.loc[("none", 0.85, 40), "trains"] == False  # noqa: E712
    assert cell.loc[("none", 0.85, 2), "deepest_trained"] == 10
    assert cell.loc[("none", 0.85, 2), "shallowest_failed"] == 40
    assert math.isnan(cell.loc[("none", 5 / 3, 2), "shallowest_failed"])
    assert cell.loc[("batchnorm", 1.0, 2), "deepest_trained"] == 2
    # 6 xi_c: 18.5 at 0.85 (10 trains, 40 does not: holds), 72.7 at 5/3 (all of 2..40 train: holds)
    assert cell.loc[("none", 0.85, 2), "boundary"] == HOLDS
    assert cell.loc[("none", 5 / 3, 2), "boundary"] == HOLDS
    assert cell.loc[("batchnorm", 1.0, 2), "boundary"] == NO_THEORY
    assert table.threshold.eq(threshold).all() and table.baseline_loss.eq(BASELINE).all()
    assert cell.loc[("none", 0.85, 40), "loss_fall"] == pytest.approx(3.3 - 2.83)


def test_a_diverged_run_does_not_train_and_is_counted():
    config = _config(bn=False)
    runs, init = _synthetic(config, lambda spec: 2.4, lambda spec: 1.0,
                            status=lambda spec: "diverged" if spec["n_layers"] == 40 and spec["gain"] > 1 else "ok")
    cell = trainability_table(config, runs, init, BASELINE).set_index(["norm", "gain", "n_layers"])
    row = cell.loc[("none", 5 / 3, 40)]
    assert (row.finished, row.diverged, row.trained_runs, row.trains) == (0, 1, 0, False)
    assert cell.loc[("none", 5 / 3, 2), "shallowest_failed"] == 40
    # 40 < 6 xi_c = 72.7 at 5/3 and it does not train: the net stops shallower than the theory
    assert cell.loc[("none", 5 / 3, 2), "boundary"] == SHALLOWER


def test_without_a_baseline_nothing_is_said_to_train():
    config = _config(bn=False)
    runs, init = _synthetic(config, lambda spec: 2.0, lambda spec: 1.0)
    table = trainability_table(config, runs, init, float("nan"))
    assert table.trains.isna().all() and table.deepest_trained.isna().all()
    assert set(table.boundary) == {""}


def test_the_boundary_verdicts():
    assert boundary_verdict([2, 10, 40], [True, True, False], 18.5) == HOLDS
    assert boundary_verdict([2, 10, 40], [True, False, False], 18.5) == SHALLOWER
    assert boundary_verdict([2, 10, 40], [True, True, True], 18.5) == DEEPER
    assert boundary_verdict([2, 10, 40], [True, False, True], 18.5) == MIXED
    assert boundary_verdict([2, 10, 40], [True, True, True], math.inf) == HOLDS  # critical: every depth trains
    assert boundary_verdict([2, 10, 40], [True, True, False], math.inf) == SHALLOWER
    assert boundary_verdict([2, 10], [True, True], math.nan) == NO_THEORY
    assert boundary_verdict([2, 10], [None, None], 18.5) == ""


def test_the_predictions_are_the_theory_and_the_measured_ratio_is_the_first_layer_over_the_last():
    config = _config()
    measured = {0.85: 1e-3, 5 / 3: 50.0, 1.0: 7.0, 3.0: 9.0}

    def ratio(spec):
        return measured[spec["gain"]] * spec["n_layers"]  # grows with depth at every gain

    runs, init = _synthetic(config, lambda spec: 2.4, ratio)
    table = trainability_table(config, runs, init, BASELINE)
    for r in table.itertuples():
        assert r.grad_ratio == pytest.approx(measured[r.gain] * r.n_layers)
        layers = theory.propagate(r.n_layers, r.gain, "tanh", 1.0, 0.0, r.norm)
        assert r.grad_ratio_predicted == pytest.approx(layers[0].grad_std_rel_last)
        if r.norm == "none":
            scales = theory.depth_scale_analysis(r.gain, "tanh", 0.0, r.gain ** 2)
            assert r.chi_1 == pytest.approx(scales.chi_1)
            assert r.grad_ratio_chi1 == pytest.approx(scales.chi_1 ** ((r.n_layers - 1) / 2))
            assert r.trainable_depth == pytest.approx(6 * scales.xi_c)
            assert r.grad_ratio_log10_off == pytest.approx(math.log10(r.grad_ratio / r.grad_ratio_chi1))
        else:
            assert math.isnan(r.grad_ratio_chi1) and math.isnan(r.trainable_depth)
            assert r.grad_ratio_log10_off == pytest.approx(math.log10(r.grad_ratio / r.grad_ratio_predicted))
        assert r.grad_grows == True  # noqa: E712
    # BatchNorm's prediction does not depend on the gain, and grows with depth
    bn = table[table.norm == "batchnorm"]
    assert bn.groupby("n_layers").grad_ratio_predicted.nunique().eq(1).all()
    assert bn.grad_ratio_predicted.is_monotonic_increasing or bn.groupby("gain").grad_ratio_predicted.apply(
        lambda s: s.is_monotonic_increasing).all()
    assert (bn.grad_per_layer_predicted > 1).all()


def test_a_ratio_that_falls_at_one_depth_step_does_not_grow():
    config = _config(bn=False)
    runs, init = _synthetic(config, lambda spec: 2.4, lambda spec: {2: 3.0, 10: 2.0, 40: 50.0}[spec["n_layers"]])
    table = trainability_table(config, runs, init, BASELINE)
    assert table.grad_grows.eq(False).all()


def test_the_question_is_asked_only_by_a_sweep_over_depth_and_gain():
    assert trainability_sweeps(_config()) == ["depth", "depth_bn"]
    gain_only = _config({"n_layers": [5], "gain": GAINS}, bn=False)
    assert trainability_sweeps(gain_only) == []
    specs = [variant_spec(gain_only, n) for n in gain_only["variants"]]
    assert "trainability" not in study_figures(specs, gain_only)
    assert "trainability" in study_figures([variant_spec(_config(), n) for n in _config()["variants"]], _config())
    runs, init = _synthetic(gain_only, lambda spec: 2.4, lambda spec: 1.0)
    table = trainability_table(gain_only, runs, init, BASELINE)
    assert table.empty
    assert trainability_section(gain_only, table) is None


def test_the_curve_is_the_theory_over_the_gains_of_the_unnormalised_sweep():
    curve = trainability_curve(_config())
    assert set(curve.sweep) == {"depth"}  # the BatchNorm sweep has no 6 xi_c
    assert curve.gain.min() == pytest.approx(min(GAINS) / 2) and curve.gain.max() == pytest.approx(max(GAINS) * 2)
    for r in curve.iloc[::37].itertuples():
        scales = theory.depth_scale_analysis(r.gain, "tanh", 0.0, r.gain ** 2)
        assert r.trainable_depth == pytest.approx(6 * scales.xi_c) and r.chi_1 == pytest.approx(scales.chi_1)
    assert trainability_curve(_config({"n_layers": [5], "gain": GAINS}, bn=False)).empty


def test_a_depth_by_gain_sweep_shows_its_lecture_gains_in_full_at_the_lecture_depth_only():
    from actgrad.report.contents import featured_variants

    config = _config({"n_layers": [2, 5, 40], "gain": [0.85, 5 / 3, 3.0]}, bn=False)
    featured = featured_variants(config)
    assert [variant_spec(config, n)["n_layers"] for n in featured] == [5, 5]
    assert sorted(variant_spec(config, n)["gain"] for n in featured) == [5 / 3, 3.0]
    # without the lecture's depth, every depth of the lecture gains, as before
    config = _config({"n_layers": [2, 40], "gain": [0.85, 5 / 3]}, bn=False)
    assert len(featured_variants(config)) == 2


def test_the_unigram_baseline():
    assert unigram_loss([0, 0, 1, 1], [0, 1], 27) == pytest.approx(math.log(2))
    assert unigram_loss([0, 0, 0, 1], [1], 27) == pytest.approx(math.log(4))


def test_the_section_answers_from_the_table():
    config = _config({"n_layers": [2, 5, 80], "gain": [0.85, 5 / 3]})
    runs, init = _synthetic(config, lambda spec: 2.83 if spec["n_layers"] == 80 else 2.4,
                            lambda spec: 2.0 ** spec["n_layers"] if spec["norm"] == "batchnorm" else 1.0)
    section = trainability_section(config, trainability_table(config, runs, init, BASELINE))
    answer = section["answer"]
    assert "The lecture's net (5 layers, gain 5/3) trains within the budget" in answer
    assert "At gain 5/3 the net stops training within the budget at 80 layers (deepest that trains: 5)" in answer
    assert "gain 0.85: trains up to 5 layers, not from 80 against 6ξ_c = 18.5 (holds)" in answer
    assert "With BatchNorm the gradient at init grows with every depth step at every gain" in answer
    assert section["depths"] == [2, 5, 10, 40, 80]  # the BatchNorm sweep has 10 and 40


@pytest.mark.slow
def test_a_tiny_trainability_study_through_the_workflow(tmp_path, names_path):
    """A real depth x gain sweep (2 depths x 2 gains, and BatchNorm at 2 depths x 1 gain): the table holds what the
    runs wrote, the report has the section and its figure."""
    config = tiny_config(names_path, seeds=[1], max_steps=30, engine="batched", samples=0,
                         training_jobs="model",
                         stats={"every": 30, "update_every": 30, "histogram_every": 30, "snapshot_steps": [0],
                                "bins": 10},
                         variants=None,
                         sweeps={"depth": {"base": {"model": "deep", "norm": "none", "n_hidden": 16},
                                           "grid": {"n_layers": [2, 12], "gain": [0.5, 1.6666666666666667]}},
                                 "depth_bn": {"base": {"model": "deep", "norm": "batchnorm", "n_hidden": 16},
                                              "grid": {"n_layers": [2, 12], "gain": [1.0, 3.0]}}})
    cfg = write_config(tmp_path, config)
    run_snakemake(tmp_path, configfile=cfg)
    table = pd.read_csv(tmp_path / "results" / "trainability.csv")
    summary = pd.read_csv(tmp_path / "results" / "summary.csv").set_index("variant")
    assert len(table) == 8
    assert table.baseline_loss.between(2.7, 2.95).all()  # the names' unigram entropy, about 2.82
    for r in table.itertuples():
        run = summary.loc[r.variants]
        assert r.val_loss == pytest.approx(run.val_loss)
        assert r.trains == (run.val_loss <= r.baseline_loss - TRAINS_MARGIN)
        stats = pd.read_parquet(tmp_path / "results" / "runs" / r.variants / "seed1" / "stats.parquet")
        grads = stats[(stats.step == 0) & (stats.kind == "activation_grad") & (stats.stat == "std")].set_index("layer")
        assert r.grad_ratio == pytest.approx(grads.value["tanh1"] / grads.value[f"tanh{r.n_layers}"], rel=1e-5)
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'id="trainability"' in html and 'id="fig-trainability"' in html
    curve = pd.read_csv(tmp_path / "results" / "trainability_curve.csv")
    assert set(curve.sweep) == {"depth"} and curve.trainable_depth.notna().all()
    assert "The answer, from the numbers." in html
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sweeps"]["depth"]["grid"]["n_layers"] == [2, 12]
