"""Sweeps: a grid over variant keys, expanded into named variants (actgrad.study.sweeps)."""

import re

import pytest
import yaml
from conftest import LECTURE_SEED, REPO, completed, run_snakemake, tiny_config, training_jobs_in, write_config

from actgrad import cli
from actgrad.study.settings import ConfigError, apply_defaults, load_schema, variant_spec
from actgrad.study.sweeps import expand_sweeps, sweep_groups, sweepable_keys

GAIN_SWEEP = {"base": {"model": "deep", "n_layers": 2},
              "grid": {"gain": [0.25, 0.5, 1, 5 / 3], "batchnorm": [False, True]}}


def with_sweeps(names_path, sweeps, **overrides) -> dict:
    return tiny_config(names_path, sweeps=sweeps, **overrides)


def test_names_are_readable_path_safe_and_in_grid_order(names_path):
    config = expand_sweeps(with_sweeps(names_path, {"gain": GAIN_SWEEP}))
    names = list(config["variants"])
    assert names[:2] == ["fix_tanh", "deep_bn"]  # the listed ones first, then the points, last key fastest
    assert names[2:] == ["gain__gain0p25__nobn", "gain__gain0p25__bn", "gain__gain0p5__nobn", "gain__gain0p5__bn",
                         "gain__gain1__nobn", "gain__gain1__bn", "gain__gain1p667__nobn", "gain__gain1p667__bn"]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", name) for name in names)
    # Plain sorting keeps the gains in order where they have one digit before the point.
    assert sorted(n for n in names[2:] if n.endswith("nobn")) == [n for n in names[2:] if n.endswith("nobn")]
    assert sweep_groups(config) == {None: ["fix_tanh", "deep_bn"], "gain": names[2:]}


@pytest.mark.parametrize(("key", "value", "part"), [
    ("gain", 1.6666666666666667, "gain1p667"), ("gain", 3.0, "gain3"), ("init.W1", 0.2, "W1_0p2"),
    ("init.W1", "kaiming", "kaiming"), ("init.b2", 1e-7, "b2_1em07"), ("max_steps", 200000, "steps200000"),
    ("n_hidden", 50, "width50"), ("batchnorm", False, "nobn"), ("sensitivity_twin", True, "twin"),
    ("activation", "relu", "relu"), ("last_layer_scale", -0.5, "lastm0p5"),
])
def test_a_value_is_written_in_the_name(names_path, key, value, part):
    model = "mlp" if key.startswith("init.") else "deep"
    config = with_sweeps(names_path, {"s": {"base": {"model": model}, "grid": {key: [value]}}})
    if key == "last_layer_scale":  # negative: named, then refused by the variant schema
        with pytest.raises(ConfigError, match=f"variants/s__{part}/last_layer_scale"):
            expand_sweeps(config)
        return
    assert list(expand_sweeps(config)["variants"])[2:] == [f"s__{part}"]


def test_a_point_is_its_base_with_the_points_values_and_says_where_it_came_from(names_path):
    config = with_sweeps(names_path, {
        "tanh_init": {"variant": "fix_tanh", "base": {"n_hidden": 50}, "grid": {"init.W1": [0.1, "kaiming"]},
                      "seeds": [7, 8, 9]},
        "gain": GAIN_SWEEP,
    })
    config["variants"]["fix_tanh"]["references"] = [{"source": "the lecture", "val_loss": 2.1}]
    expanded = completed(config)
    point = expanded["variants"]["tanh_init__W1_0p1"]
    # The listed variant's other init scales stay; its references describe its own settings, so they do not.
    assert point["init"] == {"C": 1, "W1": 0.1, "b1": 0.01, "W2": 0.01, "b2": 0}
    assert point["n_hidden"] == 50 and "references" not in point
    assert point["sweep"] == {"name": "tanh_init", "point": {"init.W1": 0.1}}
    assert variant_spec(expanded, "tanh_init__W1_0p1")["seeds"] == [7, 8, 9]
    assert variant_spec(expanded, "tanh_init__kaiming")["init"]["W1"] == "kaiming"
    # Without seeds of its own a sweep uses the study's.
    spec = variant_spec(expanded, "gain__gain1p667__bn")
    assert spec["seeds"] == config["seeds"] and spec["gain"] == 5 / 3 and spec["batchnorm"] is True
    assert spec["model"] == "deep" and spec["n_layers"] == 2
    assert expanded["variants"]["gain__gain1p667__bn"]["sweep"]["point"] == {"gain": 5 / 3, "batchnorm": True}
    # The input is left as it was.
    assert "tanh_init__W1_0p1" not in config["variants"] and config["variants"]["fix_tanh"]["references"]


