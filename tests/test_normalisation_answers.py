"""The normalisation questions answered with the study's one standard of evidence: Welch's test with Holm's
correction (results/normalisation_tests.csv), diverged runs counted and never read as a tie."""

import numpy as np
import pandas as pd
import pytest
from conftest import NAMES_SHA256

from actgrad.report.html import normalisation_section
from actgrad.results import significance
from actgrad.results.normalisation import (
    BATCHNORM_BREAKDOWN,
    GAIN_MATTERS,
    LAYERNORM_VS_BATCHNORM,
    normalisation_table,
    normalisation_tests,
)
from actgrad.study.load import complete

SEEDS = [1, 2, 3]
GAINS = [1.0, 5 / 3]


def _config(norms=("batchnorm", "layernorm"), sizes=(4, 32)):
    return complete({
        "names_url": "names.txt", "names_sha256": NAMES_SHA256, "seeds": SEEDS, "max_steps": 10, "variants": None,
        "sweeps": {"coupling": {"base": {"model": "deep", "n_layers": 2, "n_hidden": 8},
                                "grid": {"norm": list(norms), "batch_size": list(sizes), "gain": GAINS}}}})


def _runs(config, loss, diverged=lambda variant, seed: False):
    """A runs table: every run of every variant with val_loss = loss(spec, seed)."""
    rows = []
    for name, v in config["variants"].items():
        point = v["sweep"]["point"]
        for seed in SEEDS:
            bad = diverged(point, seed)
            rows.append({"variant": name, "seed": seed, "status": "diverged" if bad else "ok",
                         "val_loss": np.nan if bad else loss(point, seed)})
    return pd.DataFrame(rows)


def _noise(seed):
    return {1: -0.01, 2: 0.0, 3: 0.012}[seed]


def test_a_cell_with_one_finished_run_is_untestable_and_its_diverged_runs_are_counted():
    config = _config()
    # BatchNorm at batch 4: 5 of 6 runs diverge (both gains x 3 seeds); the sixth ends far off
    diverged = lambda p, s: p["norm"] == "batchnorm" and p["batch_size"] == 4 and (p["gain"], s) != (1.0, 1)
    runs = _runs(config, lambda p, s: (135.8 if p["norm"] == "batchnorm" and p["batch_size"] == 4 else 2.3)
                 + _noise(s), diverged)
    tests = normalisation_tests(config, runs)
    row = tests[(tests.question == LAYERNORM_VS_BATCHNORM) & (tests.batch_size == 4)].iloc[0]
    assert (row.n_before, row.diverged_before, row.n_after, row.diverged_after) == (1, 5, 6, 0)
    assert row.verdict == significance.TOO_FEW_SEEDS  # never "no difference"
    section = normalisation_section(config, normalisation_table(config, runs), tests)
    answers = dict(section["answers"])
    assert "batch 4: untestable: BatchNorm 5 of 6 diverged, LayerNorm 6 finished" in answers[LAYERNORM_VS_BATCHNORM]
    assert "match" not in answers[LAYERNORM_VS_BATCHNORM]
    # the breakdown counts the diverged runs: batch 4 is where BatchNorm fails
    assert "breaks down at batch 4" in answers[BATCHNORM_BREAKDOWN]
    assert "5 of 6 BatchNorm runs diverged" in answers[BATCHNORM_BREAKDOWN]


def test_layernorm_against_batchnorm_uses_welch_and_holm_over_the_batch_sizes():
    config = _config()
    # LayerNorm clearly better at batch 4, the same at batch 32
    runs = _runs(config, lambda p, s: (2.5 if (p["norm"], p["batch_size"]) == ("batchnorm", 4) else 2.3) + _noise(s))
    tests = normalisation_tests(config, runs)
    ln = tests[tests.question == LAYERNORM_VS_BATCHNORM].set_index("batch_size")
    assert list(ln.family.unique()) == ["layernorm_vs_batchnorm"] and ln.m_family.tolist() == [2, 2]
    assert ln.loc[4, "verdict"] == significance.IMPROVES and ln.loc[32, "verdict"] == significance.NOT_DETECTED
    a = runs[runs.variant.str.contains("batchnorm") & runs.variant.str.contains("batch4")].val_loss
    b = runs[runs.variant.str.contains("layernorm") & runs.variant.str.contains("batch4")].val_loss
    assert ln.loc[4, "p"] == pytest.approx(significance.welch_test(a, b)["p"])
    answers = dict(normalisation_section(config, normalisation_table(config, runs), tests)["answers"])
    assert "batch 4: LayerNorm is better" in answers[LAYERNORM_VS_BATCHNORM]
    assert "batch 32: no difference detected" in answers[LAYERNORM_VS_BATCHNORM]
    assert "breaks down at batch 4" in answers[BATCHNORM_BREAKDOWN]


def test_without_layernorm_batchnorm_is_compared_with_its_largest_batch():
    config = _config(norms=("batchnorm", "none"), sizes=(4, 8, 32))
    runs = _runs(config, lambda p, s: (2.6 if p["batch_size"] == 4 else 2.3) + _noise(s))
    tests = normalisation_tests(config, runs)
    rows = tests[tests.question == BATCHNORM_BREAKDOWN].set_index("batch_size")
    assert sorted(rows.index) == [4, 8] and set(rows.before) == {"batchnorm@batch32"}
    assert rows.loc[4, "verdict"] == significance.WORSENS and rows.loc[8, "verdict"] == significance.NOT_DETECTED
    answer = dict(normalisation_section(config, normalisation_table(config, runs), tests)["answers"])
    assert "BatchNorm at batch 32" in answer[BATCHNORM_BREAKDOWN]
    assert "breaks down at batch 4" in answer[BATCHNORM_BREAKDOWN]


def test_the_gain_question_tests_every_pair_of_gains_within_each_normalisation():
    config = _config()
    runs = _runs(config, lambda p, s: (2.3 if p["norm"] == "batchnorm" or p["gain"] == 1.0 else 2.6) + _noise(s))
    tests = normalisation_tests(config, runs)
    gains = tests[tests.question == GAIN_MATTERS]
    assert set(gains.family) == {"gain_batchnorm", "gain_layernorm"}
    assert (gains.groupby("family").size() == 2).all()  # one pair of gains x two batch sizes
    answer = dict(normalisation_section(config, normalisation_table(config, runs), tests)["answers"])[GAIN_MATTERS]
    assert "BatchNorm: no pair of gains differs detectably (2 pairs tested)" in answer
    assert "LayerNorm: the gain matters: 2 of 2 pairs of gains differ" in answer
