"""The `actgrad` command and the config documentation."""

import pytest
import yaml
from conftest import REPO, tiny_config, write_config

from actgrad import cli
from actgrad.config import load_schema


def test_validate_accepts_the_shipped_configs(capsys):
    for name in ("config.yaml", "smoke.yaml", "seed-notes.yaml"):
        assert cli.main(["validate", str(REPO / "config" / name)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_names_the_bad_key(tmp_path, names_path, capsys):
    config = tiny_config(names_path)
    config["variants"]["fix_tanh"]["activation"] = "gelu"
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
    from actgrad.config import load

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
    from actgrad import bench, kernels

    rows = bench.run(bench.parse_args(["--steps", "30", "--models", "1,3", "--networks", "shallow",
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
