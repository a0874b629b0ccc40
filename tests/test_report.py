"""The figures and the HTML report: unit tests on small synthetic data, and one real tiny workflow run.

The real run (:func:`build_study`) is made once per test session and shared with
``test_browser.py``: two variants of the tiny config, a third that diverges at once, sensitivity
twins, and reference values of every kind (matched, missed, chaotic, not reached).
"""

from __future__ import annotations

import base64
import io
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LECTURE_SEED, run_snakemake, tiny_config, write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -- the shared real run ------------------------------------------------------------------------------
_STUDY: dict = {}


def study_config(names: Path) -> dict:
    config = tiny_config(names, sensitivity={"enabled": True, "w1_perturbation": 1e-7})
    config["title"] = "tiny study for the report tests"
    config["variants"]["fix_tanh"]["description"] = "W1 x 0.2, b1 x 0.01: tanh not saturated."
    config["variants"]["fix_tanh"]["references"] = [
        # step 0 is reproduced exactly (it is the lecture's seed and init); step 40 is a made-up miss
        {"source": "test: printed losses", "step_losses": {"0": 3.3135, "40": 1.2345}},
        # final losses after exactly this many steps: compared, and (made up) not matching
        {"source": "test: loss log", "train_loss": 2.0356, "val_loss": 2.1027, "steps": config["max_steps"]},
        # a final loss after the lecture's 200,000 steps: not reached by a 60-step run
        {"source": "test: the lecture's loss log", "val_loss": 2.1027},
    ]
    config["variants"]["exploding"] = {
        "description": "A learning rate of 10,000: the loss is NaN/inf after one step.",
        "init": {"C": 1, "W1": 1, "b1": 1, "W2": 1, "b2": 1},
        "lr_schedule": [{"from_step": 0, "lr": 1.0e4}],
        "references": [{"source": "test: chaotic", "step_losses": {"0": 27.8817, "1": 27.0}, "chaotic_after_step": 0}],
    }
    # The loss stays finite at lr 10,000; it counts as diverged once it stays above 10 x 3.2958 for 5 steps.
    config["divergence"] = {"window": 5}
    # Named comparisons (issue 17): one family with a variant that never finishes, one that the test can decide.
    config["comparisons"] = {"families": {"steps": {"consecutive": ["fix_tanh", "exploding"]},
                                          "models": {"pairs": [["fix_tanh", "deep_bn"]]}}}
    return config


def build_study(workdir: Path, names: Path) -> dict:
    """Run the real workflow once (cached for the session) and return where everything is."""
    if "workdir" in _STUDY:
        return _STUDY
    config = study_config(names)
    configfile = write_config(workdir, config)
    proc = run_snakemake(workdir, configfile=configfile)
    html_path = workdir / "report" / "report.html"
    n_figures = sum(1 for _ in (workdir / "results" / "figures").rglob("*.png"))
    _STUDY.update(workdir=workdir, config=config, configfile=configfile, proc=proc, report=html_path,
                  html=html_path.read_text(), n_figures=n_figures, title=config["title"])
    return _STUDY


@pytest.fixture(scope="module")
def study(tmp_path_factory, names_path):
    return build_study(tmp_path_factory.mktemp("report-study"), names_path)


# -- the real run's report ----------------------------------------------------------------------------------
def test_every_figure_is_written_as_a_png(study):
    figures = study["workdir"] / "results" / "figures"
    expected = [figures / f"{name}.png" for name in ("loss_curves", "final_losses", "deep_layers", "sensitivity",
                                                     "lyapunov")]
    expected += [figures / v / f"{name}.png" for v in study["config"]["variants"]
                 for name in ("init", "activations", "activation_grads", "weight_grads", "updates", "heatmap")]
    for path in expected:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, path
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 150, (path, width, height)
    assert study["n_figures"] == len(expected)
    assert list(figures.rglob(".*.part")) == [], "a temporary file was left behind"


def test_report_is_self_contained(study):
    html = study["html"]
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "an external reference"
    assert 'src="http' not in html and "<link" not in html and "@import" not in html and "url(" not in html
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(re.findall(r"<img\b", html)) == study["n_figures"]
    for b64 in images:
        assert base64.b64decode(b64)[:8] == PNG_MAGIC


