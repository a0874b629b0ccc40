"""`actgrad bench` talks: the plan and an estimate first, then each row as it is measured (to a pipe, too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_the_bench_prints_its_plan_first_and_each_row_as_it_is_measured(names_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "actgrad.tools.bench", "--names", str(names_path), "--steps", "30",
                             "--models", "2", "--repeat", "2", "--networks", "shallow", "--peers", "none"],
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    lines = []  # (seconds since start, line) as they arrive through the pipe
    start = time.monotonic()
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    assert proc.wait() == 0
    end = time.monotonic() - start
    first_at, first = lines[0]
    assert first.startswith("actgrad bench: 4 engine and lecture-loop rows and 0 peer rows, 30 steps each, best of 2")
    assert " about " in first and "estimated" in first
    rows = [(at, line) for at, line in lines if line.startswith(("round 1/2: shallow", "shallow "))]
    assert len(rows) == 8, lines
    # the plan comes before the names are split (seconds) and the rows are timed; rows come as they are measured,
    # each round's before the next round's, long before the bench ends (its statistics and progress sections)
    assert first_at < rows[0][0] - 0.5, lines
    assert rows[3][0] < end - 0.5 and rows[-1][0] < end - 0.3, (end, rows)
