"""What a change reruns: a changed or added variant trains alone, a global training setting retrains all, a light
step reruns when its module changes."""

from __future__ import annotations

import copy

import pytest
from conftest import (
    LECTURE_SEED,
    REPO,
    SUMMARY,
    job_blocks,
    output_of,
    planned,
    snakemake,
    trained_variants,
    write_config,
)


@pytest.mark.slow
def test_changing_one_variant_reruns_it_and_the_steps_after_it_only(reference_run):
    workdir, config, configfile = reference_run
    assert planned(workdir, configfile, SUMMARY) == []  # nothing to do after a complete run, before the change
    changed = copy.deepcopy(config)
    changed["variants"]["deep_bn"]["gain"] = 0.9
    jobs = planned(workdir, write_config(workdir, changed, "changed.yaml"), SUMMARY)
    assert sorted(job["rule"] for job in jobs if not trained_variants(job)) == ["summary"], jobs
    assert [trained_variants(job) for job in jobs if trained_variants(job)] == [{"deep_bn"}], jobs


@pytest.mark.slow
def test_adding_a_variant_trains_only_it(reference_run):
    workdir, config, _ = reference_run
    changed = copy.deepcopy(config)
    changed["variants"]["kaiming"] = {"init": {"W1": "kaiming", "W2": 0.01, "b2": 0}}
    jobs = planned(workdir, write_config(workdir, changed, "added.yaml"), SUMMARY)
    assert sorted(job["rule"] for job in jobs if not trained_variants(job)) == ["summary"], jobs
    assert [trained_variants(job) for job in jobs if trained_variants(job)] == [{"kaiming"}], jobs


@pytest.mark.slow
def test_a_light_step_lists_the_package_module_it_runs_as_input(reference_run):
    """So that editing that module reruns the step (Snakemake's code trigger sees only the scripts);
    training does not list its modules, so that a refactor does not retrain."""
    workdir, _, configfile = reference_run
    proc = snakemake(workdir, configfile, "--dry-run", "--forcerun", "summary",
                     f"results/runs/long/seed{LECTURE_SEED}/metrics.json", SUMMARY)
    jobs = job_blocks(output_of(proc))
    [summary] = [job["inputs"] for job in jobs if job["rule"] == "summary"]
    [training] = [job["inputs"] for job in jobs if trained_variants(job) == {"long"}]
    assert str(REPO / "src" / "actgrad" / "results" / "summary.py") in summary
    assert not any("src/actgrad" in path for path in training)


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value"), [
    ("samples", 5),
    ("stats", {"every": 100, "update_every": 50, "histogram_every": 1000, "snapshot_steps": [0, 500], "bins": 20}),
    ("engine", "batched"),
])
def test_changing_a_global_training_setting_reruns_every_variant(reference_run, key, value):
    workdir, config, _ = reference_run
    changed = copy.deepcopy(config)
    changed[key] = value
    jobs = planned(workdir, write_config(workdir, changed, f"changed_{key}.yaml"), SUMMARY)
    trained = [trained_variants(job) for job in jobs if trained_variants(job)]
    assert {"long"} in trained and {"deep_bn"} in trained, jobs
