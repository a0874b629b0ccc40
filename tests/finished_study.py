"""One finished tiny study (2 variants x 2 seeds), built once per test session and copied by each test that
changes it: tests/test_rebuilds.py, test_refusals.py and test_data_identity.py share it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from conftest import names_file, run_snakemake, tiny_config, write_config

_BUILT: dict[str, Path] = {}


def finished_study(tmp_path_factory) -> Path:
    """The folder of a finished tiny study (config.yaml, data, results, report); do not change it: copy it."""
    if "study" not in _BUILT:
        workdir = tmp_path_factory.mktemp("finished-study")
        configfile = write_config(workdir, tiny_config(names_file()))
        run_snakemake(workdir, f"--configfile={configfile}")
        _BUILT["study"] = workdir
    return _BUILT["study"]


def copy_of(study: Path, to: Path) -> Path:
    """A copy of the finished study that a test may change (modification times kept, so nothing is out of date)."""
    target = Path(to) / "study"
    shutil.copytree(study, target, symlinks=True)
    return target


def snakemake_in(workdir: Path, *args: str, check: bool = True):
    return run_snakemake(workdir, f"--configfile={workdir / 'config.yaml'}", *args, check=check)


def output_of(proc) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def planned_rules(workdir: Path) -> list[str]:
    """The rules a dry run of the study would run, one entry per job ([] when nothing is to be done)."""
    out = output_of(snakemake_in(workdir, "--dry-run"))
    if "Nothing to be done" in out:
        return []
    return re.findall(r"^\s*(?:local)?rule (\S+):$", out, re.M)
