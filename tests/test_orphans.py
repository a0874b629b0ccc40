"""A training job dies with the Snakemake that started it (kill -9 of Snakemake leaves no orphan trainer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import snakemake_command, tiny_config, write_config


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_snakemake_stops_its_training_job(names_path, tmp_path):
    config = tiny_config(names_path, max_steps=500_000, seeds=[1], variants={"long": {}})
    configfile = write_config(tmp_path, config)
    cmd = snakemake_command(tmp_path, f"--configfile={configfile}", "results/runs/long/seed1/metrics.json", cores=1)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        log = tmp_path / "logs" / "train" / "long.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "training 1 run(s)" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the training job did not start"
            time.sleep(0.5)
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if any("train.py" in part for part in p.cmdline())]
        assert trainers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(trainers, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
        assert "the Snakemake that ran it ended" in log.read_text().splitlines()[-1]
    finally:
        for p in psutil.Process().children(recursive=True):
            if p.pid != os.getpid() and any(str(tmp_path) in part for part in p.cmdline()):
                p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
