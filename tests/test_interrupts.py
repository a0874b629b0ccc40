"""A real kill of a real Snakemake run leaves nothing that looks finished, and a rerun completes it; SIGINT to
Snakemake alone stops its jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    FIX_TANH,
    LECTURE_SEED,
    compare_runs,
    files_under,
    output_of,
    planned,
    run_targets,
    snakemake,
    snakemake_command,
    tiny_config,
    trained_variants,
    write_config,
)


def _processes_in(workdir: Path) -> list[str]:
    """Command lines of the processes still running on ``workdir``."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(workdir) in line and "ps -eo" not in line]


def _wait_until_training(proc: subprocess.Popen, log: Path, output: Path, poll: float) -> None:
    """Until the training job's log says it is training; fails if Snakemake ends first or after 300 s."""
    deadline = time.monotonic() + 300
    while not (log.exists() and "training" in log.read_text()):
        assert proc.poll() is None, output.read_text()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(poll)


def _start_and_kill(workdir: Path, configfile: Path, targets: list[str], sig: signal.Signals) -> str:
    """Start the workflow, wait until the long variant is training, kill Snakemake's whole process group."""
    cmd = snakemake_command(workdir, *targets, configfile=configfile, cores=2)
    log = workdir / "logs" / "train" / "long.log"
    with open(workdir / "killed_run.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_training(proc, log, workdir / "killed_run.txt", poll=0.05)
            time.sleep(0.3)
            os.killpg(proc.pid, sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deadline = time.monotonic() + 30
    while _processes_in(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in(workdir) == [], "processes outlived the kill"
    assert proc.returncode != 0
    assert "seed 2147483647:" not in log.read_text(), "the kill came too late: training had finished"
    return (workdir / "killed_run.txt").read_text()


def _check_interrupted_then_rerun(workdir: Path, reference: Path, configfile: Path, targets: list[str]) -> None:
    run = workdir / "results" / "runs" / "long" / f"seed{LECTURE_SEED}"
    # Nothing that looks finished: no metrics.json, and Snakemake plans to train the variant again.
    assert not (run / "metrics.json").exists()
    assert {"long"} in [trained_variants(job) for job in planned(workdir, configfile, *targets)]
    snakemake(workdir, configfile, *targets)
    compare_runs(reference, workdir, tables=False)
    # No temporary files left beside the results.
    assert [p for p in files_under(workdir / "results") if p.name.startswith(".")] == []


@pytest.mark.slow
def test_sigterm_mid_training_leaves_nothing_complete_and_a_rerun_finishes(reference_run, tmp_path):
    reference, config, _ = reference_run
    configfile, targets = write_config(tmp_path, config), run_targets(config)
    out = _start_and_kill(tmp_path, configfile, targets, signal.SIGTERM)
    assert "SIGTERM" in out  # Snakemake reports the job as killed, and removes its outputs
    _check_interrupted_then_rerun(tmp_path, reference, configfile, targets)


@pytest.mark.slow
def test_sigkill_mid_training_leaves_nothing_complete_and_a_rerun_finishes(reference_run, tmp_path):
    reference, config, _ = reference_run
    configfile, targets = write_config(tmp_path, config), run_targets(config)
    _start_and_kill(tmp_path, configfile, targets, signal.SIGKILL)
    # Snakemake had no chance to clean up: its marker says the job's outputs are incomplete ...
    assert any((tmp_path / ".snakemake" / "incomplete").iterdir())
    # ... and its lock is still there: Snakemake refuses to start until told to remove it.
    proc = snakemake(tmp_path, configfile, *targets, check=False)
    assert proc.returncode != 0 and "Directory cannot be locked" in output_of(proc)
    assert "--unlock" in output_of(proc)
    snakemake(tmp_path, configfile, "--unlock")
    _check_interrupted_then_rerun(tmp_path, reference, configfile, targets)


@pytest.mark.slow
def test_sigint_to_snakemake_alone_stops_a_running_training_job(names_path, tmp_path):
    # a run of minutes: without the fix Snakemake waits for all of it
    config = tiny_config(names_path, seeds=[LECTURE_SEED], variants={"long": dict(FIX_TANH, max_steps=2_000_000)},
                         stats={"every": 100000, "update_every": 100000, "histogram_every": 100000,
                                "snapshot_steps": [0], "bins": 10})
    configfile = write_config(tmp_path, config)
    cmd = snakemake_command(tmp_path, *run_targets(config), configfile=configfile, cores=1)
    log = tmp_path / "logs" / "train" / "long.log"
    with open(tmp_path / "run.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_training(proc, log, tmp_path / "run.txt", poll=0.1)
            time.sleep(1)
            os.kill(proc.pid, signal.SIGINT)  # Snakemake only, not its process group
            sent = time.monotonic()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("Snakemake was still waiting for the training job 30 s after SIGINT")
            stopped_in = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode != 0 and stopped_in < 15, stopped_in
    assert _processes_in(tmp_path) == []
    assert log.read_text().splitlines()[-1] == ("error: train[long]: stopped by SIGINT; its unfinished outputs are "
                                                "removed, run again to redo it")
    assert not (tmp_path / run_targets(config)[0]).exists()
