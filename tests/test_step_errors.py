"""Every failure of a step, foreseen or not, ends in one line naming the step; its log keeps that line."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    FIX_TANH,
    LECTURE_SEED,
    output_of,
    run_targets,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad import data


def _fake_step(tmp_path, rule: str, inputs: list[str]):
    from types import SimpleNamespace

    return SimpleNamespace(rule=rule, input=inputs, log=[str(tmp_path / "logs" / f"{rule}.log")])


def _run_step(tmp_path, capsys, rule, inputs, fn) -> tuple[str, str]:
    """Run ``fn`` through as_step; the step's terminal output and its log."""
    from actgrad.workflow_step import as_step

    with pytest.raises(SystemExit) as exit_:
        as_step(_fake_step(tmp_path, rule, inputs), fn)
    assert exit_.value.code == 1
    return capsys.readouterr().err, (tmp_path / "logs" / f"{rule}.log").read_text()


def test_a_corrupt_input_is_named_with_the_command_that_fixes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("results/runs/v/seed1")
    run.mkdir(parents=True)
    pd.DataFrame({"step": range(100), "value": 1.0}).to_parquet(run / "stats.parquet")
    (run / "metrics.json").write_text("{}")
    whole = (run / "stats.parquet").read_bytes()
    (run / "stats.parquet").write_bytes(whole[: len(whole) // 2])  # truncated, as by a full disk
    inputs = [str(run / "metrics.json"), str(run / "stats.parquet")]
    err, log = _run_step(tmp_path, capsys, "figures_variant", inputs, lambda log: pd.read_parquet(inputs[1]))
    line = ("error: figures_variant: results/runs/v/seed1/stats.parquet is corrupt (ArrowInvalid: ")
    assert err.count("\n") == 1 and err.startswith(line), err
    assert err.rstrip().endswith("; to make it anew: rm -r results/runs/v/seed1, then run snakemake again"), err
    assert "Traceback" not in err
    # the log: the traceback for a developer, then the same one line
    assert log.startswith("Traceback (most recent call last):") and log.splitlines()[-1] == err.rstrip()


def test_an_unforeseen_error_is_one_line_naming_the_step_and_the_log(tmp_path, capsys):
    def step(log):
        log("summarising")
        return {}["val_loss"]

    err, log = _run_step(tmp_path, capsys, "summary", [], step)
    line = f"error: summary: KeyError: 'val_loss' (the traceback is in {tmp_path / 'logs' / 'summary.log'})"
    assert err.splitlines() == ["summarising", line]
    assert log.splitlines()[0] == "summarising" and "Traceback (most recent call last):" in log
    assert log.splitlines()[-1] == line


def test_a_known_problem_is_its_line_alone(tmp_path, capsys):
    def step(log):
        raise data.DataError("names.txt: the file is empty")

    err, log = _run_step(tmp_path, capsys, "download", [], step)
    assert err == log == "error: download: names.txt: the file is empty\n"


@pytest.mark.slow
def test_a_truncated_stats_file_fails_the_step_that_reads_it_with_one_line(names_path, tmp_path):
    config = tiny_config(names_path, max_steps=30, seeds=[LECTURE_SEED], variants={"fix_tanh": FIX_TANH})
    configfile = write_config(tmp_path, config)
    snakemake(tmp_path, configfile, *run_targets(config))
    stats = tmp_path / "results" / "runs" / "fix_tanh" / f"seed{LECTURE_SEED}" / "stats.parquet"
    stats.write_bytes(stats.read_bytes()[:100])
    proc = snakemake(tmp_path, configfile, "results/figures/fix_tanh/init.png", check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    # one line naming the step, the file and what brings it back: the figures need the summary, which reads the
    # file first (a step may name it itself, or as_step finds it among the step's inputs); the profile's
    # show-failed-logs prints the log again
    assert len(set(lines)) == 1, out[-3000:]
    assert lines[0].startswith(f"error: summary: results/runs/fix_tanh/seed{LECTURE_SEED}/stats.parquet"), lines
    assert re.search(r"(rm -r|delete) results/runs/fix_tanh", lines[0]), lines
    assert "Traceback" not in out
    log = (tmp_path / "logs" / "summary.log").read_text()
    assert log.splitlines()[-1] == lines[0]
