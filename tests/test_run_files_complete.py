"""A metrics.json that is valid JSON but lacks what a training job writes is named, not read as empty."""

from __future__ import annotations

import json

import pytest

from actgrad.results.summary import TABLES, write_summary
from actgrad.rundir import Run, RunFileError, run_dir


def test_a_metrics_file_without_its_keys_is_named_by_the_summary(tmp_path):
    run = run_dir(tmp_path, "v", 1)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"variant": "v", "note": "edited by hand"}))
    with pytest.raises(RunFileError) as e:
        Run.read(run)
    assert str(e.value) == (f"{run / 'metrics.json'}: lacks 'seed', 'steps', which every finished training job "
                            f"writes; delete {run.parent} and rerun the workflow to train it again")
    (run / "metrics.json").write_text(json.dumps({"variant": "v", "seed": 1, "steps": 10}))
    with pytest.raises(RunFileError, match=r"lacks 'model', 'status', 'steps_done', 'train_loss', 'val_loss'"):
        write_summary({"variants": {"v": {}}}, [run / "metrics.json"], {name: tmp_path / name for name in TABLES})
