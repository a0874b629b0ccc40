"""What a plain rerun of a finished study rebuilds: a deleted figure, and a deleted seed's whole training job."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import job_blocks, trained_variants
from finished_study import copy_of, finished_study, output_of, planned_rules, snakemake_in

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return finished_study(tmp_path_factory)


@pytest.mark.slow
def test_a_deleted_figure_is_drawn_again(study, tmp_path):
    work = copy_of(study, tmp_path)
    figures = [work / "results" / "figures" / "loss_curves.png", work / "results" / "figures" / "fix_tanh" /
               "activations.png"]
    for figure in figures:
        figure.unlink()
    snakemake_in(work)
    assert all(f.exists() for f in figures)
    assert planned_rules(work) == []


@pytest.mark.slow
def test_deleting_one_seed_retrains_every_seed_of_its_variant_as_the_docs_say(study, tmp_path):
    work = copy_of(study, tmp_path)
    seed = next((work / "results" / "runs" / "fix_tanh").glob("seed*"))
    for path in seed.iterdir():
        path.unlink()
    seed.rmdir()
    # the variant's job, which writes every seed of it
    jobs = [job for job in job_blocks(output_of(snakemake_in(work, "--dry-run"))) if trained_variants(job)]
    assert [trained_variants(job) for job in jobs] == [{"fix_tanh"}]
    seeds = {p.name for p in (study / "results" / "runs" / "fix_tanh").glob("seed*")}
    assert {path.split("/")[3] for path in jobs[0]["files"] if path.startswith("results/runs/")} == seeds
    troubleshooting = (REPO / "docs" / "troubleshooting.md").read_text()
    assert "only it retrains" not in troubleshooting
    assert "retrains it together with every other seed of its variant" in troubleshooting
    assert "retrains exactly the runs that are missing" not in (REPO / "docs" / "running.md").read_text()