def test_labelled_values_name_their_points(names_path):
    schedules = {"const": [{"from_step": 0, "lr": 0.1}], "decay": [{"from_step": 0, "lr": 0.1},
                                                                   {"from_step": 30, "lr": 0.01}]}
    config = expand_sweeps(with_sweeps(names_path, {"lr": {"grid": {"lr_schedule": schedules}}}))
    assert list(config["variants"])[2:] == ["lr__const", "lr__decay"]
    assert config["variants"]["lr__decay"]["lr_schedule"] == schedules["decay"]


def test_adding_values_only_adds_variants(names_path):
    def expanded(grid):
        return completed(with_sweeps(names_path, {"gain": {**GAIN_SWEEP, "grid": grid}}))

    before = expanded({"gain": [0.5, 2]})
    after = expanded({"gain": [0.25, 0.5, 1, 2, 3]})
    assert set(before["variants"]) < set(after["variants"])
    for name in before["variants"]:
        assert variant_spec(after, name) == variant_spec(before, name)
    # A new grid key renames every point: a different question, so a different set of runs.
    renamed = expanded({"gain": [0.5, 2], "batchnorm": [True]})
    assert not (set(renamed["variants"]) - {"fix_tanh", "deep_bn"}) & set(before["variants"])


def test_expanding_twice_changes_nothing(names_path):
    once = expand_sweeps(with_sweeps(names_path, {"gain": GAIN_SWEEP, "from_listed": {
        "variant": "deep_bn", "grid": {"n_hidden": [8, 16]}}}))
    assert expand_sweeps(once) == once
    done = apply_defaults(once)  # the workflow's config: defaults filled in everywhere
    assert expand_sweeps(done) == done
    no_sweeps = tiny_config(names_path)
    assert expand_sweeps(no_sweeps) == no_sweeps and expand_sweeps(no_sweeps) is not no_sweeps


@pytest.mark.parametrize(("sweeps", "listed", "expected"), [
    ({"s": {"grid": {"gian": [1]}}}, {},
     r"sweeps/s/grid: unknown key\(s\) 'gian' \(did you mean 'gain' .*allowed keys: .*init\.W1.*n_layers"),
    ({"s": {"grid": {}}}, {}, r"sweeps/s/grid: is empty"),
    ({"s": {"grid": {"gain": []}}}, {}, r"sweeps/s/grid/gain: is empty"),
    ({"s": {"base": {"gian": 1}, "grid": {"gain": [1]}}}, {}, r"sweeps/s/base: unknown key\(s\) 'gian'"),
    ({"s": {"variant": "fix_tanhh", "grid": {"gain": [1]}}}, {},
     r"sweeps/s/variant: 'fix_tanhh' is not a listed variant \(did you mean 'fix_tanh'\?\)"),
    ({"s": {"grid": {"gain": [1]}}}, {"s__gain1": {}},
     r"sweeps/s: its point .* is named 's__gain1', which is a listed"),
    ({"s": {"base": {"model": "deep"}, "grid": {"init.W1": [0.2]}}}, {},
     r"variants/s__W1_0p2/init: only an 'mlp' model has init.*\n.*point \{'init.W1': 0.2\} of sweeps/s"),
    ({"s": {"grid": {"n_layers": [3]}}}, {}, r"variants/s__layers3/n_layers: only a 'deep' model"),
    ({"s": {"grid": {"gain": [1.00001, 1.000012]}}}, {}, r"sweeps/s/grid/gain: 1.00001 and 1.000012 are both"),
    ({"s": {"grid": {"lr_schedule": [[{"from_step": 0, "lr": 0.1}]]}}}, {},
     r"sweeps/s/grid/lr_schedule/0: .* not allowed.*\n.*needs a label"),
    ({"s": {"grid": {"activation": ["Tanh fn"]}}}, {}, r"sweeps/s/grid/activation: 'Tanh fn' cannot be written"),
    ({"two__words": {"grid": {"gain": [1]}}}, {}, r"sweeps: 'two__words' is not allowed: a sweep's name"),
    ({}, {"mine": {"sweep": {"name": "s", "point": {}}}}, r"variants/mine/sweep: written by the expansion"),
])
def test_a_bad_sweep_gets_a_line_naming_it(names_path, sweeps, listed, expected):
    config = with_sweeps(names_path, sweeps)
    config["variants"].update(listed)
    with pytest.raises(ConfigError, match=expected):
        expand_sweeps(config)