def test_report_holds_every_variant_and_section(study):
    html = study["html"]
    for variant in study["config"]["variants"]:
        assert f'id="v-{variant}"' in html, variant
        assert f'href="#v-{variant}"' in html
    for anchor in ("comparison", "significance", "curves", "references", "deep", "sensitivity", "chaos", "variants",
                   "reproducibility"):
        assert f'id="{anchor}"' in html, anchor
    assert study["title"] in html
    assert "3.2958" in html  # the expected initial loss
    assert "Welch" in html  # the test is named
    assert "W1 x 0.2, b1 x 0.01: tanh not saturated." in html  # the variant's description


def test_every_figure_has_a_caption(study):
    figures = re.findall(r"<figure id=\"([^\"]+)\">.*?<figcaption><b>[^<]+</b>([^<]*)</figcaption>", study["html"],
                         re.S)
    assert len(figures) == study["n_figures"]
    for fig_id, caption in figures:
        assert len(caption.strip()) > 40, f"{fig_id} has no real caption"


def test_reference_headline_counts_compared_rows_that_are_not_chaotic(study):
    check = pd.read_csv(study["workdir"] / "results" / "reference_check.csv")
    counted = check[check.compared & ~check.chaotic]
    n, m = int(counted.match.sum()), len(counted)
    assert m >= 3 and 1 <= n < m, "the study's references should include matches and misses"
    assert f"{n} of {m} printed numbers reproduced exactly" in study["html"]
    table = study["html"].split('id="reference-table"')[1].split("</table>")[0]
    rows = re.findall(r'<tr class="(\w*)">(.*?)</tr>', table, re.S)
    assert len(rows) == len(check)
    classes = [cls for cls, _ in rows]
    assert classes.count("chaotic") == int((check.compared & check.chaotic).sum()) >= 1
    assert classes.count("muted") == int((~check.compared).sum()) >= 1
    assert all("not reached" in body for cls, body in rows if cls == "muted")
    assert classes.count("match") == n and classes.count("miss") == m - n
    assert "float rounding alone" in study["html"]  # why chaotic rows are not failures


def test_diverged_variant_is_shown_not_crashed(study):
    html = study["html"]
    summary = pd.read_csv(study["workdir"] / "results" / "summary.csv")
    exploding = summary[summary.variant == "exploding"]
    assert (exploding.status == "diverged").all()
    step = int(exploding[exploding.seed == LECTURE_SEED].diverged_at.iloc[0])
    assert f"diverged at step {step}" in html
    row = html.split('id="comparison-table"')[1].split("</table>")[0].split('href="#v-exploding"')[1].split("</tr>")[0]
    assert "diverged at step" in row and "nan" not in row.lower()
    assert ">nan<" not in html.lower() and "None</td>" not in html
    assert "no samples (the run diverged)" in html
    # the headline says what diverged means: the study's rule (window 5 here), not only NaN
    assert "runs\n      diverged (loss NaN or infinite, or above 32.96 for 5 steps)" in html


def test_significance_section_shows_each_pair(study):
    from actgrad.results.significance import NOT_DETECTED, SIGNIFICANCE_COLUMNS, TOO_FEW_SEEDS

    sig = pd.read_csv(study["workdir"] / "results" / "significance.csv")
    assert list(sig.columns) == SIGNIFICANCE_COLUMNS
    assert [(r.family, r.before, r.after) for r in sig.itertuples()] == [("steps", "fix_tanh", "exploding"),
                                                                         ("models", "fix_tanh", "deep_bn")]
    table = study["html"].split('id="significance-table"')[1].split("</table>")[0]
    for r in sig.itertuples():
        assert f"<td class=\"l\">{r.before}</td><td class=\"l\">{r.after}</td>" in table
        assert f"family {r.family}: Holm over {r.m_family} tested comparison" in table
        assert f">{r.verdict}<" in table
    never, tested = sig.iloc[0], sig.iloc[1]
    assert never.verdict == TOO_FEW_SEEDS and never.n_after == 0 and never.diverged_after == 2
    assert tested.n_before == tested.n_after == 2 and np.isfinite([tested.ci_low, tested.ci_high, tested.hedges_g,
                                                                    tested.p_holm]).all()
    assert f"[{tested.ci_low:+.4f}, {tested.ci_high:+.4f}]" in table and f"{tested.hedges_g:+.2f}" in table
    if tested.verdict == NOT_DETECTED:
        assert f"{int(tested.seeds_needed):,}</td>" in table or "&gt; 100,000</td>" in table
    method = study["html"].split('id="significance-method">')[1].split("</p>")[0]
    assert "Welch 1947" in method and "Holm 1979" in method and "Hedges 1981" in method
    assert "within the seed noise" not in study["html"]


