"""Shared fixtures: the local names file, tiny configs, and a real Snakemake run in a temp directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# makemore's names.txt: $ACTGRAD_NAMES, or the copy a pipeline run downloads (fetched by the first test that
# needs it when there is none, verified by its sha256 like the pipeline's).
NAMES = Path(os.environ.get("ACTGRAD_NAMES", REPO / "data" / "names.txt")).resolve()
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
LECTURE_SEED = 2147483647
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as a training job runs it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def names_file() -> Path:
    """The names file, fetched (and verified) into data/ first where there is none and ACTGRAD_NAMES is not set."""
    if not NAMES.exists() and "ACTGRAD_NAMES" not in os.environ:
        from actgrad.data import DataError, download_names
        from actgrad.study.settings import study_defaults

        try:
            download_names(study_defaults()["names_url"], NAMES_SHA256, NAMES)
        except DataError as e:
            pytest.fail(f"the names file is missing and could not be downloaded: {e}; "
                        "set ACTGRAD_NAMES to a copy of makemore's names.txt")
    if not NAMES.exists():
        pytest.fail(f"the names file is missing: {NAMES} (set ACTGRAD_NAMES to a copy of makemore's names.txt)")
    return NAMES


@pytest.fixture(scope="session")
def names_path() -> Path:
    return names_file()


@pytest.fixture(scope="session")
def splits(names_path):
    from actgrad import data

    return data.make_splits(data.read_names(names_path))


def tiny_config(names: Path, **overrides) -> dict:
    """A complete config: one shallow and one deep variant, a few steps, statistics often."""
    config = {
        "title": "test run",
        "names_url": str(names),
        "names_sha256": NAMES_SHA256,
        "seeds": [LECTURE_SEED, 1],
        "max_steps": 60,
        "engine": "reference",
        "device": "cpu",
        "samples": 3,
        "stats": {"every": 20, "update_every": 10, "histogram_every": 20, "snapshot_steps": [0, 20], "bins": 20},
        "variants": {
            "fix_tanh": {"init": {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}},
            "deep_bn": {"model": "deep", "batchnorm": True, "gain": 1.0, "n_layers": 2, "n_hidden": 32},
        },
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(directory: Path, config: dict, name: str = "config.yaml") -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(workdir: Path, *args: str, configfile: Path | None = None, cores: int = 2) -> list[str]:
    """The command line that runs the real workflow of this repo with ``workdir`` as its working directory."""
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", str(cores)]
    cmd += list(args)
    if configfile is not None:
        cmd.append(f"--configfile={configfile}")  # `--configfile PATH target` would read target as a file
    return cmd


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, cores: int = 2, check: bool = True,
                  timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    """Run the real workflow of this repo with ``workdir`` as its working directory."""
    cmd = snakemake_command(workdir, *args, configfile=configfile, cores=cores)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def output_of(proc) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def job_blocks(output: str) -> list[dict]:
    """Each job of Snakemake's printout (a dry run's or a real run's): its rule, its input files, its output, log
    and benchmark files, its wildcards and its resources line."""
    jobs = []
    for block in re.split(r"\n(?=\s*(?:local)?rule \S+:\n)", output):
        head = re.match(r"\s*(?:local)?rule (\S+):\n", block)
        if not head:
            continue
        job = {"rule": head.group(1), "files": [], "inputs": [], "wildcards": {}, "resources": ""}
        for value in re.findall(r"^\s{4}(?:output|log|benchmark): (.*)$", block, re.M):
            job["files"] += value.split(", ")
        for value in re.findall(r"^\s{4}input: (.*)$", block, re.M):
            job["inputs"] += value.split(", ")
        for value in re.findall(r"^\s{4}wildcards: (.*)$", block, re.M):
            job["wildcards"].update(item.split("=", 1) for item in value.split(", "))
        job["resources"] = " ".join(re.findall(r"^\s{4}resources: (.*)$", block, re.M))
        jobs.append(job)
    return jobs


def trained_variants(job: dict) -> set[str]:
    """The variants whose runs a job of :func:`job_blocks` writes (none for a job that is not training)."""
    return {m.group(1) for path in job["files"] for m in [re.match(r"results/runs/([^/]+)/seed\d+/", path)] if m}


def training_jobs_in(output: str) -> list[set[str]]:
    """The training jobs in Snakemake's printout, in order, each as the set of variants it trains."""
    return [variants for variants in map(trained_variants, job_blocks(output)) if variants]


