"""Progress lines are throttled: progress_every: 1 is a line a second, not a line a step."""

from __future__ import annotations

from conftest import tiny_config

from actgrad.study.load import complete
from actgrad.training.job import train_variants


def test_progress_every_step_logs_at_most_a_line_a_second(names_path, splits, tmp_path, one_thread):
    import torch

    from actgrad.data import save_splits

    save_splits(names_path, tmp_path / "splits.pt", tmp_path / "splits.json")
    config = complete(tiny_config(names_path, progress_every=1, max_steps=400, seeds=[1, 2],
                                  variants={"v": {"n_hidden": 20}}))
    lines = []
    train_variants(config, ["v"], tmp_path / "splits.pt", tmp_path / "results", log=lines.append)
    steps = [line for line in lines if " step " in line]
    # two runs of 400 steps, one after the other (the reference engine), each well under a few seconds
    assert 2 <= len(steps) <= 10, steps
    assert sum("step 400/400" in line for line in steps) == 2  # each run's last step has its line
    assert torch.get_num_threads() == 1