def test_chaos_section_measures_each_twin_variant(study):
    """The twins' parameter distance, recorded by each run, becomes lambda in chaos.csv and on the page."""
    results = study["workdir"] / "results"
    chaos = pd.read_csv(results / "chaos.csv").set_index("variant")
    assert sorted(chaos.index) == sorted(study["config"]["variants"])  # every variant has twins here
    stats = pd.read_parquet(results / "stats.parquet")
    trace = stats[(stats.kind == "twin") & (stats.variant == "fix_tanh") & (stats.seed == LECTURE_SEED)]
    trace = trace.sort_values("step")
    assert trace.step.iloc[0] == 0 and len(trace) >= 3, "the runs record the twins' distance"
    d = trace.value.to_numpy(float)
    t = trace.step.to_numpy(float)
    expected = math.log(d[-1] / d[0]) / t[-1]
    assert chaos.loc["fix_tanh", "lyapunov_last_lecture_seed"] == pytest.approx(expected, rel=1e-6)
    assert chaos.loc["fix_tanh", "seeds"] == 2 and np.isfinite(chaos.loc["fix_tanh", "decorrelation"])
    assert chaos.loc["exploding", "seeds"] == 0  # every run diverged: no rate to give, and it says why
    assert chaos.loc["exploding", "basis"] == "no finished run with a twin trace"
    assert np.isnan(chaos.loc["exploding", "chaotic"]) and chaos.loc["exploding", "config_chaotic"]
    table = study["html"].split('id="chaos-table"')[1].split("</table>")[0]
    assert f"{chaos.loc['fix_tanh', 'lyapunov_last_mean']:+.2e}" in table
    assert table.count('<tr class="') == len(chaos)
    assert 'id="fig-lyapunov"' in study["html"]


def test_reference_check_says_where_the_lecture_sits_in_our_spread(study):
    check = pd.read_csv(study["workdir"] / "results" / "reference_check.csv")
    final = check[check.compared & check.quantity.str.endswith("loss") & (check.quantity != "minibatch loss")
                  & (check.quantity != "init loss")]
    assert len(final) == 2  # fix_tanh's train and val loss after the config's 60 steps
    summary = pd.read_csv(study["workdir"] / "results" / "summary.csv")
    for r in final.itertuples():
        column = r.quantity.replace(" ", "_")
        ours = summary[(summary.variant == r.variant) & (summary.status == "ok")][column].to_numpy(float)
        assert r.spread_n == len(ours) == 2
        assert r.spread_z == pytest.approx((r.reference - ours.mean()) / ours.std(ddof=1))
        assert r.spread_sentence.replace("'", "&#39;") in study["html"]
    assert check[~check.compared].spread_sentence.isna().all()  # not reached: nothing to place


def test_reproducibility_footer(study):
    html = study["html"]
    footer = html.split('id="reproducibility"')[1]
    assert "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d" in footer
    assert re.search(r"<code>([0-9a-f]{40}|unknown)", footer)
    for pkg in ("python", "torch", "pandas", "seaborn", "matplotlib", "actgrad"):
        assert f'<span class="pkg">{pkg} <b>' in footer, pkg
    assert "engine reference on cpu" in footer
    assert "names_url:" in footer  # the config, as YAML


def test_report_is_rewritten_when_the_summary_changes(study):
    import os

    workdir, configfile = study["workdir"], study["configfile"]
    summary = workdir / "results" / "summary.csv"
    before, content = summary.stat(), summary.read_bytes()
    try:  # a new summary (Snakemake compares small files' checksums, so touching is not enough)
        summary.write_bytes(content + b"\n")
        proc = run_snakemake(workdir, "--dry-run", configfile=configfile)
    finally:
        summary.write_bytes(content)
        os.utime(summary, ns=(before.st_atime_ns, before.st_mtime_ns))
    out = proc.stdout + proc.stderr
    assert re.search(r"\breport\b", out) and re.search(r"^rule figures:", out, flags=re.MULTILINE)
    assert "train_fix_tanh" not in out


