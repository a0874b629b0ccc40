"""Sweeps, theory, no workflow run: which sweep points the report shows in full, the theory table from a study's
statistics, and the phase diagram and report groups drawn from them."""

import math

import numpy as np
import pandas as pd
import pytest

from actgrad.report.contents import featured_variants
from actgrad.study.load import complete

SWEEP_CONFIG = {
    "names_url": "unused", "names_sha256": "0" * 64, "seeds": [2147483647, 1], "max_steps": 10,
    "variants": {"fix_tanh": {"init": {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}}},
    "sweeps": {"deep": {"base": {"model": "deep", "n_layers": 3, "n_hidden": 32},
                        "grid": {"gain": [0.25, 0.5, 1, 1.6666666666666667, 2, 3], "batchnorm": [False, True]}},
               "width": {"base": {"model": "deep"}, "grid": {"n_hidden": [16, 32, 64, 128, 256]}}},
}


@pytest.fixture(scope="module")
def config():
    return complete(dict(SWEEP_CONFIG))


def test_the_lecture_gains_are_shown_in_full_and_a_gainless_sweep_shows_its_ends_and_middle(config):
    featured = featured_variants(config)
    assert featured[0] == "fix_tanh"
    deep = [n for n in featured if n.startswith("deep__")]
    assert deep == [f"deep__gain{g}__{bn}" for g in ("0p5", "1", "1p667", "3") for bn in ("nobn", "bn")]
    assert [n for n in featured if n.startswith("width__")] == ["width__width16", "width__width64", "width__width256"]


def _fake_stats(config, values):
    """A study stats table at step 0 for the deep gain-0.5 point: ``values(layer, stat, seed)``."""
    rows = []
    for seed in (2147483647, 1):
        for i in (1, 2, 3):
            for kind, stat in (("activation", "std"), ("activation", "saturated_pct"), ("preactivation", "std"),
                               ("activation_grad", "std")):
                rows.append(("deep__gain0p5__nobn", seed, 0, f"tanh{i}", kind, stat, values(i, (kind, stat), seed)))
    return pd.DataFrame(rows, columns=["variant", "seed", "step", "layer", "kind", "stat", "value"])


def test_the_theory_table_compares_the_mean_over_seeds_with_the_prediction(config):
    from actgrad.results.summary import theory_table
    from actgrad.results.theory import propagate

    predicted = propagate(3, 0.5)

    def values(i, key, seed):
        p = predicted[i - 1]
        base = {("activation", "std"): p.activation_std, ("activation", "saturated_pct"): 0.0,
                ("preactivation", "std"): p.preactivation_std, ("activation_grad", "std"): 1e-3 * i}[key]
        return base * (1.1 if seed == 1 else 0.9)  # the two seeds 10 % either side of the theory

    table = theory_table(config, _fake_stats(config, values))
    assert set(table.variant) == {"deep__gain0p5__nobn"}
    act = table[table.quantity == "activation_std"].set_index("layer")
    assert act.predicted.tolist() == pytest.approx([p.activation_std for p in predicted])
    assert act.relative_difference.abs().max() < 1e-9  # the mean of 0.9 and 1.1 times the theory
    assert act.relative_difference_lecture_seed.tolist() == pytest.approx([-0.1] * 3)
    assert act.measured_sd.tolist() == pytest.approx([math.sqrt(0.02) * p.activation_std for p in predicted])
    rel = table[table.quantity == "grad_std_rel_last"].set_index("layer").measured_mean
    assert rel.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert table[table.quantity == "saturated_pct"].relative_difference.isna().all()  # ~1e-90 % predicted


def test_the_phase_diagram_draws_points_and_theory(config, tmp_path):
    from actgrad.report.figures import curves_of, save, sweep_phase_figure
    from actgrad.results.summary import theory_curves_table

    rows = []
    for name in [n for n in config["variants"] if n.startswith("deep__")]:
        point = config["variants"][name]["sweep"]["point"]
        for metric in ("last_activation_std", "last_saturated_pct", "grad_ratio_first_last", "val_loss",
                       "twin_final_abs_delta"):
            rows.append({"sweep": "deep", "variant": name, **point, "metric": metric, "mean": 0.5, "sd": 0.1, "n": 2,
                         "predicted": np.nan})
    rows = pd.DataFrame(rows)
    curves, critical = curves_of(theory_curves_table(config, rows), "deep")
    assert set(curves) == {"no BatchNorm", "BatchNorm"} and critical == pytest.approx(1.0, abs=1e-6)
    assert curves["BatchNorm"].last_activation_std.std() < 1e-12  # q = 1 whatever the gain
    fig = sweep_phase_figure(rows, ["gain", "batchnorm"], curves, critical)
    assert [ax.get_xscale() for ax in fig.axes[:5]] == ["log"] * 5
    assert len(fig.axes[0].lines) >= 3  # two theory curves and the critical gain
    save(fig, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_folds_each_sweeps_theory_rows(config):
    from actgrad.report.html import nav_groups, theory_groups
    from actgrad.results.summary import theory_table

    table = theory_table(config, _fake_stats(config, lambda i, key, seed: 0.5))
    groups = theory_groups(config, table)
    assert [(g["title"], g["folded"]) for g in groups] == [("sweep deep", True)]
    assert [r["layer"] for r in groups[0]["variants"][0]["rows"]] == ["tanh1", "tanh2", "tanh3"]
    nav = nav_groups(config, featured_variants(config))
    assert [g["title"] for g in nav] == ["Variants", "Sweep deep", "Sweep width"]
    assert nav[1]["n"] == 12 and len(nav[1]["variants"]) == 8
