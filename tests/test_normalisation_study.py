"""The real workflow on a tiny normalisation study (BatchNorm, LayerNorm and none at batch sizes 4 and 32,
the same number of examples seen, 2 seeds) and a ReLU net beside it: the run metrics follow the activation and
carry the Jacobian at init and BatchNorm's batch-statistics loss; normalisation.csv and jacobian.csv hold what the
run files say; the report answers its three questions and loads in a real browser with every image decoded."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LECTURE_SEED, run_snakemake, tiny_config, write_config

SEEDS = (LECTURE_SEED, 1)
EXAMPLES = 1600  # per run: 400 steps of 4, 50 of 32
NORMS = ("batchnorm", "layernorm", "none")
POINTS = [f"coupling__{norm}__{batch}" for norm in NORMS for batch in ("batch4", "batch32")]
NET = {"model": "deep", "n_layers": 2, "n_hidden": 32}


@pytest.fixture(scope="module")
def study(tmp_path_factory, names_path):
    workdir = tmp_path_factory.mktemp("normalisation")
    config = tiny_config(names_path, engine="batched", samples=2,
                         stats={"every": 50, "update_every": 10, "histogram_every": 100, "snapshot_steps": [0, 50],
                                "bins": 20})
    config["variants"] = {"deep_relu": {**NET, "activation": "relu", "norm": "none", "gain": 1.4142135623730951,
                                        "max_steps": 100}}
    config["sweeps"] = {"coupling": {
        "description": "The small deep net at a fixed number of examples seen",
        "base": {**NET, "gain": 1.6666666666666667, "lr_schedule": [{"from_step": 0, "lr": 0.1}]},
        "grid": {"norm": list(NORMS), "batch": {"batch4": {"batch_size": 4, "max_steps": EXAMPLES // 4},
                                                "batch32": {"batch_size": 32, "max_steps": EXAMPLES // 32}}}}}
    run_snakemake(workdir, configfile=write_config(workdir, config))
    return workdir, config


def metrics(workdir, variant, seed) -> dict:
    return json.loads((workdir / "results" / "runs" / variant / f"seed{seed}" / "metrics.json").read_text())


def nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def test_the_metrics_follow_the_activation_and_say_what_the_run_was(study):
    workdir, _ = study
    relu = metrics(workdir, "deep_relu", LECTURE_SEED)
    assert (relu["norm"], relu["activation"], relu["weight_init"]) == ("none", "relu", "gaussian")
    assert "sat97_init" not in relu and "sat99_final" not in relu
    # about half of a ReLU net's outputs at init are at or below zero
    assert 30 < relu["nonpositive_init"] < 70 and 0 <= relu["nonpositive_final"] <= 100
    tanh = metrics(workdir, "coupling__none__batch4", 1)
    assert "nonpositive_init" not in tanh and 0 <= tanh["sat97_init"] <= 100 and "sat99_final" in tanh
    assert (tanh["batch_size"], tanh["steps"]) == (4, EXAMPLES // 4)
    assert metrics(workdir, "coupling__none__batch32", 1)["steps"] * 32 == EXAMPLES


def test_the_jacobian_at_init_is_that_of_the_first_training_batch(study):
    from actgrad import data
    from actgrad.study.settings import apply_defaults, variant_spec
    from actgrad.study.sweeps import expand_sweeps
    from actgrad.training.loop import init_network
    from actgrad.training.model import jacobian_spectrum

    workdir, config = study
    completed = apply_defaults(expand_sweeps(config))
    splits = data.load_splits(workdir / "data" / "splits.pt")
    for variant in ("coupling__batchnorm__batch4", "deep_relu"):
        net, _ = init_network(variant_spec(completed, variant), 1, int(splits["block_size"]))
        expected = jacobian_spectrum(net, splits["Xtrain"][:32])
        m = metrics(workdir, variant, 1)
        for stat in ("mean", "std", "min", "max", "mean_sq", "std_sq"):
            assert m[f"jacobian_sv_{stat}"] == pytest.approx(expected[stat], rel=1e-6), (variant, stat)


def test_batchnorm_runs_record_the_loss_with_each_minibatchs_statistics(study):
    from actgrad import data
    from actgrad.study.settings import apply_defaults, variant_spec
    from actgrad.study.sweeps import expand_sweeps
    from actgrad.training.evaluation import batch_statistics_loss, evaluate
    from actgrad.training.loop import init_network

    workdir, config = study
    completed = apply_defaults(expand_sweeps(config))
    splits = data.load_splits(workdir / "data" / "splits.pt")
    variant = "coupling__batchnorm__batch4"
    net, _ = init_network(variant_spec(completed, variant), LECTURE_SEED, int(splits["block_size"]))
    run = workdir / "results" / "runs" / variant / f"seed{LECTURE_SEED}"
    net.load_state_dict(torch.load(run / "params.pt"))
    m = metrics(workdir, variant, LECTURE_SEED)
    running, _ = evaluate(net, splits["Xdev"], splits["Ydev"])
    assert m["val_loss"] == pytest.approx(running, rel=1e-5)
    assert m["val_loss_batch_stats"] == pytest.approx(batch_statistics_loss(net, splits["Xdev"], splits["Ydev"], 4),
                                                      rel=1e-5)
    assert m["val_loss_batch_stats"] != pytest.approx(m["val_loss"], abs=1e-4)  # a batch of 4 is not the split
    # ... and leaves the running statistics as they were
    assert evaluate(net, splits["Xdev"], splits["Ydev"])[0] == running
    for plain in ("coupling__layernorm__batch4", "coupling__none__batch32"):
        assert "val_loss_batch_stats" not in metrics(workdir, plain, 1)


def test_the_normalisation_table_holds_what_the_runs_say(study):
    workdir, _ = study
    table = pd.read_csv(workdir / "results" / "normalisation.csv")
    # the sweep's points only: the listed ReLU net is no cell of it
    assert list(zip(table.norm, table.batch_size)) == [(n, b) for n in NORMS for b in (4, 32)]
    for row in table.itertuples():
        names = row.variants.split(";")
        runs = [metrics(workdir, v, s) for v in names for s in SEEDS]
        ok = [r for r in runs if r["status"] == "ok"]
        val = np.array([r["val_loss"] for r in ok])
        assert row.finished == len(ok) and row.runs == len(runs)
        assert row.val_loss_mean == pytest.approx(val.mean()) and row.val_loss_sd == pytest.approx(val.std(ddof=1))
        assert str(row.examples) == str(EXAMPLES) and row.variants == f"coupling__{row.norm}__batch{row.batch_size}"
        if row.norm == "batchnorm":
            gaps = np.array([r["val_loss_batch_stats"] - r["val_loss"] for r in ok])
            assert row.gap_mean == pytest.approx(gaps.mean()) and row.gap_sd == pytest.approx(gaps.std(ddof=1))
        else:
            assert np.isnan(row.gap_mean) and np.isnan(row.val_loss_batch_stats_mean)


def test_the_jacobian_table_puts_the_seeds_beside_the_theory(study):
    from actgrad.results import theory

    workdir, _ = study
    jac = pd.read_csv(workdir / "results" / "jacobian.csv").set_index("variant")
    assert set(jac.index) == {"deep_relu", *POINTS}
    row = jac.loc["coupling__none__batch4"]
    means = [metrics(workdir, "coupling__none__batch4", s)["jacobian_sv_mean"] for s in SEEDS]
    rel = [metrics(workdir, "coupling__none__batch4", s)["jacobian_sv_std_sq"] /
           metrics(workdir, "coupling__none__batch4", s)["jacobian_sv_mean_sq"] for s in SEEDS]
    assert row.seeds == 2 and row.sv_mean_mean == pytest.approx(np.mean(means))
    assert row.sv_mean_sd == pytest.approx(np.std(means, ddof=1))
    assert row.rel_spread_sq_mean == pytest.approx(np.mean(rel))
    gaussian = theory.jacobian_spectrum(2, 5 / 3, "tanh", "gaussian")
    orthogonal = theory.jacobian_spectrum(2, 5 / 3, "tanh", "orthogonal")
    assert row.predicted_rel_spread_sq_gaussian == pytest.approx(gaussian["std_sq"] / gaussian["mean_sq"])
    assert row.predicted_rel_spread_sq_orthogonal == pytest.approx(orthogonal["std_sq"] / orthogonal["mean_sq"])
    assert row.predicted_rel_spread_sq_orthogonal < row.predicted_rel_spread_sq_gaussian
    assert row.predicted_mean_sq == pytest.approx(gaussian["mean_sq"])
    # normalised nets: no prediction, and the table says why
    bn = jac.loc["coupling__batchnorm__batch4"]
    assert np.isnan(bn.predicted_rel_spread_sq_gaussian) and "batchnorm" in bn.theory


def test_the_report_answers_the_three_questions_and_follows_the_activation(study):
    workdir, _ = study
    html = (workdir / "report" / "report.html").read_text()
    assert 'id="normalisation"' in html and 'id="normalisation-table"' in html and 'id="jacobian-table"' in html
    for question in ("Does LayerNorm match BatchNorm here?", "At which batch size does BatchNorm break down?",
                     "Is the gain irrelevant under both?"):
        assert question in html
    table = pd.read_csv(workdir / "results" / "normalisation.csv")
    bn4 = table[(table.norm == "batchnorm") & (table.batch_size == 4)].iloc[0]
    assert f"{bn4.val_loss_mean:.4f} ± {bn4.val_loss_sd:.4f}" in html
    assert f"(gap {bn4.gap_mean:+.4f})" in html
    # one gain in the sweep: the gain question is not asked of a norm
    assert "one gain only, not asked" in html
    # the ReLU net's columns say "at or below zero", not tanh's saturation
    assert "saturated<br>or ≤ 0<br>at init" in html and "relu ≤ 0" in html


def test_the_report_loads_in_chromium_with_every_image_decoded(study, tmp_path):
    from test_browser import broken_images, inspect_page, require_chromium

    binary = require_chromium()
    workdir, _ = study
    page, problems, shots = inspect_page(binary, workdir / "report" / "report.html", tmp_path)
    assert problems == [], problems
    assert len(page["images"]) >= 7 and broken_images(page) == [] and all(i["data"] for i in page["images"])
    assert page["links"] == [], page["links"]
    out = os.environ.get("ACTGRAD_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for png in shots:
            shutil.copy(png, Path(out) / f"normalisation-{png.name}")
