"""The real Snakemake workflow, end to end, on small configs."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import LECTURE_SEED, REPO, run_snakemake, tiny_config, write_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, names_path):
    workdir = tmp_path_factory.mktemp("tiny")
    config = tiny_config(names_path)
    proc = run_snakemake(workdir, configfile=write_config(workdir, config))
    return workdir, config, proc


def test_every_stage_writes_its_outputs(tiny_run):
    workdir, config, _ = tiny_run
    assert (workdir / "data" / "names.txt").read_bytes() == Path(config["names_url"]).read_bytes()
    assert json.loads((workdir / "data" / "splits.json").read_text())["examples"]["train"] == 182625
    for variant in config["variants"]:
        for seed in config["seeds"]:
            run = workdir / "results" / "runs" / variant / f"seed{seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["variant"] == variant and metrics["seed"] == seed
            assert metrics["steps_done"] == config["max_steps"] and metrics["status"] == "ok"
            assert abs(metrics["expected_init_loss"] - 3.2958) < 1e-4
            losses = pd.read_parquet(run / "losses.parquet")
            assert len(losses) == config["max_steps"] and losses.loss.notna().all()
            stats = pd.read_parquet(run / "stats.parquet")
            assert list(stats.columns) == ["step", "layer", "kind", "stat", "value"]
            assert {0, 20, config["max_steps"] - 1} <= set(stats.step)
            assert len((run / "samples.txt").read_text().split()) == config["samples"]


def test_summary_has_a_row_per_variant_and_seed(tiny_run):
    workdir, config, _ = tiny_run
    summary = pd.read_csv(workdir / "results" / "summary.csv")
    required = ["variant", "seed", "steps", "step0_loss", "init_loss", "train_loss", "val_loss", "test_loss",
                "sat97_init", "sat97_final", "sat99_init", "sat99_final", "seconds"]
    assert set(required) <= set(summary.columns)
    assert sorted(zip(summary.variant, summary.seed)) == sorted(
        (v, s) for v in config["variants"] for s in config["seeds"])
    assert summary[required[3:]].notna().all().all()
    deep = summary[summary.variant == "deep_bn"]
    assert deep.val_loss_calibrated.notna().all()  # BatchNorm nets are evaluated both ways


def test_report_names_every_variant(tiny_run):
    workdir, config, _ = tiny_run
    html = (workdir / "report" / "report.html").read_text()
    for variant in config["variants"]:
        assert variant in html


def test_nothing_to_do_after_a_complete_run(tiny_run):
    workdir, config, _ = tiny_run
    proc = run_snakemake(workdir, "-n", configfile=workdir / "config.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_lecture_notes_printed_losses_are_reproduced(tmp_path, names_path):
    """The notes' runs cut to 10,001 steps: the printed losses at steps 0 and 10,000."""
    notes = yaml.safe_load((REPO / "config" / "seed-notes.yaml").read_text())
    notes.update(names_url=str(names_path), max_steps=10001, samples=2,
                 stats={"every": 5000, "update_every": 1000, "histogram_every": 5000, "snapshot_steps": [0]})
    run_snakemake(tmp_path, configfile=write_config(tmp_path, notes))
    check = pd.read_csv(tmp_path / "results" / "reference_check.csv")
    reached = check[check.compared]
    got = {(r.variant, r.step): (round(r.ours, 4), r.match) for r in reached.itertuples()}
    assert got[("notes_fix_softmax", 0)] == (3.3277, True)
    assert got[("notes_fix_softmax", 10000)] == (2.2796, True)
    assert got[("notes_fix_tanh", 0)] == (3.3134, True)
    assert got[("notes_fix_tanh", 10000)] == (2.1660, True)
    assert got[("notes_original", 0)] == (28.4938, True)
    assert set(check[~check.compared].step) == {20000, 30000, 40000}
    # Twins ran: the chaotic original drifts further from its twin than the fixed variants.
    losses = {v: pd.read_parquet(tmp_path / "results" / "runs" / v / f"seed{LECTURE_SEED}" / "losses.parquet")
              for v in notes["variants"]}
    drift = {v: (df.loss - df.twin_loss).abs().iloc[-1000:].mean() for v, df in losses.items()}
    assert drift["notes_original"] > drift["notes_fix_tanh"]
    html = (tmp_path / "report" / "report.html").read_text()
    for variant in notes["variants"]:
        assert variant in html


@pytest.mark.slow
def test_the_notebooks_batchnorm_run_is_reproduced(tmp_path, names_path):
    """The default batchnorm variant cut to 20,001 steps: the notebook's 3.3239, 2.0322, 2.5675."""
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config = dict(default, names_url=str(names_path), max_steps=20001, seeds=[LECTURE_SEED], samples=2,
                  variants={"batchnorm": default["variants"]["batchnorm"]},
                  stats={"every": 5000, "update_every": 1000, "histogram_every": 5000, "snapshot_steps": [0]})
    run_snakemake(tmp_path, configfile=write_config(tmp_path, config))
    check = pd.read_csv(tmp_path / "results" / "reference_check.csv")
    steps = check[check.quantity == "minibatch loss"].set_index("step")
    assert steps.loc[[0, 10000, 20000], "match"].all(), steps
    assert [round(x, 4) for x in steps.loc[[0, 10000, 20000], "ours"]] == [3.3239, 2.0322, 2.5675]
