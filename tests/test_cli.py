"""The `actgrad` command and the config documentation."""

import re

import pytest
import yaml
from conftest import REPO, tiny_config, write_config

from actgrad import cli
from actgrad.study.settings import load_schema


def test_validate_accepts_the_shipped_configs(capsys):
    for name in ("config.yaml", "smoke.yaml", "seed-notes.yaml"):
        assert cli.main(["validate", str(REPO / "config" / name)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_names_the_bad_key(tmp_path, names_path, capsys):
    config = tiny_config(names_path)
    config["variants"]["fix_tanh"]["activation"] = "swish"
    assert cli.main(["validate", str(write_config(tmp_path, config))]) == 1
    err = capsys.readouterr().err
    assert "variants/fix_tanh/activation" in err and "tanh" in err and "relu" in err


def test_every_config_key_is_documented():
    schema = load_schema()
    doc = (REPO / "config" / "README.md").read_text()
    keys = set(schema["properties"]) | set(schema["definitions"]["variant"]["properties"])
    keys |= {f"{section}.{k}" for section in ("stats", "sensitivity", "resources")
             for k in schema["properties"][section]["properties"]}
    missing = sorted(k for k in keys if f"`{k}`" not in doc and f"`{k}." not in doc)
    assert not missing, f"config/README.md does not document: {missing}"
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert set(default) <= set(schema["properties"])


def test_base_is_found_beside_the_file_that_names_it(tmp_path, names_path, monkeypatch):
    from actgrad.study.load import load

    folder = tmp_path / "studies"
    folder.mkdir()
    write_config(folder, tiny_config(names_path), name="base.yaml")
    (folder / "quick.yaml").write_text("base: base.yaml\nmax_steps: 7\n")
    monkeypatch.chdir(tmp_path)  # not the folder of the files
    config = load("studies/quick.yaml")
    assert config["max_steps"] == 7 and set(config["variants"]) == {"fix_tanh", "deep_bn"}
    (folder / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load("studies/loop.yaml")


def test_bench_prints_every_row_with_its_ratio_and_goal(names_path, capsys):
    from actgrad.tools import bench
    from actgrad.training import kernels

    rows = bench.run(bench.parse_args(["--steps", "30", "--models", "1,3", "--networks", "shallow", "--peers", "none",
                                       "--repeat", "1", "--names", str(names_path)]))
    out = capsys.readouterr().out
    speed = [r for r in rows if "ratio" in r]
    # Without the C kernels once, beside the engine with them, where they build.
    without = [("engine (PyTorch ops)", 3)] if kernels.load() is not None else []
    assert [(r["engine"], r["models"]) for r in speed] == [
        ("lecture loop", 1), ("engine", 1), ("engine", 3), *without, ("engine (no stats)", 3)]
    assert speed[0]["ratio"] == 1.0 and all(r["model_steps_per_s"] > 0 for r in speed)
    assert "sgemm peak on cpu" in out and "statistics overhead" in out and "C kernels on CPU: " in out
    engine_lines = [line for line in out.splitlines() if line.startswith("shallow ") and " engine" in line]
    assert len(engine_lines) == 3 + len(without)
    assert all(line.rstrip().endswith(("5x met", "5x short")) for line in engine_lines)


HELP_COMMANDS = [[], ["validate"], ["export-tensorboard"], ["bench"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(["actgrad", *c]))
def test_help_is_plain_text_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    # No reStructuredText (``literal``, :func:`role`, `link`_) and no Markdown backticks: a terminal shows them raw.
    assert "`" not in text and not re.search(r":\w+:`", text), text
    examples = text[text.lower().rindex("example"):] if "example" in text.lower() else ""
    assert re.search(rf"^\s+{' '.join(['actgrad', *command])}\b", examples, re.M), f"no example in:\n{text}"


# What a user's checkout has: everything but the tests, which may point at this team's local copy of the data.
PRODUCT = ["src", "config", "workflow", "report", "profiles", "README.md", "Snakefile", "environment.yml",
           "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".smk", ".yaml", ".yml", ".md", ".rst", ".j2", ".html", ".c", ".toml", ".txt", ".json", ""}


def test_no_product_file_points_outside_the_project():
    offenders = []
    for name in PRODUCT:
        top = REPO / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.exists() else []
        for path in files:
            if path.suffix not in TEXT_SUFFIXES or any(part.endswith(".egg-info") or part == "__pycache__"
                                                       for part in path.relative_to(REPO).parts):
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if "../shared" in line or "/work/" in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "paths that exist only in this team's workspace:\n" + "\n".join(offenders)
