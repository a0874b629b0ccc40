"""The real workflow on a real SLURM cluster, through snakemake-executor-plugin-slurm.

The test starts a one-node cluster of its own (tests/slurm_cluster.py: slurmctld, slurmd and
munged in a temporary folder, installed with apt-get if needed), runs the tiny study with the
repo's SLURM profile (workflow/profiles/slurm, with the partition filled in as the README tells a
cluster user to), and runs the same study locally at the same time. It checks that every training
job went through sbatch (SLURM's own job list: names, comments, sizes, GPUs, partition), that no
localrule did, and that the results are those of the local run. It stops the cluster and every
process it started, pass or fail. Where SLURM can't be installed or started (no root) it is
skipped; under CI (CI=true) that is a failure instead.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, in_ci, job_blocks, run_snakemake, tiny_config, trained_variants, write_config
from slurm_cluster import ClusterError, SlurmCluster, ensure_installed

PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
VENV_BIN = str(Path(sys.executable).parent)
# What a training job asks for in this test (kept small: any CI machine's node can grant it).
RESOURCES = {"train_mem_mb": 1200, "train_runtime": 15, "train_gpus": 1}
THREADS = 1
# Columns of results/summary.csv that measure wall-clock time, not the training itself.
WALL_CLOCK = re.compile(r"(^|_)(seconds|secs|time|elapsed|duration|started|finished)($|_)")
# The workflow's localrules (workflow/rules/common.smk): they must run on the submit host.
LOCAL_RULES = ("download", "splits", "summary", "report", "all")
# A cluster without accounting (no sacct): no account, and job states from squeue. Status checks
# start after 2 s instead of 40 s, to keep the test short.
CLUSTER_ARGS = ("--slurm-no-account", "--slurm-status-command", "squeue",
                "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                "--slurm-keep-successful-logs")


def _unavailable(reason: str, ci: bool):
    if ci:
        pytest.fail(f"CI must run the SLURM test, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster, stopped (jobs cancelled, daemons and job processes ended) afterwards."""
    try:
        ensure_installed()
    except ClusterError as e:
        _unavailable(str(e), in_ci())
    if os.geteuid() != 0:
        _unavailable("starting a SLURM cluster (slurmd, munged) needs root", in_ci())
    cluster = SlurmCluster(partition="actgrad_test", gpus=2, default_partition=False)
    try:
        cluster.start()
    except ClusterError as e:
        pytest.fail(f"the test's SLURM cluster did not start: {e}", pytrace=False)
    # A CI time-out's SIGTERM would end pytest without teardown: turn it into an interrupt, which does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def slurm_profile(directory: Path, partition: str) -> Path:
    """The repo's SLURM profile with the partition set, as the README tells a cluster user to."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"]["slurm_partition"] = partition
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def job_logs(workdir: Path, lines: int = 30) -> str:
    """The end of every SLURM job's own log (what the job printed), for a failure message."""
    text = []
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        text.append(f"--- {log.relative_to(workdir)} ---\n" + "\n".join(tail))
    return "\n".join(text)