def test_snakemake_report_collects_the_figures(study):
    workdir = study["workdir"]
    proc = run_snakemake(workdir, "--report", "report/snakemake-report.html", configfile=study["configfile"],
                         check=False)
    out = workdir / "report" / "snakemake-report.html"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 100_000


# -- unit tests on synthetic data -----------------------------------------------------------------------
def test_windowed_log10_matches_the_lecture_and_handles_divergence():
    from actgrad.report.figures import windowed_log10
    from actgrad.results.vocabulary import averaging_window as window_for

    assert window_for(200_000) == 1000 and window_for(300) == 15 and window_for(10) == 1
    loss = np.full(3000, 10.0)
    loss[1000:2000] = 100.0
    centres, means = windowed_log10(loss, 1000)
    assert np.allclose(means, [1, 2, 1]) and np.allclose(centres, [499.5, 1499.5, 2499.5])
    # a diverged run: the partial last window keeps its finite values, an all-NaN window is NaN
    centres, means = windowed_log10(np.array([10.0, 10.0, 1000.0, np.inf, np.nan]), 2)
    assert np.allclose(means[:2], [1.0, 3.0]) and math.isnan(means[2])


def test_pick_snapshot_prefers_the_lecture_step():
    from actgrad.rundir import pick_snapshot

    assert pick_snapshot([0, 1000, 199999], last_step=199999) == 1000
    assert pick_snapshot([0, 100, 299], last_step=299) == 100
    assert pick_snapshot([0, 299], last_step=299) == 299
    assert pick_snapshot([0]) is None


def synthetic_stats(layers=("tanh1", "tanh2"), steps=(0, 100, 199), nan_from=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows, hists = [], []
    weights = ["layers.embedding.weight", "layers.linear1.weight", "layers.linear2.weight"]
    for step in steps:
        bad = nan_from is not None and step >= nan_from
        for layer in layers:
            for stat, value in (("mean", 0.01), ("std", 0.6), ("saturated_pct", 3.0), ("saturated99_pct", 1.0),
                                ("dead_units", 0)):
                rows.append((step, layer, "activation", stat, np.nan if bad else value))
            rows += [(step, layer, "activation_grad", "std", 1e-3), (step, layer, "preactivation", "std", 1.0)]
            for kind, lo, hi in (("activation", -1, 1), ("preactivation", -3, 3), ("activation_grad", -0.01, 0.01)):
                frac = rng.random(20)
                frac /= frac.sum()
                edges = np.linspace(lo, hi, 21)
                hists.append(pd.DataFrame({"step": step, "layer": layer, "kind": kind, "bin_left": edges[:-1],
                                           "bin_right": edges[1:], "fraction": np.nan if bad else frac}))
        for w in weights:
            rows += [(step, w, "weight_grad", "std", 1e-2), (step, w, "weight_grad", "grad_data_ratio", 1e-2),
                     (step, w, "update", "log10_update_data", -np.inf if bad else -3.1)]
            edges = np.linspace(-0.1, 0.1, 21)
            hists.append(pd.DataFrame({"step": step, "layer": w, "kind": "weight_grad", "bin_left": edges[:-1],
                                       "bin_right": edges[1:], "fraction": 1 / 20}))
    stats = pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"])
    return stats, pd.concat(hists, ignore_index=True)


@pytest.mark.parametrize("nan_from", [None, 100])
def test_variant_figures_draw_from_synthetic_runs(tmp_path, nan_from):
    import json

    from actgrad.report import figures

    stats, hists = synthetic_stats(nan_from=nan_from)
    run = tmp_path / "runs" / "v" / f"seed{LECTURE_SEED}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"variant": "v", "seed": LECTURE_SEED, "steps": 200,
                                                  "steps_done": 200 if nan_from is None else 101,
                                                  "diverged_at": nan_from, "model": "deep"}))
    stats.to_parquet(run / "stats.parquet")
    hists.to_parquet(run / "histograms.parquet")
    np.savez(run / "saturation.npz", tanh1=np.zeros((32, 50), bool), tanh2=np.ones((32, 50), bool))
    outputs = {name: tmp_path / "fig" / f"{name}.png" for name in figures.VARIANT_FIGURES}
    messages = []
    figures.variant_figures([run / "metrics.json"], outputs, log=messages.append)
    for path in outputs.values():
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(messages) == len(outputs)
    with pytest.raises(ValueError, match="unknown per-variant figure"):
        figures.variant_figures([run / "metrics.json"], {"nope": tmp_path / "x.png"})


