"""The statistics in the summary, the figures and the report: corrected comparisons with intervals and effect sizes,
the seeds needed, the lecture's number in our spread, and chaos measured as a rate.

The runs here are written by hand (no training): two shallow variants with sensitivity twins whose
parameter distance grows at a known rate, and final losses chosen so that one variant's twins end as
far apart as two seeds and the other's do not. The real workflow's run is in test_report.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LECTURE_SEED, tiny_config

from actgrad.results import significance
from actgrad.study import comparisons
from actgrad.study.load import complete

SEEDS = [LECTURE_SEED, 1, 2, 3, 4]
STEPS = 200
RATES = {"calm": -0.002, "wild": 0.05}  # lambda of each variant's twin trace, per step
STATS_STEPS = [0, 50, 100, 150, 199]
PERTURBATION = 1e-7
TEMPLATE = Path(__file__).resolve().parents[1] / "report" / "report.html.j2"


def fake_config(names: Path) -> dict:
    config = tiny_config(names, seeds=SEEDS, max_steps=STEPS,
                         sensitivity={"enabled": True, "w1_perturbation": PERTURBATION})
    init = {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}
    config["variants"] = {
        # flagged chaotic by its references, though its twins stay together: flag and measurement disagree
        "calm": {"init": init, "references": [{"source": "test", "val_loss": 2.1, "train_loss": 2.0,
                                               "steps": STEPS, "chaotic_after_step": 1000}]},
        "wild": {"init": init},
    }
    return complete(config)


def write_fake_runs(root: Path, rng: np.random.Generator) -> list[Path]:
    """Every run's metrics, losses (with the twin's) and statistics (with the twins' parameter distance)."""
    paths = []
    for variant, rate in RATES.items():
        for seed in SEEDS:
            run = root / "runs" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            # final losses: the seed sets a level; the calm twin ends 1e-6 away, the wild one at another level
            level = (2.0 if variant == "calm" else 2.3) + 0.05 * rng.standard_normal()
            loss = level + 0.01 * rng.standard_normal(STEPS)
            twin = loss + (1e-6 if variant == "calm" else 0.1)
            pd.DataFrame({"step": np.arange(STEPS), "loss": loss, "twin_loss": twin}).to_parquet(
                run / "losses.parquet")
            steps = np.array(STATS_STEPS)
            distance = 0.3 * PERTURBATION * np.exp(rate * steps) * (1 + 0.01 * seed % 7)
            stats = pd.DataFrame({"step": steps, "layer": "parameters", "kind": "twin", "stat": "distance",
                                  "value": distance})
            stats.to_parquet(run / "stats.parquet")
            metrics = {"variant": variant, "seed": seed, "model": "mlp", "batchnorm": False, "status": "ok",
                       "steps": STEPS, "steps_done": STEPS, "val_loss": level + 0.02, "train_loss": level,
                       "twin_w1_perturbation": PERTURBATION,
                       "twin_final_abs_delta": float(abs(loss[-1] - twin[-1]))}
            (run / "metrics.json").write_text(json.dumps(metrics))
            paths.append(run / "metrics.json")
    return paths


@pytest.fixture
def fake_study(tmp_path, names_path):
    from actgrad.results.summary import run_table
    from actgrad.rundir import read_runs

    config = fake_config(names_path)
    run_list = read_runs(write_fake_runs(tmp_path, np.random.default_rng(17)))
    by_variant = {}
    for r in run_list:
        by_variant.setdefault(r.variant, []).append(r)
    return {"config": config, "runs": run_table(run_list), "run_list": run_list, "by_variant": by_variant,
            "root": tmp_path}


def flag(x):
    """A cell of a yes/no/unknown column as True, False or None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else bool(x)


def _window_means(run, column: str) -> float:
    return float(run.losses()[column].to_numpy()[-10:].mean())  # final_window(200) = 10 steps


# -- the summary's tables ----------------------------------------------------------------------------------------
def test_chaos_table_measures_the_rate_and_the_decorrelation(fake_study):
    from actgrad.results.summary import CHAOS_COLUMNS, chaos_table
    from actgrad.results.vocabulary import averaging_window as final_window

    assert final_window(STEPS) == 10 and final_window(200_000) == 1000
    chaos = chaos_table(fake_study["config"], fake_study["runs"], fake_study["by_variant"]).set_index("variant")
    assert list(chaos.reset_index().columns) == CHAOS_COLUMNS
    for variant, rate in RATES.items():
        row = chaos.loc[variant]
        assert row.seeds == len(SEEDS) and row.last_step == STATS_STEPS[-1]
        # d(t) = d0 exp(rate t): every seed's lambda is the rate itself
        assert row.lyapunov_last_mean == pytest.approx(rate, rel=1e-9)
        assert row.lyapunov_last_lecture_seed == pytest.approx(rate, rel=1e-9)
        assert math.isnan(row.lyapunov_10k_mean)  # step 10,000 was not logged
        assert row.growth == pytest.approx(math.exp(rate * STATS_STEPS[-1]))
        runs = fake_study["by_variant"][variant]
        base = np.array([_window_means(r, "loss") for r in runs])
        gaps = np.abs(base - np.array([_window_means(r, "twin_loss") for r in runs]))
        expected = gaps.mean() / (2 * base.std(ddof=1) / math.sqrt(math.pi))
        assert row.decorrelation == pytest.approx(expected)
        assert row.twin_gap_mean == pytest.approx(gaps.mean()) and row.seed_sd == pytest.approx(base.std(ddof=1))
    assert flag(chaos.loc["wild", "chaotic"]) is True and chaos.loc["wild", "decorrelation"] > 0.5
    assert flag(chaos.loc["calm", "chaotic"]) is False and chaos.loc["calm", "decorrelation"] < 1e-3
    # the config flags calm (a chaotic_after_step), the measurement does not: both are kept, and marked
    assert flag(chaos.loc["calm", "config_chaotic"]) is True and flag(chaos.loc["calm", "agrees"]) is False
    assert flag(chaos.loc["wild", "config_chaotic"]) is False and flag(chaos.loc["wild", "agrees"]) is False
    assert chaos.loc["wild", "lyapunov_last_values"].count(":") == len(SEEDS)


def test_chaos_table_with_one_seed_reads_the_trace(fake_study):
    from actgrad.results.summary import chaos_table

    one = {v: runs[:1] for v, runs in fake_study["by_variant"].items()}
    chaos = chaos_table(fake_study["config"], fake_study["runs"], one).set_index("variant")
    # wild grew by exp(0.05 * 199) = 2e4 < 1/1e-7: not chaotic by the trace rule; calm shrank
    assert flag(chaos.loc["wild", "chaotic"]) is False and "grew" in chaos.loc["wild", "basis"]
    assert math.isnan(chaos.loc["wild", "decorrelation"])


def test_chaos_table_without_twins_is_empty_with_its_columns(fake_study):
    from actgrad.results.summary import CHAOS_COLUMNS, chaos_table

    config = dict(fake_study["config"], sensitivity={"enabled": False, "w1_perturbation": PERTURBATION})
    table = chaos_table(config, fake_study["runs"], fake_study["by_variant"])
    assert table.empty and list(table.columns) == CHAOS_COLUMNS


def test_reference_check_places_the_lecture_in_our_spread(fake_study):
    from actgrad.results.summary import SPREAD_COLUMNS, reference_table

    runs = fake_study["runs"]
    refs = reference_table(fake_study["config"], runs, {(r.variant, r.seed): r for r in fake_study["run_list"]})
    assert set(SPREAD_COLUMNS) <= set(refs.columns)
    val = refs[refs.quantity == "val loss"].iloc[0]
    ours = runs[runs.variant == "calm"].val_loss.to_numpy(float)
    z = (2.1 - ours.mean()) / ours.std(ddof=1)
    assert val.spread_n == len(SEEDS) and val.spread_z == pytest.approx(z)
    assert val.spread_rank == 1 + int((ours < 2.1).sum())
    direction = "above" if z > 0 else "below"
    assert val.spread_sentence.startswith(f"the lecture's 2.1000 is {abs(z):.1f} sd {direction} our mean of 5 seeds")


def test_significance_uses_the_configs_comparisons_and_writes_every_input(fake_study):
    from actgrad.results.summary import study_significance

    table = study_significance(fake_study["config"], fake_study["runs"])
    assert list(table.columns) == significance.SIGNIFICANCE_COLUMNS
    row = table.iloc[0]
    assert (row.family, row.before, row.after) == ("mlp_consecutive", "calm", "wild")
    runs = fake_study["runs"]
    a = runs[runs.variant == "calm"].val_loss.to_numpy(float)
    b = runs[runs.variant == "wild"].val_loss.to_numpy(float)
    assert row.values_before == ";".join(repr(float(v)) for v in a)
    assert row.difference == pytest.approx(b.mean() - a.mean()) and row.verdict == significance.WORSENS


def test_sweep_grids_compare_along_each_key(names_path):
    from actgrad.study.comparisons import sweep_grids

    config = tiny_config(names_path)
    config["sweeps"] = {"g": {"variant": "deep_bn", "grid": {"gain": [0.5, 1.0, 3.0], "batchnorm": [False, True]}}}
    config = complete(config)
    grids = sweep_grids(config)
    names = [n for n in config["variants"] if n.startswith("g__")]
    assert len(names) == 6
    assert grids == {
        "g_gain": [["g__gain0p5__nobn", "g__gain1__nobn", "g__gain3__nobn"],
                   ["g__gain0p5__bn", "g__gain1__bn", "g__gain3__bn"]],
        "g_batchnorm": [["g__gain0p5__nobn", "g__gain0p5__bn"], ["g__gain1__nobn", "g__gain1__bn"],
                        ["g__gain3__nobn", "g__gain3__bn"]],
    }
    assert sweep_grids(complete(tiny_config(names_path))) == {}


# -- the figure -----------------------------------------------------------------------------------------------------
def test_lyapunov_figure_is_drawn_for_studies_with_twins(fake_study, tmp_path):
    from actgrad.report import canvas, figures
    from actgrad.report.contents import study_figures
    from actgrad.results.summary import twin_traces_table
    from actgrad.study.settings import variant_spec

    traces = twin_traces_table(fake_study["by_variant"])
    assert sorted(traces.variant.unique()) == ["calm", "wild"] and set(traces.perturbation) == {PERTURBATION}
    assert traces[traces.variant == "wild"].groupby("seed").size().tolist() == [len(STATS_STEPS)] * len(SEEDS)
    diverged = fake_study["by_variant"]["wild"][1]
    diverged.metrics["diverged_at"] = 120  # like the chaos table, the traces leave a diverged run out
    assert twin_traces_table({"wild": fake_study["by_variant"]["wild"]}).seed.nunique() == len(SEEDS) - 1
    diverged.metrics["diverged_at"] = None
    fig = figures.lyapunov_figure(traces, ["calm", "wild"])
    rate_axis = fig.axes[0]
    mean_line = [line for line in rate_axis.get_lines() if line.get_label() == "wild"][0]
    assert np.allclose(mean_line.get_ydata(), RATES["wild"])  # the mean over seeds of the known rate
    assert canvas.png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    specs = [variant_spec(fake_study["config"], v) for v in fake_study["config"]["variants"]]
    assert "lyapunov" in study_figures(specs)
    assert "lyapunov" not in study_figures([dict(s, sensitivity_twin=False) for s in specs])
    assert (Path(__file__).resolve().parents[1] / "workflow" / "report" / "lyapunov.rst").exists()


# -- the report ------------------------------------------------------------------------------------------------------
def write_tables(fake_study, results: Path) -> dict:
    from actgrad.results.summary import chaos_table, reference_table, study_significance, variant_table
    from actgrad.results.vocabulary import TABLES

    config, runs = fake_study["config"], fake_study["runs"]
    tables = {
        "summary": runs, "variants": variant_table(runs, list(config["variants"])),
        "significance": study_significance(config, runs), "chaos": chaos_table(config, runs, fake_study["by_variant"]),
        "references": reference_table(config, runs, {(r.variant, r.seed): r for r in fake_study["run_list"]}),
    }
    results.mkdir()
    for name, filename in TABLES.items():
        path = results / filename
        path.write_text(tables[name].to_csv(index=False) if name in tables else "")
    return tables


def test_report_states_verdicts_intervals_effect_sizes_spread_and_chaos(fake_study, tmp_path):
    from actgrad.report.html import write_report

    tables = write_tables(fake_study, tmp_path / "results")
    out = tmp_path / "report.html"
    write_report(fake_study["config"], tmp_path / "results", tmp_path / "figures", TEMPLATE, out, log=lambda m: None)
    html = out.read_text()
    method = html.split('id="significance-method">')[1].split("</p>")[0]
    for needle in ("Welch 1947", "Holm 1979", "Hedges 1981", "Welch-Satterthwaite"):
        assert needle in method
    table = html.split('id="significance-table"')[1].split("</table>")[0]
    sig = tables["significance"].iloc[0]
    assert "family mlp_consecutive: Holm over 1 tested comparison<" in table
    assert f"[{sig.ci_low:+.4f}, {sig.ci_high:+.4f}]" in table and f"{sig.hedges_g:+.2f}" in table
    assert f"{sig.difference:+.4f}" in table and ">worsens<" in table
    text = re.sub(r"<[^>]+>", " ", html)
    assert "within the seed noise" not in text and not re.search(r"\bequal\b", table)
    # the lecture's final loss in our spread, as the summary wrote it
    sentence = tables["references"].dropna(subset=["spread_sentence"]).spread_sentence.iloc[0]
    assert sentence.replace("'", "&#39;") in html
    chaos = html.split('id="chaos-table"')[1].split("</table>")[0]
    assert f"{RATES['wild']:+.2e}" in chaos and f"{RATES['calm']:+.2e}" in chaos
    assert chaos.count(">chaotic<") == 1 and chaos.count(">not chaotic<") == 1
    assert chaos.count("≠ measured") == 2  # calm is flagged and measured calm; wild the other way round
    assert 'href="#chaos"' in html


def test_report_shows_the_seeds_needed_where_nothing_was_detected(fake_study, tmp_path):
    from actgrad.report.html import significance_rows

    runs = fake_study["runs"]
    close = runs.copy()
    close.loc[close.variant == "wild", "val_loss"] = close[close.variant == "calm"].val_loss.to_numpy() + \
        np.array([0.04, -0.03, 0.05, -0.02, 0.01])
    table = significance.significance_table(close, [comparisons.Comparison("f", "calm", "wild")])
    row = table.iloc[0]
    assert row.verdict == significance.NOT_DETECTED and row.seeds_needed > len(SEEDS)
    rows = significance_rows(table)
    assert rows[0] == {"family": "f", "m": 1}
    assert rows[1]["seeds_needed"] == f"{int(row.seeds_needed):,}" and rows[1]["cls"] == "noise"
    detected = significance_rows(significance.significance_table(runs, [comparisons.Comparison("f", "calm", "wild")]))
    assert detected[1]["seeds_needed"] == "" and detected[1]["cls"] == "worse"
