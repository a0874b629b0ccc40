"""A run whose loss blows up stops early and says so; the other runs, the summary and the report carry on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import (
    FIX_TANH,
    SUMMARY,
    output_of,
    run_targets,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad.study.settings import apply_defaults, validate

HUGE_LR = [{"from_step": 0, "lr": 1.0e6}]


DIVERGING = {
    # the lecture's tanh MLP at lr 1e6: the loss is finite but above 1e4 from step 1 on
    "huge lr": dict(FIX_TANH, lr_schedule=HUGE_LR),
    # a ReLU net at lr 1e6: the loss is huge at step 1 and NaN at step 2
    "NaN loss": {"activation": "relu", "lr_schedule": HUGE_LR},
    # a deep tanh net whose output layer is scaled by 1e38: the logits overflow at step 0
    "infinite loss": {"model": "deep", "batchnorm": False, "n_layers": 2, "n_hidden": 16,
                      "last_layer_scale": 1.0e38},
}


def _divergence_params():
    for engine in ("reference", "batched"):
        for case in DIVERGING:
            yield pytest.param(engine, case, id=f"{engine}-{case}")


@pytest.mark.parametrize(("engine", "case"), list(_divergence_params()))
def test_diverged_run_stops_early_and_says_so(engine, case, names_path, splits_file, tmp_path):
    from actgrad.training.job import train_variants

    steps = 300
    config = tiny_config(names_path, engine=engine, max_steps=steps, variants={"blowup": DIVERGING[case]},
                         divergence={"loss_multiple": 10, "window": 50})
    validate(config)
    apply_defaults(config)
    metrics = train_variants(config, ["blowup"], splits_file, tmp_path, log=lambda message: None)
    assert [m["seed"] for m in metrics] == config["seeds"]
    for m in metrics:
        assert m["status"] == "diverged" and isinstance(m["diverged_at"], int) and m["diverged_at"] < 100
        # the loss of a huge lr is finite: it stays above 10 x the uniform guess for the whole window
        assert m["diverged_rule"] == ("non-finite loss" if case != "huge lr" else
                                      "loss above 10 × the uniform guess (32.96) for 50 steps")
        assert m["steps_done"] == m["diverged_at"] + 1 < steps
        run = tmp_path / "runs" / "blowup" / f"seed{m['seed']}"
        on_disk = json.loads((run / "metrics.json").read_text())
        assert on_disk["status"] == "diverged" and on_disk["diverged_at"] == m["diverged_at"]
        assert on_disk["train_loss"] is None and on_disk["val_loss"] is None  # NaN is written as null
        assert len(pd.read_parquet(run / "losses.parquet")) == m["steps_done"]


def _divergence_config(names_path, blowup: dict) -> dict:
    # Statistics every 10-20 steps: a diverging run is recorded with NaN and inf in its tensors.
    return tiny_config(names_path, stats={"every": 20, "update_every": 10, "histogram_every": 10,
                                          "snapshot_steps": [0], "bins": 20},
                       divergence={"loss_multiple": 10, "window": 50},
                       variants={"fix_tanh": FIX_TANH, "blowup": dict(blowup, max_steps=300)})


@pytest.fixture(scope="module")
def diverged_run(names_path, tmp_path_factory):
    """Training and the summary; the report (figures and all) only when its test asks for it."""
    workdir = tmp_path_factory.mktemp("diverged")
    config = _divergence_config(names_path, DIVERGING["huge lr"])
    proc = snakemake(workdir, write_config(workdir, config), SUMMARY, check=False)
    return workdir, config, proc


@pytest.mark.slow
def test_divergence_does_not_stop_the_workflow(diverged_run):
    workdir, config, proc = diverged_run
    assert proc.returncode == 0, output_of(proc)[-5000:]
    rule = "loss above 10 × the uniform guess (32.96) for 50 steps"
    assert f"(diverged at step 50: {rule})" in (workdir / "logs" / "train" / "blowup.log").read_text()
    for seed in config["seeds"]:
        blowup = json.loads((workdir / "results" / "runs" / "blowup" / f"seed{seed}" / "metrics.json").read_text())
        assert blowup["status"] == "diverged" and blowup["diverged_at"] == 50 and blowup["steps_done"] == 51
        assert blowup["diverged_rule"] == rule
        ok = json.loads((workdir / "results" / "runs" / "fix_tanh" / f"seed{seed}" / "metrics.json").read_text())
        assert ok["status"] == "ok" and ok["diverged_at"] is None and ok["steps_done"] == config["max_steps"]


@pytest.mark.slow
def test_summary_shows_the_diverged_variant(diverged_run):
    workdir, config, proc = diverged_run
    summary = pd.read_csv(workdir / "results" / "summary.csv")
    blowup, ok = summary[summary.variant == "blowup"], summary[summary.variant == "fix_tanh"]
    assert len(blowup) == len(ok) == len(config["seeds"])
    assert (blowup.status == "diverged").all() and (blowup.diverged_at == 50).all() and blowup.val_loss.isna().all()
    assert (ok.status == "ok").all() and ok.diverged_at.isna().all() and ok.val_loss.notna().all()
    variants = pd.read_csv(workdir / "results" / "variants.csv").set_index("variant")
    assert variants.loc["blowup", "diverged"] == len(config["seeds"]) and variants.loc["fix_tanh", "diverged"] == 0
    assert np.isnan(variants.loc["blowup", "val_loss_mean"]) and not np.isnan(variants.loc["fix_tanh", "val_loss_mean"])


@pytest.mark.slow
def test_report_shows_the_diverged_variant(diverged_run):
    workdir, config, _ = diverged_run
    proc = snakemake(workdir, workdir / "config.yaml", check=False)  # figures and the report
    assert proc.returncode == 0, output_of(proc)[-5000:]
    html = (workdir / "report" / "report.html").read_text()
    assert "blowup" in html and "diverged" in html


@pytest.mark.slow
def test_nan_loss_does_not_stop_the_workflow(names_path, tmp_path):
    # The default statistics plan of the tiny config: histograms every 20 steps.
    config = tiny_config(names_path, variants={"blowup": dict(DIVERGING["NaN loss"], max_steps=300)})
    proc = snakemake(tmp_path, write_config(tmp_path, config), *run_targets(config), check=False)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    for seed in config["seeds"]:
        metrics = json.loads((tmp_path / "results" / "runs" / "blowup" / f"seed{seed}" / "metrics.json").read_text())
        # Step 1's loss is already huge (above the 1e4 limit on some seeds); by step 2 it is NaN.
        assert metrics["status"] == "diverged" and metrics["diverged_at"] in (1, 2)
        assert metrics["steps_done"] == metrics["diverged_at"] + 1 and metrics["val_loss"] is None