def read_summary(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    return table.drop(columns=[c for c in table.columns if WALL_CLOCK.search(c)])


def test_profile_declares_a_slurm_run():
    """The profile as committed: executor, jobs, default resources, latency wait, retries, placeholders."""
    text = PROFILE.read_text()
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    assert int(profile["jobs"]) >= 1
    assert {"mem_mb", "runtime"} <= set(profile["default-resources"])
    assert int(profile["latency-wait"]) >= 30
    assert int(profile["retries"]) >= 1
    # Partition and account are placeholders to fill in, not values that break other clusters.
    assert "slurm_partition" not in profile["default-resources"]
    assert "slurm_account" not in profile["default-resources"]
    assert re.search(r"^\s*#\s*slurm_partition:", text, re.M) and re.search(r"^\s*#\s*slurm_account:", text, re.M)


def test_unavailable_slurm_fails_under_ci(monkeypatch):
    """Under CI a SLURM that can't be installed or started fails the test instead of skipping it."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the SLURM test"):
        _unavailable("no root", in_ci())
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no root"):
        _unavailable("no root", in_ci())


def test_profile_dry_run(names_path, tmp_path):
    """The installed Snakemake and SLURM plugin accept the profile; training jobs carry their resources."""
    configfile = write_config(tmp_path, tiny_config(names_path, resources=RESOURCES, threads=THREADS))
    proc = run_snakemake(tmp_path, "--workflow-profile", str(PROFILE.parent), "--dry-run", configfile=configfile)
    out = proc.stdout + proc.stderr
    assert f"workflow specific profile {PROFILE.parent}" in out
    training = {frozenset(trained_variants(job)): job["resources"] for job in job_blocks(out) if trained_variants(job)}
    for variant in ("fix_tanh", "deep_bn"):
        resources = training[frozenset({variant})]
        assert f"mem_mb={RESOURCES['train_mem_mb']}," in resources and f"gpu={RESOURCES['train_gpus']}" in resources


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_on_slurm_matches_local_run(slurm, names_path, tmp_path):
    from actgrad.study.sweeps import expand_sweeps

    # The listed variants and a tiny sweep: each sweep point is a training job of its own.
    sweep = {"base": {"model": "deep", "n_layers": 2, "n_hidden": 16, "batchnorm": False}, "grid": {"gain": [0.5, 2]}}
    config = tiny_config(names_path, resources=RESOURCES, threads=THREADS, sweeps={"g": sweep})
    configfile = write_config(tmp_path, config)
    variants = list(expand_sweeps(config)["variants"])
    assert [v for v in variants if v.startswith("g__")] == ["g__gain0p5", "g__gain2"]
    local_dir, cluster_dir = tmp_path / "local", tmp_path / "slurm"
    local_dir.mkdir()
    cluster_dir.mkdir()
    profile = slurm_profile(tmp_path / "profile", slurm.partition)
    env = slurm.env
    # The jobs inherit this environment (sbatch --export=ALL): the venv's snakemake and python first.
    env["PATH"] = os.pathsep.join([VENV_BIN, env["PATH"]])
    env.pop("SLURM_JOB_ID", None)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The local run (default profile) trains alongside the cluster jobs; its results are the reference.
        local = pool.submit(run_snakemake, local_dir, configfile=configfile, timeout=300)
        try:
            proc = run_snakemake(cluster_dir, "--workflow-profile", str(profile), *CLUSTER_ARGS,
                                 configfile=configfile, env=env, check=False, timeout=300)
        finally:
            local.result()
    elapsed = time.monotonic() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"the SLURM run failed ({proc.returncode}):\n{log[-6000:]}\n"
                                  f"SLURM jobs: {slurm.jobs()}\n{job_logs(cluster_dir)}\n{slurm.logs(15)}")

    # -- SLURM saw the training jobs, sized as the rules declare, and nothing else --------------------
    found = re.search(r"SLURM run ID: (\S+)", log)
    assert found, f"the SLURM executor did not run:\n{log[-3000:]}"
    run_id = found.group(1)
    assert run_id.startswith("actgrad_"), run_id  # slurm-jobname-prefix from the profile
    jobs = slurm.jobs()
    by_comment = {job["comment"]: job for job in jobs}
    assert len(by_comment) == len(jobs), f"a job was submitted twice: {jobs}"
    # A job's comment is rule_<rule>, or rule_<rule>_wildcards_<values> for a job of a wildcard rule.
    rules_on_slurm = {job["comment"].removeprefix("rule_").split("_wildcards_")[0] for job in jobs}
    training = {variant: f"rule_train_wildcards_{variant}" for variant in variants}  # a training job per variant
    assert set(training.values()) <= set(by_comment), f"training jobs missing from SLURM's jobs: {jobs}"
    for rule in LOCAL_RULES:
        assert rule not in rules_on_slurm, f"{rule} is a localrule but went to SLURM: {jobs}"
        assert f"localrule {rule}:" in log, f"{rule} did not run on the submit host"
    for job in jobs:  # every job of this run, training or not, went through sbatch and finished
        assert job["name"] == run_id, job
        assert job["state"] == "COMPLETED", job
        assert job["partition"] == slurm.partition, job
        assert Path(job["workdir"]).resolve() == cluster_dir.resolve(), job
        assert f"has been submitted with SLURM jobid {job['id']}" in log, job
    for variant, comment in training.items():  # sized as config/config.yaml's resources and threads say
        job = by_comment[comment]
        assert job["min_memory"] == f"{RESOURCES['train_mem_mb']}M", job
        assert job["time_limit"] == f"{RESOURCES['train_runtime']}:00", job
        assert job["cpus"] == str(THREADS), job
        assert job["tres_per_job"] == f"gres:gpu:{RESOURCES['train_gpus']}", job
        # The job's own SLURM log: Snakemake ran the rule inside the allocation.
        slurm_log = cluster_dir / ".snakemake" / "slurm_logs" / "rule_train" / variant / f"{job['id']}.log"
        assert slurm_log.exists(), f"no SLURM log {slurm_log}"
        job_log = slurm_log.read_text()
        assert "rule train:" in job_log and f"wildcards: variant={variant}" in job_log, job_log[-3000:]
        assert "1 of 1 steps (100%) done" in job_log, job_log[-3000:]

    # -- the same results as the local run -----------------------------------------------------------
    for variant in variants:
        for seed in config["seeds"]:
            run = cluster_dir / "results" / "runs" / variant / f"seed{seed}"
            assert (run / "metrics.json").exists() and (run / "params.pt").exists(), run
    on_slurm = read_summary(cluster_dir / "results" / "summary.csv")
    locally = read_summary(local_dir / "results" / "summary.csv")
    assert len(on_slurm) == len(variants) * len(config["seeds"])
    pd.testing.assert_frame_equal(on_slurm, locally, check_exact=True)
    report = cluster_dir / "report" / "report.html"
    assert report.exists()
    html = report.read_text()
    missing = [v for v in variants if v not in html]
    assert not missing, f"the report does not name the variant(s) {missing}"
    print(f"SLURM run and local run: {elapsed:.0f} s; SLURM jobs: "
          + ", ".join(f"{j['id']} {j['name']} {j['comment']} {j['state']}" for j in jobs))
