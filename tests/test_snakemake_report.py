"""Snakemake's own report (`snakemake --report`, offered by the README) from the documented install.

The captions in workflow/report/ are reStructuredText that Snakemake renders with jinja2 and docutils;
markup errors do not stop the report, they show up in it as red "System Message" boxes.
"""

from __future__ import annotations

import importlib.metadata
import re

import jinja2
import pytest
from conftest import LECTURE_SEED, REPO, run_snakemake, tiny_config, write_config
from docutils.core import publish_parts
from docutils.writers import html4css1
from packaging.requirements import Requirement

from actgrad.report.html import read_caption

CAPTIONS = sorted((REPO / "workflow" / "report").glob("*.rst"))


def _closure(requirements: list[Requirement]) -> set[str]:
    """The normalised names of the installed distributions these requirements pull in, recursively."""
    seen: set[str] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(dep)
    return seen


def test_the_workflow_extra_brings_what_snakemake_report_needs():
    """`pip install -e ".[workflow]"` (the README's) must pull in pygments, which `snakemake --report` requires."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # This checkout's pyproject, not the installed metadata, which may predate it.
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["workflow"]]
    assert "pygments" in _closure(requirements), (
        'the workflow extra does not pull in pygments: `snakemake --report` would refuse to run '
        '(require "snakemake[reports]")')


@pytest.mark.parametrize("caption", CAPTIONS, ids=lambda p: p.stem)
def test_caption_renders_without_docutils_messages(caption):
    """Rendered as Snakemake renders a caption (jinja2, then docutils' HTML writer): no error box."""
    text = jinja2.Template(caption.read_text()).render()
    body = publish_parts(text, writer=html4css1.Writer(), settings_overrides={"warning_stream": False})["body"]
    assert "system-message" not in body and "problematic" not in body, f"{caption.name}:\n{body}"


@pytest.mark.parametrize("caption", CAPTIONS, ids=lambda p: p.stem)
def test_caption_reads_as_plain_text_in_the_html_report(caption):
    """report.py shows the same captions with their ``literal`` quotes removed: no markup may remain."""
    text = read_caption(caption.parent, caption.stem)
    assert text and not re.search(r"[`\\]", text), text


@pytest.fixture(scope="module")
def snakemake_report(tmp_path_factory, names_path):
    """A tiny finished study (seconds of training), then `snakemake --report` on it."""
    workdir = tmp_path_factory.mktemp("snakemake_report")
    config = tiny_config(names_path, seeds=[LECTURE_SEED], max_steps=40,
                         stats={"every": 20, "update_every": 10, "histogram_every": 20, "snapshot_steps": [0, 20],
                                "bins": 20})
    configfile = write_config(workdir, config)
    run_snakemake(workdir, configfile=configfile)
    proc = run_snakemake(workdir, "--report", "report/snakemake-report.html", configfile=configfile, check=False)
    return workdir / "report" / "snakemake-report.html", proc


@pytest.mark.slow
def test_snakemake_report_builds_with_clean_captions(snakemake_report):
    path, proc = snakemake_report
    assert proc.returncode == 0, f"snakemake --report failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    html = path.read_text()
    for error in ("System Message", "Undefined substitution", "Unknown interpreted text role", "ERROR/"):
        assert error not in html, f"{path.name} shows a caption error: {error}"
    # The captions are in it: a phrase from the saturation caption, with |h| as text.
    assert "saturation map" in html and "|h|" in html
