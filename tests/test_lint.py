"""Lint: ``snakemake --lint`` finds nothing in the workflow and ``ruff`` nothing in the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_snakemake, tiny_config, write_config

RUFF = str(Path(sys.executable).with_name("ruff"))
# Everything ruff checks: the package, the tests and the workflow's scripts (pyproject.toml has the rules).
RUFF_PATHS = ["src", "tests", "workflow/scripts"]


def ruff(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUFF, "check", "--no-cache", *paths], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


# The one lint the workflow keeps on purpose: its rules run in the environment Snakemake runs in (a shared
# virtual environment on a cluster, as tests/test_slurm.py does), not in per-rule conda environments, whose
# spec could not install this package from the workflow's tree (issue 15, item 3).
ACCEPTED_LINTS = {"Specify a conda environment or container for each rule."}


def lints_of(output: str) -> list[tuple[str, str]]:
    """Each lint Snakemake printed: (what it is about, the lint's message)."""
    found = []
    for block in re.split(r"\n(?=Lints for )", output):
        head = re.match(r"Lints for (.+?) \(", block)
        if head:
            found += [(head.group(1), m.rstrip(":")) for m in re.findall(r"^\s+\* (.+)$", block, re.M)]
    return found


def test_snakemake_lint_finds_nothing(names_path, tmp_path):
    configfile = write_config(tmp_path, tiny_config(names_path))
    proc = run_snakemake(tmp_path, "--lint", configfile=configfile, check=False)
    out = proc.stdout + proc.stderr
    unexpected = [(where, lint) for where, lint in lints_of(out) if lint not in ACCEPTED_LINTS]
    assert unexpected == [], out[-6000:]
    assert proc.returncode == 0 or lints_of(out), out[-6000:]
    # --lint only reads the workflow: it runs nothing.
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_lint_reports_a_lint_when_there_is_one(names_path, tmp_path):
    """The check above can fail: a rule without a log is a lint."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(snakefile),
                           "--directory", str(tmp_path), "--lint"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Lints for rule a" in proc.stdout + proc.stderr


def test_ruff_passes_on_the_whole_code_base():
    proc = ruff(*RUFF_PATHS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
