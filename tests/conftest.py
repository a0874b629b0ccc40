"""Shared fixtures: the local names file, tiny configs, and a real Snakemake run in a temp directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NAMES = Path(os.environ.get("ACTGRAD_NAMES", REPO.parent / "shared" / "data" / "names.txt")).resolve()
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


@pytest.fixture(scope="session")
def names_path() -> Path:
    if not NAMES.exists():
        pytest.fail(f"the names file is missing: {NAMES} (set ACTGRAD_NAMES to a copy of makemore's names.txt)")
    return NAMES


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
