"""The real workflow on a tiny sweep (2 gains x BatchNorm on/off of a small deep net, batched engine)
writes the theory and sweep tables, one phase diagram per sweep, and a report that folds the sweep's points and
loads in a real browser with every image decoded."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import LECTURE_SEED, run_snakemake, tiny_config, write_config

GAINS = [0.5, 2.0]  # 0.5 is one of the lecture's gains (shown in full), 2 is not (a row of the sweep's table)


@pytest.fixture(scope="module")
def sweep_study(tmp_path_factory, names_path):
    workdir = tmp_path_factory.mktemp("sweep")
    config = tiny_config(names_path, max_steps=200, engine="batched", sensitivity={"enabled": True},
                         stats={"every": 50, "update_every": 10, "histogram_every": 100, "snapshot_steps": [0, 100],
                                "bins": 20})
    config["variants"] = {"fix_tanh": config["variants"]["fix_tanh"]}
    config["sweeps"] = {"deep": {"description": "The deep tanh net",
                                 "base": {"model": "deep", "n_layers": 3, "n_hidden": 32},
                                 "grid": {"gain": GAINS, "batchnorm": [False, True]}}}
    run_snakemake(workdir, configfile=write_config(workdir, config))
    return workdir, config


POINTS = ["deep__gain0p5__nobn", "deep__gain0p5__bn", "deep__gain2__nobn", "deep__gain2__bn"]


def _run_stats(workdir, variant):
    return {seed: pd.read_parquet(workdir / "results" / "runs" / variant / f"seed{seed}" / "stats.parquet")
            for seed in (LECTURE_SEED, 1)}


def test_the_theory_table_puts_each_layer_beside_its_prediction(sweep_study):
    from actgrad.results.theory import propagate

    workdir, _ = sweep_study
    theory = pd.read_csv(workdir / "results" / "theory.csv")
    assert set(theory.variant) == {"fix_tanh", *POINTS}
    deep = theory[theory.variant == "deep__gain0p5__nobn"]
    assert sorted(set(deep.layer)) == ["tanh1", "tanh2", "tanh3"]
    # measured: the mean over the two seeds of what each run recorded at step 0
    runs = _run_stats(workdir, "deep__gain0p5__nobn")
    for layer in ("tanh1", "tanh3"):
        row = deep[(deep.layer == layer) & (deep.quantity == "activation_std")].iloc[0]
        own = [s[(s.step == 0) & (s.layer == layer) & (s.kind == "activation") & (s.stat == "std")].value.iloc[0]
               for s in runs.values()]
        assert row.measured_mean == pytest.approx(np.mean(own))
        assert row.measured_lecture_seed == pytest.approx(own[0])
    # predicted: the mean-field stack at gain 0.5 with unit input, and the relative difference between them
    predicted = [p.activation_std for p in propagate(3, 0.5)]
    rows = deep[deep.quantity == "activation_std"].set_index("layer")
    assert rows.predicted.tolist() == pytest.approx(predicted)
    assert rows.relative_difference.tolist() == pytest.approx(
        ((rows.measured_mean - rows.predicted) / rows.predicted).tolist())
    # the wide-layer theory holds at init for 32 units: activations within 10 % layer by layer
    assert (rows.relative_difference.abs() < 0.10).all(), rows
    # BatchNorm: q = 1 in every layer whatever the gain
    bn = theory[(theory.variant == "deep__gain2__bn") & (theory.quantity == "preactivation_std")]
    assert bn.predicted.tolist() == pytest.approx([1.0] * 3)
    # a saturation of ~1e-90 % predicted is not compared relatively
    sat = deep[(deep.quantity == "saturated_pct") & (deep.layer == "tanh3")].iloc[0]
    assert sat.predicted < 1e-6 and np.isnan(sat.relative_difference)


def test_the_sweep_table_has_every_point_and_metric(sweep_study):
    workdir, _ = sweep_study
    sweeps = pd.read_csv(workdir / "results" / "sweeps.csv")
    assert list(sweeps.columns) == ["sweep", "variant", "gain", "batchnorm", "metric", "mean", "sd", "n", "predicted"]
    assert sorted(set(sweeps.variant)) == sorted(POINTS)
    assert set(sweeps.metric) == {"last_activation_std", "last_saturated_pct", "grad_ratio_first_last", "val_loss",
                                  "twin_final_abs_delta"}
    row = sweeps[(sweeps.variant == "deep__gain2__nobn") & (sweeps.metric == "grad_ratio_first_last")].iloc[0]
    assert (row.gain, bool(row.batchnorm), row.n) == (2.0, False, 2)
    ratios = []
    for s in _run_stats(workdir, "deep__gain2__nobn").values():
        g = s[(s.step == 0) & (s.kind == "activation_grad") & (s.stat == "std")].set_index("layer").value
        ratios.append(g["tanh1"] / g["tanh3"])
    assert row["mean"] == pytest.approx(np.mean(ratios))
    assert row.sd == pytest.approx(np.std(ratios, ddof=1))
    assert np.isfinite(row.predicted)
    metrics = [json.loads((workdir / "results" / "runs" / "deep__gain0p5__bn" / f"seed{s}" / "metrics.json")
                          .read_text()) for s in (LECTURE_SEED, 1)]
    loss = sweeps[(sweeps.variant == "deep__gain0p5__bn") & (sweeps.metric == "val_loss")].iloc[0]
    assert loss["mean"] == pytest.approx(np.mean([m["val_loss"] for m in metrics])) and np.isnan(loss.predicted)
    twin = sweeps[(sweeps.variant == "deep__gain0p5__bn") & (sweeps.metric == "twin_final_abs_delta")].iloc[0]
    assert twin["mean"] == pytest.approx(np.mean([m["twin_final_abs_delta"] for m in metrics]))


def test_figures_only_for_the_points_shown_in_full(sweep_study):
    workdir, _ = sweep_study
    figures = workdir / "results" / "figures"
    assert (figures / "sweep_deep.png").stat().st_size > 10_000
    assert (figures / "deep_layers.png").exists()
    for name in ("fix_tanh", "deep__gain0p5__nobn", "deep__gain0p5__bn"):
        assert (figures / name / "init.png").exists(), name
    for name in ("deep__gain2__nobn", "deep__gain2__bn"):
        assert not (figures / name).exists(), name


def test_the_report_has_the_sweep_section_and_the_theory_table(sweep_study):
    workdir, _ = sweep_study
    html = (workdir / "report" / "report.html").read_text()
    assert 'id="theory"' in html and 'id="sweep-deep"' in html and 'id="fig-sweep_deep"' in html
    sections = re.findall(r'<section class="variant" id="v-([^"]+)"', html)
    assert sections == ["fix_tanh", "deep__gain0p5__nobn", "deep__gain0p5__bn"]
    table = html.split('id="table-sweep-deep"')[1].split("</table>")[0]
    assert table.count("<tr") == 1 + len(POINTS)
    assert 'id="v-deep__gain2__nobn"' in table and 'id="v-deep__gain2__bn"' in table
    # every in-page link lands: the points without a section on their table row
    ids = set(re.findall(r'id="([^"]+)"', html))
    assert {h for h in re.findall(r'href="#([^"]+)"', html)} <= ids
    nav = html.split('<nav class="toc">')[1].split("</nav>")[0]
    assert "Sweep deep" in nav and 'href="#sweep-deep"' in nav and 'href="#v-deep__gain2__bn"' not in nav
    theory = html.split('id="theory"')[1].split("</details>\n<details")[0]
    assert "fix_tanh" in theory and "theory " in theory
    assert "<details class=\"theory\">" in html  # the sweep's rows folded; the listed variants' open


def test_the_sweep_report_loads_in_chromium_with_every_image_decoded(sweep_study, tmp_path):
    from test_browser import broken_images, inspect_page, require_chromium

    binary = require_chromium()
    workdir, config = sweep_study
    page, problems, _ = inspect_page(binary, workdir / "report" / "report.html", tmp_path)
    assert problems == [], problems
    ids = [i["id"] for i in page["images"]]
    assert "fig-sweep_deep" in ids and "fig-deep_layers" in ids
    assert broken_images(page) == [] and all(i["data"] for i in page["images"])
    assert page["links"] == [] and page["external"] == []
    assert page["h1"].strip() == config["title"]