def test_loss_curves_with_a_diverged_variant_and_an_empty_panel():
    from actgrad.report.canvas import png_bytes
    from actgrad.report.figures import loss_curves_figure

    fig = loss_curves_figure({"ok": [np.linspace(3, 2, 100), np.linspace(3.1, 2.1, 100)],
                              "boom": [np.array([20.0, np.inf])], "none": []},
                             {"ok": "mlp", "boom": "mlp", "none": "deep"}, {"boom": [1]}, {"ok": 100, "boom": 100})
    axes = fig.axes
    assert len(axes) == 2
    top = axes[0].get_ylim()[1]
    assert top < math.log10(20), "a diverged curve must not set the scale"
    assert png_bytes(fig)[:8] == PNG_MAGIC


def test_a_png_is_drawn_at_the_figure_size_unless_something_runs_off_it():
    import matplotlib.pyplot as plt
    from PIL import Image

    from actgrad.report.canvas import png_bytes

    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.plot([0, 1], [0, 1], label="a line")
    ax.set(title="title", xlabel="x", ylabel="y")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside the axes: constrained layout makes room
    assert Image.open(io.BytesIO(png_bytes(fig))).size == (400, 300)
    # Constrained layout does not place a figure's own text: this one would be cut off at the right edge.
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.plot([0, 1], [0, 1])
    fig.text(0.9, 0.5, "runs past the right edge")
    width, height = Image.open(io.BytesIO(png_bytes(fig))).size
    assert width > 450, "the figure was not widened to what it holds"


def test_a_deep_nets_activation_legends_fit_side_by_side():
    """Five layers' labels (mean, std, saturation) in two columns were wider than half the figure:
    the two panels' legends ran into each other and past the figure's edges."""
    from actgrad.report.figures import distribution_figure, style

    style()  # the workflow's fonts
    stats, hists = synthetic_stats(layers=tuple(f"tanh{i}" for i in range(1, 6)))
    fig = distribution_figure(hists, stats, "activation", [0, 100])
    fig.canvas.draw()
    left, right = (ax.get_legend().get_window_extent() for ax in fig.axes)
    assert 0 <= left.x0 and left.x1 < right.x0 and right.x1 <= fig.bbox.width, (left, right)


@pytest.mark.parametrize(("module", "unwanted"), [
    ("actgrad.report.figures", ["torch"]),
    ("actgrad.results.summary", ["torch", "matplotlib", "scipy.stats"]),
    ("actgrad.report.html", ["torch", "matplotlib", "scipy.stats"]),
    ("actgrad.workflow_step", ["torch"]),
])
def test_the_light_steps_import_nothing_they_do_not_use(module, unwanted):
    """Every figure, summary and report job is a fresh Python: torch would cost each 1.4 s of CPU to
    import, and matplotlib with seaborn and scipy.stats another second to the report, which draws nothing."""
    code = f"import sys, {module}; print(*[m for m in {unwanted!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], f"importing {module} imports {proc.stdout.strip()}"


def test_formatting_never_shows_nan():
    from actgrad.report.html import diverged_text, mean_std, num, p_value, pct

    for bad in (None, float("nan"), float("inf"), "x"):
        assert num(bad) == "—" and mean_std(bad, 0.1) == "—" and pct(bad) == "—" and p_value(bad) == "—"
    assert mean_std(2.0, float("nan")) == "2.0000"
    assert mean_std(2.0, 0.01, 3) == "2.000 ± 0.010"
    assert num(0.5, 2, signed=True) == "+0.50"
    assert p_value(3e-7) == "< 0.0001" and p_value(0.0123) == "0.012"
    assert diverged_text([(1, 7), (LECTURE_SEED, 3)], LECTURE_SEED) == "diverged at step 3"
    assert diverged_text([]) == ""