def in_ci() -> bool:
    """Whether the tests run under CI (the CI variable set to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def max_param_diff(a, b):
    """The largest difference between the parameters of two networks of one architecture."""
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def completed(config: dict) -> dict:
    """A config with its sweeps expanded and its defaults filled in, as the workflow sees it."""
    from actgrad.study.settings import apply_defaults
    from actgrad.study.sweeps import expand_sweeps

    return apply_defaults(expand_sweeps(config))


# -- the real workflow on small configs: shared by the tests of reruns, interrupts, concurrency and determinism --

FIX_TANH = {"init": {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}}
DEEP_BN = {"model": "deep", "batchnorm": True, "gain": 1.0, "n_layers": 2, "n_hidden": 32}
# Fields of metrics.json / summary.csv that are wall-clock measurements, not results.
WALL_CLOCK = {"seconds"}
# The target of most runs here: the figures and the report would add a minute and nothing to check.
SUMMARY = "results/summary.csv"


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file()) if Path(directory).exists() else []


def snakemake(workdir: Path, configfile: Path, *args: str, **kwargs):
    """``run_snakemake`` with ``--configfile=PATH`` as one word: as two words the option takes every
    argument after it, targets included, for one more config file."""
    return run_snakemake(workdir, f"--configfile={configfile}", *args, **kwargs)


def planned(workdir: Path, configfile: Path, *args: str) -> list[dict]:
    """The jobs a dry run would run."""
    proc = snakemake(workdir, configfile, "--dry-run", *args)
    return [] if "Nothing to be done" in output_of(proc) else job_blocks(output_of(proc))


def run_targets(config: dict) -> list[str]:
    """Snakemake targets that train every variant and stop there (no summary, figures, report)."""
    return [f"results/runs/{v}/seed{seed}/metrics.json" for v, spec in config["variants"].items()
            for seed in spec.get("seeds", config["seeds"])]


def compare_runs(a: Path, b: Path, tables: bool = True) -> None:
    """Everything two runs of one config wrote is equal, wall-clock measurements aside."""
    import numpy as np
    import pandas as pd
    import torch

    runs_a = sorted(p.relative_to(a) for p in files_under(a / "results" / "runs"))
    runs_b = sorted(p.relative_to(b) for p in files_under(b / "results" / "runs"))
    assert runs_a == runs_b and runs_a, "the two runs wrote different files"
    for rel in runs_a:
        fa, fb = a / rel, b / rel
        if rel.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(fa), pd.read_parquet(fb), check_exact=True, obj=str(rel))
        elif rel.name == "metrics.json":
            ma, mb = json.loads(fa.read_text()), json.loads(fb.read_text())
            for key in WALL_CLOCK:
                ma.pop(key, None)
                mb.pop(key, None)
            assert ma == mb, rel
        elif rel.suffix == ".npz":
            with np.load(fa) as za, np.load(fb) as zb:
                assert sorted(za.files) == sorted(zb.files), rel
                for key in za.files:
                    assert np.array_equal(za[key], zb[key]), f"{rel}:{key}"
        elif rel.suffix == ".pt":
            ta, tb = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
            assert ta.keys() == tb.keys(), rel
            for key in ta:
                assert torch.equal(ta[key], tb[key]), f"{rel}:{key}"
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel
    for table in ("summary.csv", "variants.csv", "significance.csv", "reference_check.csv") if tables else ():
        if not (a / "results" / table).read_text().strip():  # a table with no rows and no columns
            assert not (b / "results" / table).read_text().strip(), table
            continue
        ta, tb = pd.read_csv(a / "results" / table), pd.read_csv(b / "results" / table)
        drop = [c for c in ta.columns if c in WALL_CLOCK]
        pd.testing.assert_frame_equal(ta.drop(columns=drop), tb.drop(columns=drop), check_exact=True, obj=table)


@pytest.fixture(scope="session")
def splits_file(names_path, tmp_path_factory):
    """data/splits.pt of the names file, made once."""
    from actgrad import data

    out = tmp_path_factory.mktemp("splits")
    data.save_splits(names_path, out / "splits.pt", out / "splits.json")
    return out / "splits.pt"


LONG_STEPS = 3000


def long_config(names_path) -> dict:
    """A shallow variant trained long enough to be killed mid-way, and a short deep one beside it."""
    return tiny_config(names_path, stats={"every": 250, "update_every": 50, "histogram_every": 1000,
                                          "snapshot_steps": [0, 500], "bins": 20},
                       variants={"long": dict(FIX_TANH, max_steps=LONG_STEPS, seeds=[LECTURE_SEED]),
                                 "deep_bn": DEEP_BN})


@pytest.fixture(scope="session")
def reference_run(names_path, tmp_path_factory):
    """One uninterrupted run of the long config: what every other run of it must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    config = long_config(names_path)
    configfile = write_config(workdir, config)
    snakemake(workdir, configfile, SUMMARY)
    return workdir, config, configfile
