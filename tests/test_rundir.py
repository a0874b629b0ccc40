"""The run directory has one owner, actgrad.rundir: the writer writes its files, the readers read them back
and name the file when one is missing or corrupt."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import LECTURE_SEED, tiny_config

from actgrad.rundir import RUN_FILES, Run, RunFileError, read_runs, run_dir, run_files


def test_paths_of_a_variants_runs():
    assert run_dir("res", "fix_tanh", 7).as_posix() == "res/runs/fix_tanh/seed7"
    paths = run_files("res", "v", [1, 2], ["metrics.json", "losses.parquet"])
    assert paths == ["res/runs/v/seed1/metrics.json", "res/runs/v/seed1/losses.parquet",
                     "res/runs/v/seed2/metrics.json", "res/runs/v/seed2/losses.parquet"]
    assert len(run_files("res", "v", [1])) == len(RUN_FILES)
    with pytest.raises(ValueError, match="not a run file"):
        run_files("res", "v", [1], ["model.pt"])


def test_the_training_job_writes_exactly_the_run_files_and_records_the_snapshot_step(names_path, tmp_path):
    from actgrad import data
    from actgrad.study import settings as cfg
    from actgrad.training.job import train_variants

    data.save_splits(names_path, tmp_path / "splits.pt", tmp_path / "splits.json")
    config = cfg.apply_defaults(tiny_config(names_path, max_steps=30, seeds=[LECTURE_SEED],
                                            stats={"every": 10, "update_every": 10, "histogram_every": 10,
                                                   "snapshot_steps": [0, 10], "bins": 10}))
    config["variants"] = {"fix_tanh": config["variants"]["fix_tanh"]}
    results = tmp_path / "results"
    train_variants(config, ["fix_tanh"], tmp_path / "splits.pt", results, log=lambda m: None)
    directory = run_dir(results, "fix_tanh", LECTURE_SEED)
    assert sorted(p.name for p in directory.iterdir()) == sorted(RUN_FILES)
    run = Run.read(directory / "stats.parquet")  # any of its files finds the run
    assert run.path == directory and run.variant == "fix_tanh" and run.seed == LECTURE_SEED
    assert run.metrics["snapshot_step"] == run.snapshot_step == 10  # step 1,000 is past the end: the nearest
    assert len(run.losses()) == 30 and len(run.samples()) == config["samples"]
    assert set(run.stats().step) >= {0, 10, 29} and set(run.saturation()) == {"tanh1"}


def _a_run(tmp_path, **metrics):
    directory = run_dir(tmp_path, "v", 1)
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps({"variant": "v", "seed": 1, "steps": 200, **metrics}))
    stats = pd.DataFrame({"step": [0, 0, 100, 100, 199], "layer": "tanh1",
                          "kind": ["preactivation", "activation", "preactivation", "activation", "preactivation"],
                          "stat": "std", "value": 1.0})
    stats.to_parquet(directory / "stats.parquet")
    return directory


def test_a_run_written_before_the_snapshot_step_was_recorded_gets_it_the_same_way(tmp_path):
    directory = _a_run(tmp_path)
    assert Run.read(directory).snapshot_step == 100  # among the snapshots, the one nearest the lecture's 1,000
    assert Run.read(_a_run(tmp_path / "b", snapshot_step=199)).snapshot_step == 199  # recorded: as recorded


def test_a_missing_or_corrupt_file_is_named_with_how_to_get_it_back(tmp_path):
    directory = _a_run(tmp_path)
    run = Run.read(directory)
    with pytest.raises(RunFileError, match=r"histograms\.parquet: missing; delete .*runs/v and rerun"):
        run.histograms()
    data = (directory / "stats.parquet").read_bytes()
    (directory / "stats.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match=r"seed1/stats\.parquet: not a readable parquet file"):
        run.stats()
    np.savez(directory / "saturation.npz", tanh1=np.zeros((2, 3), bool))
    (directory / "saturation.npz").write_bytes((directory / "saturation.npz").read_bytes()[:40])
    with pytest.raises(RunFileError, match=r"saturation\.npz: not a readable \.npz file"):
        run.saturation()
    (directory / "metrics.json").write_text('{"variant": "v", "se')
    with pytest.raises(RunFileError, match=r"seed1/metrics\.json: not valid JSON"):
        read_runs([directory / "stats.parquet"])
    (directory / "metrics.json").unlink()
    with pytest.raises(RunFileError, match=r"seed1/metrics\.json: missing"):
        Run.read(directory)


def test_read_runs_reads_each_run_once_in_order(tmp_path):
    a, b = _a_run(tmp_path / "a"), _a_run(tmp_path / "b")
    runs = read_runs([a / "metrics.json", a / "stats.parquet", b / "stats.parquet", a])
    assert [r.path for r in runs] == [a, b]
