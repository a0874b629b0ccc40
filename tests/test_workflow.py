"""The real Snakemake workflow, end to end, on small configs."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import LECTURE_SEED, REPO, run_snakemake, tiny_config, training_jobs_in, write_config


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


def test_the_study_tables_hold_every_runs_rows_with_its_variant_and_settings(tiny_run):
    """Issue 15 item 6: one pd.read_parquet answers a question across the study."""
    workdir, config, _ = tiny_run
    results = workdir / "results"
    for table, run_file in (("stats.parquet", "stats.parquet"), ("histograms.parquet", "histograms.parquet")):
        study = pd.read_parquet(results / table)
        assert list(study.columns[:6]) == ["variant", "seed", "model", "batchnorm", "gain", "activation"], table
        assert sorted(set(zip(study.variant, study.seed))) == sorted(
            (v, s) for v in config["variants"] for s in config["seeds"])
        for variant in config["variants"]:
            for seed in config["seeds"]:
                rows = study[(study.variant == variant) & (study.seed == seed)].drop(columns=study.columns[:6])
                own = pd.read_parquet(results / "runs" / variant / f"seed{seed}" / run_file)
                pd.testing.assert_frame_equal(rows.reset_index(drop=True), own, check_exact=True, obj=table)
    study = pd.read_parquet(results / "stats.parquet")
    settings = study.groupby("variant")[["model", "batchnorm", "gain", "activation"]].first()
    assert settings.loc["deep_bn"].tolist() == ["deep", True, 1.0, "tanh"]
    assert settings.loc["fix_tanh"].tolist() == ["mlp", False, pytest.approx(5 / 3), "tanh"]
    # a question across the study, in one expression: saturation at init, per variant
    at_init = study[(study.step == 0) & (study.stat == "saturated_pct")].groupby("variant").value.mean()
    assert set(at_init.index) == set(config["variants"])


def test_the_summary_computes_the_deep_table_at_the_step_the_runs_recorded(tiny_run):
    """The report's deep-network numbers come from the summary, at the snapshot step the run recorded
    (the one its figures show): 60 steps with snapshots at 0 and 20 give step 20."""
    workdir, config, _ = tiny_run
    results = workdir / "results"
    metrics = json.loads((results / "runs" / "deep_bn" / f"seed{LECTURE_SEED}" / "metrics.json").read_text())
    assert metrics["snapshot_step"] == 20
    deep = pd.read_csv(results / "deep_variants.csv")
    assert deep.variant.tolist() == ["deep_bn"]  # the mlp variant has no row
    row = deep.iloc[0]
    assert (row.snapshot_step, row.last_step) == (20, config["max_steps"] - 1)
    assert row.grad_ratio == pytest.approx(row.grad_std_first / row.grad_std_last)
    layers = pd.read_csv(results / "deep_layers.csv")
    saturated = layers[layers.stat == "saturated_pct"]
    assert sorted(set(saturated.step)) == [20, config["max_steps"] - 1]
    assert saturated[saturated.step == 20].layer.tolist() == ["tanh1", "tanh2"]
    seeds = [pd.read_parquet(results / "runs" / "deep_bn" / f"seed{s}" / "stats.parquet") for s in config["seeds"]]
    expected = sum(s[(s.step == 20) & (s.layer == "tanh2") & (s.stat == "saturated_pct")].value.iloc[0]
                   for s in seeds) / len(seeds)
    assert saturated[(saturated.step == 20) & (saturated.layer == "tanh2")].value.iloc[0] == pytest.approx(expected)
    html = (workdir / "report" / "report.html").read_text()
    deep_table = html.split('id="deep-table"')[1].split("</table>")[0]
    assert "step 20<" in deep_table and f"step {config['max_steps'] - 1}<" in deep_table
    samples = pd.read_csv(results / "samples.csv", keep_default_na=False)
    lecture = (results / "runs" / "fix_tanh" / f"seed{LECTURE_SEED}" / "samples.txt").read_text().split()
    assert samples[samples.variant == "fix_tanh"]["name"].tolist() == lecture
    assert all(f"<li>{name}</li>" in html for name in lecture)


def _rule_blocks():
    """(file, rule, text of its block) for every rule of the workflow."""
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        text = path.read_text()
        for block in re.split(r"\n(?=\s*rule\b)", text):
            head = re.match(r"\s*rule\s*(\w*)\s*:", block)
            if head:
                yield path.name, head.group(1) or "(named in the loop)", block


def test_no_rule_deploys_a_conda_environment_that_cannot_be_built():
    """Issue 15 item 3: a conda spec that installs `-e .` points at a copy of itself under --sdm conda, so it
    cannot be built. The rules carry none; the shared virtual environment is the cluster route."""
    blocks = list(_rule_blocks())
    assert {rule for _, rule, _ in blocks} >= {"all", "download", "splits", "summary", "report"}
    for filename, rule, block in blocks:
        for spec in re.findall(r"^\s*conda:\s*\n?\s*[\"']([^\"']+)[\"']", block, re.M):
            env = (REPO / "workflow" / "rules" / spec).resolve()
            assert env.exists(), f"{filename}: rule {rule}: conda spec {spec} does not exist"
            assert not re.search(r"-e\s+\.", env.read_text()), f"{filename}: rule {rule}: {spec} installs -e ."
    assert not any("conda:" in block for _, _, block in blocks)


def test_a_plain_rerun_retrains_exactly_what_is_missing(tiny_run):
    """Issue 18 item 1: a deleted run file or run directory is trained again by a plain rerun, and the
    summary and the report are brought up to date; nothing else retrains. (Last here: it rewrites tiny_run.)"""
    workdir, config, _ = tiny_run
    logs = {v: workdir / "logs" / "train" / f"{v}.log" for v in config["variants"]}
    report = workdir / "report" / "report.html"

    def rerun_after(delete, variant):
        before = {v: log.stat().st_mtime_ns for v, log in logs.items()}
        report_before = report.stat().st_mtime_ns
        delete()
        proc = run_snakemake(workdir, configfile=workdir / "config.yaml")
        out = proc.stdout + proc.stderr
        assert "Nothing to be done" not in out
        assert training_jobs_in(out) == [{variant}], out[-3000:]
        changed = {v for v, log in logs.items() if log.stat().st_mtime_ns != before[v]}
        assert changed == {variant}
        assert report.stat().st_mtime_ns > report_before
        for seed in config["seeds"]:
            assert (workdir / "results" / "runs" / variant / f"seed{seed}" / "metrics.json").exists()

    run = workdir / "results" / "runs" / "fix_tanh" / "seed1"
    rerun_after(lambda: (run / "metrics.json").unlink(), "fix_tanh")
    rerun_after(lambda: shutil.rmtree(workdir / "results" / "runs" / "deep_bn"), "deep_bn")
    summary = pd.read_csv(workdir / "results" / "summary.csv")
    assert len(summary) == len(config["variants"]) * len(config["seeds"])
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
