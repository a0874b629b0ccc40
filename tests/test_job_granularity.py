"""How the study is cut into jobs (issue 14, section 1 and 5): training several variants in one job changes
no number, the config key chooses the cut."""

import json

import pandas as pd
import pytest
import torch
from conftest import LECTURE_SEED, REPO, run_snakemake, tiny_config, training_jobs_in, write_config

from actgrad.rundir import RUN_FILES, run_dir
from actgrad.study.jobs import batch_key, training_jobs
from actgrad.study.load import complete, load
from actgrad.study.settings import variant_spec

STATS = {"every": 10, "update_every": 5, "histogram_every": 10, "snapshot_steps": [0, 10], "bins": 10}


def _config(names_path, **overrides):
    deep = {"model": "deep", "n_layers": 2, "n_hidden": 16}
    variants = {
        "g_half": dict(deep, batchnorm=False, gain=0.5),
        "g_three": dict(deep, batchnorm=False, gain=3.0, sensitivity_twin=True),
        "bn": dict(deep, batchnorm=True, gain=1.0),
        "wide": dict(deep, batchnorm=False, gain=0.5, n_hidden=24),
    }
    return complete(tiny_config(names_path, seeds=[LECTURE_SEED, 1], max_steps=30, samples=2, stats=STATS,
                                engine="batched", variants=variants, **overrides))


def test_variants_that_differ_only_in_drawn_values_share_a_job(names_path):
    config = _config(names_path, training_jobs="architecture")
    assert training_jobs(config) == {"g_half_and_1": ["g_half", "g_three"], "bn": ["bn"], "wide": ["wide"]}
    assert training_jobs(config, "variant") == {v: [v] for v in config["variants"]}
    # ... and with training_jobs: model, every deep variant in one job, whatever its architecture
    assert training_jobs(config, "model") == {"g_half_and_3": ["g_half", "g_three", "bn", "wide"]}
    mixed = complete(dict(config, variants=dict(config["variants"], mlp={"model": "mlp"})))
    assert training_jobs(mixed, "model") == {"g_half_and_3": ["g_half", "g_three", "bn", "wide"], "mlp": ["mlp"]}
    assert training_jobs(complete(dict(config, training_jobs="variant"))) == {v: [v] for v in config["variants"]}
    with pytest.raises(ValueError, match="training_jobs: 'each' unknown"):
        training_jobs(config, "each")


def test_the_batch_key_ignores_exactly_the_drawn_values(names_path):
    config = _config(names_path)
    half, three, bn = (variant_spec(config, v) for v in ("g_half", "g_three", "bn"))
    assert batch_key(half) == batch_key(three)
    assert batch_key(half) != batch_key(bn)
    assert batch_key(half) != batch_key(dict(half, max_steps=31))
    assert batch_key(half) != batch_key(dict(half, lr_schedule=[{"from_step": 0, "lr": 0.05}]))


def test_a_bad_training_jobs_value_is_named(tmp_path, names_path):
    from actgrad.study.settings import ConfigError

    with pytest.raises(ConfigError, match="training_jobs"):
        _config(names_path, training_jobs="per_seed")


def _run_files(results, variant, seed):
    d = run_dir(results, variant, seed)
    return {name: (d / name).read_bytes() for name in RUN_FILES}


