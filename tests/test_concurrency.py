"""Jobs side by side: torch threads as Snakemake grants them, no two jobs writing one file, no job writing an
undeclared file."""

from __future__ import annotations

import json
import re

import pytest
from conftest import (
    DEEP_BN,
    FIX_TANH,
    LECTURE_SEED,
    SUMMARY,
    files_under,
    job_blocks,
    long_config,
    output_of,
    run_targets,
    snakemake,
    tiny_config,
    trained_variants,
    write_config,
)


@pytest.mark.slow
def test_training_jobs_use_one_thread_each_by_default(reference_run):
    """torch would otherwise use every core in every job: with --cores N, N jobs x all cores."""
    workdir, _, _ = reference_run
    found = list((workdir / "results" / "runs").rglob("metrics.json"))
    assert len(found) == 3
    for metrics in found:
        assert json.loads(metrics.read_text())["threads"] == 1, metrics


@pytest.mark.slow
def test_training_threads_are_scaled_down_to_the_cores_given(names_path, tmp_path):
    config = tiny_config(names_path, threads=4, max_steps=20, seeds=[LECTURE_SEED],
                         stats={"every": 10, "update_every": 10, "histogram_every": 10, "snapshot_steps": [0],
                                "bins": 10},
                         variants={"fix_tanh": FIX_TANH})
    proc = snakemake(tmp_path, write_config(tmp_path, config), *run_targets(config), cores=2)
    assert re.search(r"threads: 2\b", output_of(proc))  # Snakemake scaled the rule's 4 threads down to 2
    metrics = json.loads((tmp_path / run_targets(config)[0]).read_text())
    assert metrics["threads"] == 2


def test_parallel_jobs_never_write_the_same_file(names_path, tmp_path):
    config = long_config(names_path)
    config["variants"].update({"kaiming": {"init": {"W1": "kaiming", "W2": 0.01, "b2": 0}},
                               "deep-relu": dict(DEEP_BN, activation="relu")})
    proc = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", "--forceall", cores=4)
    jobs = job_blocks(output_of(proc))
    # A training job per variant (training_jobs: variant, the default), and no other job writes a run.
    training = [job for job in jobs if job["rule"].startswith("train")]
    assert sorted(sorted(trained_variants(job)) for job in training) == sorted([v] for v in config["variants"])
    assert all(job in training for job in jobs if trained_variants(job))
    writers: dict[str, str] = {}
    for job in jobs:
        name = f"{job['rule']} {job['wildcards']}"
        for path in job["files"]:
            assert path not in writers, f"{path} is written by both {writers[path]} and {name}"
            writers[path] = name
    for job in training:
        [variant] = trained_variants(job)
        for path in job["files"]:
            assert (path.startswith(f"results/runs/{variant}/") or path in
                    (f"logs/train/{variant}.log", f"benchmarks/train/{variant}.tsv")), path


@pytest.mark.slow
def test_training_writes_only_its_declared_outputs(reference_run):
    workdir, config, configfile = reference_run
    proc = snakemake(workdir, configfile, "--dry-run", "--forceall", SUMMARY)
    declared = {path for job in job_blocks(output_of(proc)) for path in job["files"]}
    written = {str(p.relative_to(workdir)) for d in ("data", "results", "logs", "benchmarks")
               for p in files_under(workdir / d)}
    assert written and written - declared == set()