def test_reference_rows_classify_and_count():
    from actgrad.report.html import reference_rows

    refs = pd.DataFrame([
        dict(variant="a", quantity="minibatch loss", step=0, ours=3.32391, reference=3.3239, difference=1e-5,
             precision=4, match=True, chaotic=False, source="s", compared=True),
        dict(variant="a", quantity="val loss", step=199999, ours=2.2, reference=2.1, difference=0.1, precision=4,
             match=False, chaotic=False, source="s", compared=True),
        dict(variant="b", quantity="minibatch loss", step=10, ours=5.0, reference=4.0, difference=1.0, precision=4,
             match=False, chaotic=True, source="s", compared=True),
        dict(variant="b", quantity="minibatch loss", step=20000, ours=np.nan, reference=4.0, difference=np.nan,
             precision=4, match=False, chaotic=True, source="s", compared=False),
    ])
    rows, headline = reference_rows(refs)
    assert headline == {"matched": 1, "counted": 2, "chaotic": 1, "not_reached": 1}
    assert [r["cls"] for r in rows] == ["match", "miss", "chaotic", "muted"]
    assert rows[3]["state"] == "not reached" and rows[3]["ours"] == "—"
    assert reference_rows(pd.DataFrame())[1]["counted"] == 0


def test_the_comparison_tables_marks_say_each_one_thing_and_the_footnote_only_what_is_shown():
    from actgrad.report.html import comparison_rows, reference_footnotes
    from actgrad.study.settings import apply_defaults

    config = apply_defaults({"seeds": [LECTURE_SEED], "variants": {"a": {}, "b": {}}})
    summary = pd.DataFrame([dict(variant=v, seed=LECTURE_SEED, model="mlp", steps=10, status="ok", init_loss=3.3,
                                 step0_loss=3.3, val_loss=2.1, train_loss=2.0) for v in "ab"])
    variants = pd.DataFrame([dict(variant=v, model="mlp", seeds=1, diverged=0, val_loss_mean=2.1) for v in "ab"])

    def ref(variant, quantity, compared):
        return dict(variant=variant, quantity=quantity, step=9, ours=2.1, reference=2.1, difference=0.0,
                    precision=4, match=True, chaotic=False, source="s", compared=compared)

    calibrated_only = pd.DataFrame([ref("a", "val loss (calibrated BN)", True), ref("b", "val loss", True)])
    rows = comparison_rows(config, variants, summary, calibrated_only)
    assert [r["val_ref"]["mark"] for r in rows] == ["†", ""]
    assert rows[0]["val_ref"]["note"] == "compared with calibrated BatchNorm statistics"
    [footnote] = reference_footnotes(rows)
    assert footnote.startswith("marked †") and "shorter" not in footnote

    both = pd.DataFrame([ref("a", "val loss (calibrated BN)", False), ref("b", "train loss", False)])
    rows = comparison_rows(config, variants, summary, both)
    assert rows[0]["val_ref"]["mark"] == "*†" and rows[1]["train_ref"]["mark"] == "*"
    assert rows[1]["train_ref"]["cls"] == "muted"
    assert [f.split(":")[0] for f in reference_footnotes(rows)] == ["greyed and marked *", "marked †"]
    assert reference_footnotes(comparison_rows(config, variants, summary, pd.DataFrame())) == []