def test_a_runs_numbers_do_not_depend_on_the_variants_that_share_its_job(tmp_path, names_path):
    """Trained alone and trained beside another variant (with its twins), every file but the timing is the same."""
    from actgrad.data import save_splits
    from actgrad.training.job import train_variants

    config = dict(_config(names_path), device="cpu")
    splits = tmp_path / "splits.pt"
    save_splits(names_path, splits, tmp_path / "splits.json")
    alone, together = tmp_path / "alone", tmp_path / "together"
    # g_half and g_three train in one engine call; bn and wide cannot join it, and train after it, each in its own
    variants = ("g_half", "bn", "g_three", "wide")
    for v in variants:
        train_variants(config, [v], splits, alone, log=lambda m: None)
    lines = []
    metrics = train_variants(config, list(variants), splits, together, log=lines.append)
    assert [(m["variant"], m["seed"]) for m in metrics] == [(v, s) for v in ("g_half", "g_three", "bn", "wide")
                                                             for s in (LECTURE_SEED, 1)]
    assert [line.split("]")[0] for line in lines if "run(s) of 30 steps" in line] == ["[g_half +1", "[bn", "[wide"]
    for v in variants:
        for seed in (LECTURE_SEED, 1):
            a, b = _run_files(alone, v, seed), _run_files(together, v, seed)
            for name in ("losses.parquet", "stats.parquet", "histograms.parquet"):
                pd.testing.assert_frame_equal(pd.read_parquet(run_dir(alone, v, seed) / name),
                                              pd.read_parquet(run_dir(together, v, seed) / name), check_exact=True)
            assert a["samples.txt"] == b["samples.txt"] and a["saturation.npz"] == b["saturation.npz"]
            pa = torch.load(run_dir(alone, v, seed) / "params.pt")
            pb = torch.load(run_dir(together, v, seed) / "params.pt")
            assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
            ma, mb = (json.loads(x["metrics.json"]) for x in (a, b))
            ma.pop("seconds"), mb.pop("seconds")
            assert ma == mb
    twin = pd.read_parquet(run_dir(together, "g_three", 1) / "losses.parquet")
    assert "twin_loss" in twin and twin.twin_loss.notna().all()  # the twins found their bases
    assert "twin_loss" not in pd.read_parquet(run_dir(together, "g_half", 1) / "losses.parquet")


def _training_rules(proc) -> set[frozenset[str]]:
    """The planned training jobs, each as the set of variants it trains."""
    return {frozenset(job) for job in training_jobs_in(proc.stdout)}


def test_the_workflow_trains_a_job_per_group_and_a_change_retrains_its_group(tmp_path, names_path):
    """With training_jobs: architecture the gains share a job; a plain rerun after a change to one of them
    retrains that job only, and the default cut gives every variant its own job again."""
    config = tiny_config(names_path, seeds=[LECTURE_SEED], max_steps=20, samples=1, stats=STATS,
                         engine="batched", training_jobs="architecture",
                         variants={"a": {"model": "deep", "n_layers": 2, "n_hidden": 16, "gain": 0.5},
                                   "b": {"model": "deep", "n_layers": 2, "n_hidden": 16, "gain": 2.0},
                                   "m": {"init": {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}}})
    path = write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "-n", configfile=path)
    assert _training_rules(proc) == {frozenset("ab"), frozenset("m")}
    run_snakemake(tmp_path, *[str(run_dir("results", v, LECTURE_SEED) / "metrics.json") for v in "abm"],
                  configfile=path)
    assert _training_rules(run_snakemake(tmp_path, "-n", configfile=path)) == set()
    config["variants"]["b"]["gain"] = 3.0
    write_config(tmp_path, config)
    assert _training_rules(run_snakemake(tmp_path, "-n", configfile=path)) == {frozenset("ab")}
    config["training_jobs"] = "variant"
    write_config(tmp_path, config)
    assert _training_rules(run_snakemake(tmp_path, "-n", configfile=path)) == {frozenset("a"), frozenset("b")}


def test_the_smoke_study_trains_a_job_per_model():
    """config/smoke.yaml, the quick check of the whole study, trains every variant of a model in one job."""
    config = load(REPO / "config" / "smoke.yaml")
    jobs = training_jobs(config)
    assert config["training_jobs"] == "model"
    assert sorted(v for members in jobs.values() for v in members) == sorted(config["variants"])
    assert [{variant_spec(config, v)["model"] for v in members} for members in jobs.values()] == [{"mlp"}, {"deep"}]
