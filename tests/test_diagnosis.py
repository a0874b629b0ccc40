"""Each check of the diagnosis on synthetic tables: it fires above its threshold and stays silent below, and the
prescriptions it writes are config changes that make a valid study."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_config

from actgrad.data import EXPECTED_INIT_LOSS
from actgrad.results import diagnosis as dx
from actgrad.study.load import complete, load
from actgrad.study.settings import variant_spec


@pytest.fixture
def config(names_path):
    cfg = tiny_config(names_path)
    cfg["variants"] = {
        "mlp": {"init": {"C": 1, "W1": "kaiming", "b1": 0.01, "W2": 0.01, "b2": 0}},
        "relu": {"activation": "relu", "init": {"C": 1, "W1": "kaiming", "b1": 0.01, "W2": 0.01, "b2": 0}},
        "deep": {"model": "deep", "batchnorm": False, "gain": 0.5},
        "deep_bn": {"model": "deep", "batchnorm": True, "gain": 1.0},
    }
    return complete(cfg)


def spec(config, name):
    return variant_spec(config, name)


def test_initial_loss(config):
    s = spec(config, "mlp")
    severe = dx.check_initial_loss("mlp", s, pd.Series({"init_loss_mean": EXPECTED_INIT_LOSS + 1.5}))
    warning = dx.check_initial_loss("mlp", s, pd.Series({"init_loss_mean": EXPECTED_INIT_LOSS + 0.2}))
    silent = dx.check_initial_loss("mlp", s, pd.Series({"init_loss_mean": EXPECTED_INIT_LOSS + 0.05}))
    assert (severe["severity"], severe["code"]) == ("severe", "overconfident_output")
    assert severe["prescription"] == {"init": {"W2": 0.01, "b2": 0}}
    assert warning["severity"] == "warning" and silent["severity"] is None
    deep = dx.check_initial_loss("deep", spec(config, "deep"), pd.Series({"init_loss_mean": 5.0}))
    assert deep["prescription"] == {"last_layer_scale": pytest.approx(0.01)}


def test_saturation_against_the_kaiming_net_of_the_same_shape(config):
    s = spec(config, "mlp")
    fired = dx.check_saturation("mlp", s, pd.Series({"sat97_init_mean": 70.0}), 3)
    silent = dx.check_saturation("mlp", s, pd.Series({"sat97_init_mean": 22.0}), 3)
    assert 15 < fired["predicted"] < 25  # the Kaiming net's share, from the theory (~21 %)
    assert (fired["severity"], fired["code"]) == ("severe", "saturated_activations")
    assert fired["prescription"] == {"init": {"W1": "kaiming", "b1": 0.01}}
    assert silent["severity"] is None
    assert dx.check_saturation("relu", spec(config, "relu"), pd.Series({"sat97_init_mean": 90.0}), 3) is None
    # BatchNorm sets q = 1: its reference is ~3.6 %, so 20 % is already a warning
    bn = dx.check_saturation("deep_bn", spec(config, "deep_bn"), pd.Series({"sat97_init_mean": 20.0}), 3)
    assert bn["severity"] == "warning" and bn["prescription"]["gain"] > 1


def _dead(variant, step, layer, value):
    return {"variant": variant, "step": step, "layer": layer, "kind": "activation", "stat": "dead_units",
            "value": value}


def test_dead_units(config):
    s = spec(config, "relu")  # 200 units
    def dead(at_init, at_end):
        return pd.DataFrame([_dead("relu", 0, "relu1", at_init), _dead("relu", 50, "relu1", at_end)])

    fired = dx.check_dead_units("relu", s, dead(30, 30))
    silent = dx.check_dead_units("relu", s, dead(1, 0))
    late = dx.check_dead_units("relu", s, dead(0, 50))
    assert (fired["severity"], fired["measured"]) == ("severe", 15.0) and fired["prescription"]["init"]["b1"] == 0.01
    assert silent["severity"] is None
    # died during training, not at init: found, but the init is not what to change
    assert late["severity"] == "severe" and late["prescription"] == {}


@pytest.mark.parametrize("ratio, code", [(0.1, "vanishing_gradients"), (1.2, ""), (4.0, "exploding_gradients")])
def test_signal_propagation(config, ratio, code):
    table = pd.DataFrame({"variant": ["deep"], "grad_ratio": [ratio]})
    found = dx.check_signal_propagation("deep", spec(config, "deep"), table)
    assert found["code"] == code
    assert (found["severity"] == "severe") == bool(code)
    if code:
        assert found["prescription"] == {"gain": pytest.approx(1.39, abs=0.01)}  # the theory's gain for 5 tanh layers
        assert "chi_1" in found["sentence"]
    assert dx.check_signal_propagation("deep_bn", spec(config, "deep_bn"), table.assign(variant="deep_bn")) is None


def test_the_phase_named_follows_chi_1_and_the_critical_gain_is_neither_side(config):
    table = pd.DataFrame({"variant": ["deep"], "grad_ratio": [0.1]})
    phases = {gain: dx.check_signal_propagation("deep", dict(spec(config, "deep"), gain=gain, n_layers=80),
                                                table)["sentence"] for gain in (0.5, 1.0, 3.0)}
    assert "in the ordered phase" in phases[0.5] and "in the chaotic phase" in phases[3.0]
    assert "at the critical point" in phases[1.0] and "chaotic" not in phases[1.0]


def test_recommended_gain_balances_the_gradients():
    assert dx.recommended_gain("relu", 5) == pytest.approx(math.sqrt(2), rel=1e-4)
    assert dx.recommended_gain("tanh", 5) == pytest.approx(1.393, abs=0.002)
    assert dx.recommended_gain("tanh", 10) < dx.recommended_gain("tanh", 5) < 5 / 3


def _updates(variant, values):
    rows = [{"variant": variant, "step": i * 10, "layer": "W", "kind": "update", "stat": "log10_update_data",
             "value": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows + [{"variant": variant, "step": 0, "layer": "W", "kind": "weight_grad", "stat": "std",
                                 "value": 1.0}])


@pytest.mark.parametrize("median, code, severity", [(-5.2, "learning_rate_too_low", "severe"), (-3.4, "", None),
                                                    (-1.5, "learning_rate_too_high", "warning")])
def test_update_ratio(config, median, code, severity):
    s = spec(config, "mlp")
    found = dx.check_update_ratio("mlp", s, _updates("mlp", [median - 0.1, median, median + 0.1]))
    assert (found["code"], found["severity"]) == (code, severity)
    if code:
        factor = 10 ** (-3 - median)
        assert found["prescription"]["lr_schedule"][0]["lr"] == pytest.approx(0.1 * factor, rel=0.05)


def test_update_ratio_reads_only_the_first_learning_rate(config):
    s = spec(config, "mlp") | {"lr_schedule": [{"from_step": 0, "lr": 0.1}, {"from_step": 20, "lr": 0.01}]}
    found = dx.check_update_ratio("mlp", s, _updates("mlp", [-3.0, -3.0, -6.0, -6.0, -6.0]))
    assert found["measured"] == -3.0 and found["severity"] is None


def test_divergence(config):
    s = spec(config, "mlp")
    found = dx.check_divergence("mlp", s, pd.Series({"seeds": 2, "diverged": 1}), _updates("mlp", [-1.0]))
    assert (found["code"], found["severity"], found["measured"]) == ("diverged", "severe", 50.0)
    assert found["prescription"]["lr_schedule"][0]["lr"] == pytest.approx(0.001)
    assert dx.check_divergence("mlp", s, pd.Series({"seeds": 2, "diverged": 0}), _updates("mlp", [-1.0]))[
        "severity"] is None


def test_still_falling(config):
    s = spec(config, "mlp") | {"max_steps": 400, "lr_schedule": [{"from_step": 0, "lr": 0.1}]}
    rng = np.random.default_rng(0)
    t = np.arange(400) + 1.0
    falling = 2 + 8 / np.sqrt(t) + rng.normal(0, 0.05, 400)
    flat = 2.3 + rng.normal(0, 0.05, 400)
    fired = dx.check_still_falling("mlp", s, [dx.doubling_gain(falling, s["lr_schedule"])] * 2)
    silent = dx.check_still_falling("mlp", s, [dx.doubling_gain(flat, s["lr_schedule"])] * 2)
    assert (fired["code"], fired["severity"]) == ("still_improving", "warning")
    assert fired["prescription"]["max_steps"] >= 800
    assert fired["prescription"]["lr_schedule"][1] == {"from_step": fired["prescription"]["max_steps"] // 2,
                                                        "lr": 0.01}
    assert silent["severity"] is None
    # noise alone does not fire it, however short the run
    noisy = dx.check_still_falling("mlp", s, [(0.08, 0.05)])
    assert noisy["severity"] is None


def test_batchnorm_statistics(config):
    s = spec(config, "deep_bn") | {"batch_size": 4}
    runs = lambda gap: pd.DataFrame({"variant": ["deep_bn"] * 2, "status": ["ok"] * 2, "val_loss": [2.5 + gap] * 2,
                                     "val_loss_batch_stats": [2.5, 2.5]})
    assert dx.check_batchnorm("deep_bn", s, runs(0.1))["severity"] == "warning"
    assert dx.check_batchnorm("deep_bn", s, runs(800.0))["severity"] == "severe"
    assert dx.check_batchnorm("deep_bn", s, runs(0.1))["prescription"] == {"batch_size": 32}
    assert dx.check_batchnorm("deep_bn", s, runs(0.01))["severity"] is None
    assert dx.check_batchnorm("mlp", spec(config, "mlp"), runs(5.0).assign(variant="mlp")) is None


def test_chaos_is_information_with_the_seeds_needed():
    chaos = pd.DataFrame({"variant": ["a", "b"], "chaotic": [True, False], "decorrelation": [0.9, 0.1],
                          "threshold": [0.5, 0.5]})
    sig = pd.DataFrame({"before": ["a"], "after": ["b"], "seeds_needed": [12]})
    found = dx.check_chaos("a", chaos, sig)
    assert (found["severity"], found["code"]) == ("info", "chaotic_training") and "12 seeds" in found["sentence"]
    assert dx.check_chaos("b", chaos, sig) is None
    # one seed: no decorrelation to quote; the sentence gives the chaos table's basis, never "nan"
    one_seed = pd.DataFrame({"variant": ["a"], "chaotic": [True], "decorrelation": [float("nan")], "threshold": [0.5],
                             "basis": ["twins' parameter distance grew by >= 0.1/1e-07"]})
    sentence = dx.check_chaos("a", one_seed, sig)["sentence"]
    assert "nan" not in sentence and "twins' parameter distance grew by >= 0.1/1e-07" in sentence


def _finding(variant, code, severity, fix, check="initial_loss"):
    return {"variant": variant, "code": code, "severity": severity, "prescription": json.dumps(fix), "check": check}


def test_the_most_severe_findings_are_treated_first():
    findings = pd.DataFrame([
        _finding("a", "exploding_gradients", "severe", {"gain": 1.41}),
        _finding("a", "dead_units", "severe", {}),
        _finding("a", "overconfident_output", "warning", {"last_layer_scale": 0.01}),
        _finding("b", "overconfident_output", "severe", {"init": {"W2": 0.01, "b2": 0}}),
        _finding("b", "saturated_activations", "severe", {"init": {"W1": "kaiming", "b1": 0.01}}),
        _finding("c", "learning_rate_too_low", "warning", {"lr_schedule": [{"from_step": 0, "lr": 0.1}]}),
        _finding("c", "still_improving", "warning", {"max_steps": 9000}, "still_falling"),
        _finding("d", "diverged", "severe", {"lr_schedule": [{"from_step": 0, "lr": 0.01}]}, "divergence"),
        _finding("d", "batchnorm_running_statistics", "severe", {"batch_size": 32}, "batchnorm_statistics"),
        _finding("e", "still_improving", "warning", {"max_steps": 9000}, "still_falling"),
    ])
    assert dx.prescription_of(findings, "a") == {"gain": 1.41}
    assert dx.prescription_of(findings, "b") == {"init": {"W2": 0.01, "b2": 0, "W1": "kaiming", "b1": 0.01}}
    assert dx.prescription_of(findings, "c") == {"lr_schedule": [{"from_step": 0, "lr": 0.1}]}
    assert dx.prescription_of(findings, "c", include_warnings=False) == {}
    # a symptom's fix only where no cause of the same severity has one
    assert dx.prescription_of(findings, "d") == {"batch_size": 32}
    assert dx.prescription_of(findings, "e") == {"max_steps": 9000}


def test_written_fixes_are_a_valid_study_with_the_comparisons_kept(names_path, tmp_path):
    from conftest import write_config

    written = tiny_config(names_path)
    study_path = write_config(tmp_path, written, "study.yaml")
    completed = load(study_path)
    findings = pd.DataFrame([_finding("fix_tanh", "overconfident_output", "severe", {"init": {"W2": 0.001}})])
    study = dx.fix_study(written, completed, findings, "study.yaml")
    out = tmp_path / "fixes.yaml"
    out.write_text(yaml.safe_dump(study))
    fixed = load(out)
    assert fixed["variants"]["fix_tanh__fixed"]["init"]["W2"] == 0.001
    assert fixed["variants"]["fix_tanh__fixed"]["init"]["W1"] == 0.2  # the rest of the variant kept
    families = fixed["comparisons"]["families"]
    assert families["prescriptions"] == {"pairs": [["fix_tanh", "fix_tanh__fixed"]]}
    with pytest.raises(ValueError, match="nothing to fix"):
        dx.fix_study(written, completed, findings.iloc[0:0], "study.yaml")
