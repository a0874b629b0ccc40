"""Sweep bundles: a grid key that sets several variant keys together (actgrad.study.sweeps)."""

import pytest
from conftest import REPO, completed, tiny_config

from actgrad.study.comparisons import sweep_grids
from actgrad.study.load import read_yaml, resolve_base
from actgrad.study.settings import ConfigError, variant_spec
from actgrad.study.sweeps import expand_sweeps, grid_point

SCHEDULE = {"batch4": {"batch_size": 4, "max_steps": 800}, "batch32": {"batch_size": 32, "max_steps": 100}}


def bundled(names_path, grid, **sweep) -> dict:
    return tiny_config(names_path, variants=None, sweeps={"coupling": {
        "base": {"model": "deep", "n_layers": 2, "n_hidden": 16}, "grid": grid, **sweep}})


def test_a_bundle_sets_its_keys_together_and_its_label_names_the_point(names_path):
    config = completed(bundled(names_path, {"norm": ["batchnorm", "layernorm"], "schedule": SCHEDULE}))
    assert list(config["variants"]) == ["coupling__batchnorm__batch4", "coupling__batchnorm__batch32",
                                        "coupling__layernorm__batch4", "coupling__layernorm__batch32"]
    spec = variant_spec(config, "coupling__layernorm__batch4")
    assert (spec["norm"], spec["batch_size"], spec["max_steps"]) == ("layernorm", 4, 800)
    assert variant_spec(config, "coupling__batchnorm__batch32")["max_steps"] == 100
    # The point records the keys the bundle set; grid_point gives the bundle's label.
    variant = config["variants"]["coupling__layernorm__batch4"]
    assert variant["sweep"]["point"] == {"norm": "layernorm", "batch_size": 4, "max_steps": 800}
    assert grid_point(config, "coupling__layernorm__batch4") == {"norm": "layernorm", "schedule": "batch4"}
    assert "schedule batch4 (batch_size 4, max_steps 800)" in variant["description"]
    # Expanding again changes nothing; the sweep's grid lines run along the bundle too.
    assert expand_sweeps(config) == config
    lines = sweep_grids(config)
    assert lines["coupling_schedule"] == [["coupling__batchnorm__batch4", "coupling__batchnorm__batch32"],
                                          ["coupling__layernorm__batch4", "coupling__layernorm__batch32"]]
    assert lines["coupling_norm"] == [["coupling__batchnorm__batch4", "coupling__layernorm__batch4"],
                                      ["coupling__batchnorm__batch32", "coupling__layernorm__batch32"]]


def test_adding_a_label_only_adds_variants(names_path):
    before = completed(bundled(names_path, {"schedule": SCHEDULE}))
    after = completed(bundled(names_path, {"schedule": {**SCHEDULE, "batch8": {"batch_size": 8, "max_steps": 400}}}))
    assert set(after["variants"]) == set(before["variants"]) | {"coupling__batch8"}
    for name in before["variants"]:
        assert variant_spec(after, name) == variant_spec(before, name)


def test_a_bundle_may_set_a_nested_key(names_path):
    config = tiny_config(names_path, variants=None, sweeps={"s": {"grid": {"scales": {
        "small": {"init.W1": 0.1, "init.W2": 0.01}, "large": {"init.W1": 1.0, "init.W2": 1.0}}}}})
    spec = variant_spec(completed(config), "s__small")
    assert spec["init"]["W1"] == 0.1 and spec["init"]["W2"] == 0.01 and spec["init"]["C"] == 1


@pytest.mark.parametrize(("grid", "expected"), [
    ({"schedule": {"batch4": {"batch_sise": 4}}},
     r"sweeps/coupling/grid/schedule/batch4: unknown key\(s\) 'batch_sise' \(did you mean 'batch_size'"),
    ({"schedule": {"batch4": {"batch_size": 4, "max_steps": 8}, "batch8": {"batch_size": 8}}},
     r"sweeps/coupling/grid/schedule/batch8: sets batch_size, but batch4 sets batch_size, max_steps"),
    ({"batch_size": [4], "schedule": {"a": {"batch_size": 8}}},
     r"sweeps/coupling/grid/schedule: sets 'batch_size', which grid/batch_size sets too"),
    ({"schedule": {"a": {}}}, r"sweeps/coupling/grid/schedule/a: is empty"),
    ({"schedule": {"two__parts": {"batch_size": 4}}}, r"grid/schedule/two__parts: a bundle's label is letters"),
    ({"gian": [1, 2]}, r"sweeps/coupling/grid: unknown key\(s\) 'gian' \(did you mean 'gain'.*or a bundle"),
    ({"schedule": {"batch0": {"batch_size": 0, "max_steps": 10}}},
     r"variants/coupling__batch0/batch_size: .*\n.*point \{'batch_size': 0, 'max_steps': 10\} of sweeps/coupling"),
])
def test_a_bad_bundle_gets_a_line_naming_it(names_path, grid, expected):
    with pytest.raises(ConfigError, match=expected):
        expand_sweeps(bundled(names_path, grid))


def test_the_normalisation_study_keeps_the_examples_seen_fixed():
    path = REPO / "config" / "normalisation.yaml"
    config = completed(resolve_base(read_yaml(path), path.parent))
    specs = [variant_spec(config, name) for name in config["variants"]]
    assert {s["norm"] for s in specs} == {"batchnorm", "layernorm", "none"}
    assert {s["batch_size"] for s in specs} == {4, 8, 32, 128}
    assert len({s["batch_size"] * s["max_steps"] for s in specs}) == 1
    assert all(s["model"] == "deep" and s["n_layers"] == 5 for s in specs)