def test_report_renders_from_tables_without_figures_or_runs(tmp_path):
    """Missing figures, no runs on disk, NaN everywhere: the page still renders, nothing says nan."""
    from actgrad.report.html import write_report
    from actgrad.study.settings import apply_defaults

    # the report is handed a completed config, as the workflow completes it
    config = apply_defaults({"title": "empty <study>", "seeds": [LECTURE_SEED],
                             "variants": {"a": {"description": "d"}, "b": {}}})
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame([
        dict(variant="a", seed=LECTURE_SEED, model="mlp", steps=10, status="ok", diverged_at=np.nan,
             init_loss=3.3, step0_loss=3.31, sat97_init=5.0, val_loss=2.5, train_loss=2.4),
        dict(variant="b", seed=LECTURE_SEED, model="mlp", steps=10, status="diverged", diverged_at=4,
             init_loss=np.nan, step0_loss=np.nan, sat97_init=np.nan, val_loss=np.nan, train_loss=np.nan),
    ]).to_csv(results / "summary.csv", index=False)
    pd.DataFrame([dict(variant="a", model="mlp", seeds=1, diverged=0, val_loss_mean=2.5, val_loss_std=np.nan),
                  dict(variant="b", model="mlp", seeds=1, diverged=1, val_loss_mean=np.nan)]).to_csv(
        results / "variants.csv", index=False)
    from actgrad.results.vocabulary import TABLES

    for table in TABLES.values():
        if table.endswith(".csv") and table not in ("summary.csv", "variants.csv"):
            (results / table).write_text("")  # a table with no rows and no columns
    out = tmp_path / "report" / "report.html"
    template = Path(__file__).resolve().parents[1] / "report" / "report.html.j2"
    write_report(config, results, tmp_path / "figures", template, out, log=lambda m: None)
    html = out.read_text()
    assert "empty &lt;study&gt;" in html  # escaped
    assert "diverged at step 4" in html and "No reference values" in html
    text = re.sub(r"<[^>]+>", " ", html).replace("NaN or inf", "")
    assert not re.search(r"\bnan\b", text, re.I) and not re.search(r"\bNone\b", text), "a NaN or None on the page"
    assert "<img" not in html
    assert list(out.parent.glob(".*.part")) == []


def test_the_report_names_a_missing_summary_table(tmp_path):
    from actgrad.data import DataError
    from actgrad.report.html import write_report

    results = tmp_path / "results"
    results.mkdir()
    for table in ("summary.csv", "variants.csv", "significance.csv", "reference_check.csv", "deep_layers.csv",
                  "samples.csv"):
        (results / table).write_text("")
    out = tmp_path / "report.html"
    template = Path(__file__).resolve().parents[1] / "report" / "report.html.j2"
    with pytest.raises(DataError, match=r"deep_variants\.csv: missing; the summary step writes it"):
        write_report({"variants": {"a": {}}}, results, tmp_path, template, out, log=lambda m: None)
    assert not out.exists()


def test_the_figures_show_the_snapshot_step_the_run_recorded(tmp_path, monkeypatch):
    """The report's deep table and the figures read the same recorded step; the figures pick none of their own."""
    import json

    from actgrad.report import figures

    stats, hists = synthetic_stats()
    run = tmp_path / "runs" / "v" / f"seed{LECTURE_SEED}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"variant": "v", "seed": LECTURE_SEED, "steps": 200,
                                                  "steps_done": 200, "diverged_at": None, "snapshot_step": 199}))
    stats.to_parquet(run / "stats.parquet")
    hists.to_parquet(run / "histograms.parquet")
    shown = []
    monkeypatch.setattr(figures, "save", lambda fig, path: None)
    monkeypatch.setattr(figures, "distribution_figure", lambda hists, stats, kind, steps, title="": shown.append(steps))
    figures.variant_figures([run / "metrics.json"], {"activations": tmp_path / "a.png"}, log=lambda m: None)
    assert shown == [[0, 199]]  # 100 would be nearer the lecture's 1,000, but the run recorded 199


def _task(i):
    import os

    def draw(log):
        log(f"task {i} in {os.getpid()}")
    return draw


def test_the_figure_step_shares_its_tasks_among_forked_workers_and_keeps_their_order():
    from actgrad.report import figures

    lines = list(figures.draw_in_processes([_task(i) for i in range(6)], workers=2))
    assert [line.split(" in ")[0] for line in lines] == [f"task {i}" for i in range(6)]
    assert len({line.split(" in ")[1] for line in lines}) >= 2  # the first here, the others in the workers
    serial = list(figures.draw_in_processes([_task(i) for i in range(3)], workers=1))
    assert len({line.split(" in ")[1] for line in serial}) == 1


def test_a_figure_that_fails_in_a_worker_fails_the_step_with_its_own_error():
    from actgrad.report import figures
    from actgrad.rundir import RunFileError

    def corrupt(log):
        raise RunFileError("results/runs/v/seed1/stats.parquet: not a readable parquet file")

    with pytest.raises(RunFileError, match="seed1/stats.parquet: not a readable"):
        list(figures.draw_in_processes([_task(0), _task(1), corrupt, _task(3)], workers=2))
    # ... and the step can draw again afterwards (no worker or task left behind)
    assert len(list(figures.draw_in_processes([_task(i) for i in range(3)], workers=2))) == 3