def test_every_variant_setting_can_be_swept():
    schema = load_schema()
    variant = schema["definitions"]["variant"]["properties"]
    expected = {k for k in variant if k not in ("description", "references", "sweep", "seeds", "init")}
    expected |= {f"init.{k}" for k in variant["init"]["properties"]}
    assert set(sweepable_keys(schema)) == expected


def test_validate_lists_the_sweep_points_and_counts_the_runs(capsys):
    assert cli.main(["validate", str(REPO / "config" / "signal-propagation.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sweep deep (24 points over gain x batchnorm):"
    points = [line.split(":")[0].strip() for line in out[1:-1]]
    assert len(points) == 24 and points[:2] == ["deep__gain0p25__nobn", "deep__gain0p25__bn"]
    assert out[1] == ("  deep__gain0p25__nobn: deep, batchnorm=false, gain=0.25, 20000 steps, "
                      f"seeds [{LECTURE_SEED}, 1, 2], with twins")
    assert out[-1].endswith("valid; 24 variants, 144 runs (72 + 72 sensitivity twins)")


def test_the_signal_propagation_study_is_only_its_sweep():
    from actgrad.study.load import read_yaml, resolve_base

    path = REPO / "config" / "signal-propagation.yaml"
    config = completed(resolve_base(read_yaml(path), path.parent))
    gains = sorted({v["sweep"]["point"]["gain"] for v in config["variants"].values()})
    assert len(gains) == 12 and gains[0] == 0.25 and gains[-1] == 5
    assert {0.5, 1, 5 / 3, 3} <= set(gains)
    specs = [variant_spec(config, name) for name in config["variants"]]
    assert all(s["model"] == "deep" and s["n_layers"] == 5 and s["activation"] == "tanh" for s in specs)
    assert sorted(s["batchnorm"] for s in specs) == [False] * 12 + [True] * 12
    assert all(len(s["seeds"]) == 3 and s["sensitivity_twin"] for s in specs)


def test_validate_names_a_misspelled_grid_key(tmp_path, names_path, capsys):
    config = with_sweeps(names_path, {"s": {"base": {"model": "deep"}, "grid": {"bachnorm": [True]}}})
    assert cli.main(["validate", str(write_config(tmp_path, config))]) == 1
    err = capsys.readouterr().err
    assert "sweeps/s/grid" in err and "'bachnorm'" in err and "did you mean 'batchnorm'" in err


def test_a_point_added_later_trains_alone(tmp_path, names_path):
    """Train a 2-point sweep for real, add a point between them: the dry run lists only its training."""
    base = {"model": "deep", "n_layers": 2, "n_hidden": 16, "batchnorm": False}
    stats = {"every": 10, "update_every": 5, "histogram_every": 10, "snapshot_steps": [0, 10], "bins": 10}
    config = tiny_config(names_path, seeds=[LECTURE_SEED], max_steps=20, samples=1, stats=stats, variants=None,
                         sweeps={"g": {"base": base, "grid": {"gain": [0.5, 2]}}})
    path = write_config(tmp_path, config)
    run_snakemake(tmp_path, *[f"results/runs/{name}/seed{LECTURE_SEED}/metrics.json"
                              for name in ("g__gain0p5", "g__gain2")], configfile=path)

    def planned_training() -> set[str]:
        proc = run_snakemake(tmp_path, "-n", configfile=path)
        return {variant for job in training_jobs_in(proc.stdout) for variant in job}

    assert planned_training() == set()
    config["sweeps"]["g"]["grid"]["gain"] = [0.5, 1, 2]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_training() == {"g__gain1"}
