"""The same config trains to the same bits: twice in one process, and twice through the workflow."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    SUMMARY,
    compare_runs,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad.study.settings import apply_defaults, validate


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_training_twice_gives_identical_results(engine, names_path, splits_file, tmp_path):
    """Both engines, a shallow and a deep BatchNorm variant, two seeds: the same bits every time."""
    from actgrad.training.job import train_variants

    config = tiny_config(names_path, engine=engine, max_steps=40)
    validate(config)
    apply_defaults(config)
    for attempt in ("a", "b"):
        for variant in config["variants"]:
            train_variants(config, [variant], splits_file, tmp_path / attempt / "results", log=lambda message: None)
    compare_runs(tmp_path / "a", tmp_path / "b", tables=False)


@pytest.mark.slow
def test_same_config_twice_gives_identical_results(reference_run, tmp_path):
    workdir, config, _ = reference_run
    snakemake(tmp_path, write_config(tmp_path, config), SUMMARY)
    compare_runs(workdir, tmp_path)
    for key in ("Xtrain", "Ytrain", "Xdev", "Ydev", "Xtest", "Ytest"):
        assert torch.equal(torch.load(workdir / "data" / "splits.pt")[key],
                           torch.load(tmp_path / "data" / "splits.pt")[key])
