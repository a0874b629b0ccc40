"""A bad config is refused before any job runs, naming the key and what is allowed."""

from __future__ import annotations

import copy

import pytest
from conftest import (
    FIX_TANH,
    output_of,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad.study.settings import ConfigError, apply_defaults, validate


def _with(path: str, value):
    def apply(config):
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return apply


BAD_CONFIGS = {
    "unknown key": (_with("learning_rate", 0.1), "(top level): unknown key(s) 'learning_rate'", "allowed keys: base,"),
    "misspelt key": (_with("max_step", 10), "did you mean 'max_steps' for 'max_step'?", "allowed keys:"),
    "unknown variant key": (_with("variants/fix_tanh/dropout", 0.1), "variants/fix_tanh: unknown key(s) 'dropout'",
                            "activation, batch_size, batchnorm,"),
    "unknown init key": (_with("variants/fix_tanh/init/W3", 1), "variants/fix_tanh/init: unknown key(s) 'W3'",
                         "allowed keys: C, W1, W2, b1, b2"),
    "steps as text": (_with("max_steps", "100"), "max_steps: '100' is not allowed; expected an integer", ""),
    "steps as float": (_with("max_steps", 100.0), "max_steps: 100.0 is not allowed; expected an integer", ""),
    "flag as text": (_with("variants/deep_bn/batchnorm", "yes"), "variants/deep_bn/batchnorm: 'yes'",
                     "expected true or false"),
    "zero steps": (_with("max_steps", 0), "max_steps: 0 is less than the minimum of 1", ""),
    "negative steps": (_with("max_steps", -5), "max_steps: -5 is less than the minimum of 1", ""),
    "negative variant steps": (_with("variants/fix_tanh/max_steps", -1),
                               "variants/fix_tanh/max_steps: -1 is less than the minimum of 1", ""),
    "empty variants": (_with("variants", {}), "variants: is empty; give at least 1", ""),
    "variants as a list": (_with("variants", []), "variants: [] is not allowed", "expected a mapping of keys"),
    "no variants": (lambda c: c.pop("variants"), "'variants' is a required property", ""),
    "no seeds": (_with("seeds", []), "seeds: is empty; give at least 1", ""),
    "fractional seed": (_with("seeds", [1.5]), "seeds/0: 1.5 is not allowed; expected an integer", ""),
    "seed as text": (_with("seeds", ["lecture"]), "seeds/0: 'lecture' is not allowed; expected an integer", ""),
    "seed as float": (_with("seeds", [2147483647.0]), "seeds/0: 2147483647.0 is not allowed", "an integer"),
    "seed as bool": (_with("seeds", [True]), "seeds/0: True is not allowed; expected an integer", ""),
    "variant seed": (_with("variants/deep_bn/seeds", [0.5]), "variants/deep_bn/seeds/0: 0.5 is not allowed", ""),
    "unknown init scheme": (_with("variants/fix_tanh/init/W1", "xavier"),
                            "variants/fix_tanh/init/W1: 'xavier' is not allowed", "expected a number or 'kaiming'"),
    "unknown activation": (_with("variants/fix_tanh/activation", "swish"),
                           "variants/fix_tanh/activation: 'swish' is not one of ['tanh', 'relu', 'gelu']", ""),
    "unknown model": (_with("variants/fix_tanh/model", "rnn"), "'rnn' is not one of ['mlp', 'deep']", ""),
    "unknown engine": (_with("engine", "fast"), "engine: 'fast' is not one of ['batched', 'reference']", ""),
    "unknown device": (_with("device", "tpu"), "device: 'tpu' is not allowed", "cpu, cuda or cuda:N"),
    "zero learning rate": (_with("variants/fix_tanh/lr_schedule", [{"from_step": 0, "lr": 0}]),
                           "variants/fix_tanh/lr_schedule/0/lr: 0 is less than or equal to the minimum of 0", ""),
    "bad checksum": (_with("names_sha256", "abc"), "names_sha256: 'abc' is not allowed", "64 hex digits"),
    "bad variant name": (_with("variants", {"my variant": {}}), "variants: 'my variant' does not match", "A-Za-z0-9_-"),
    # torch.Generator.manual_seed refuses seeds outside -2**63 .. 2**64-1 ("Overflow when unpacking long long")
    "seed too large": (_with("seeds", [1, 10**23]), "seeds/1: 100000000000000000000000 is greater than the maximum of",
                       "9223372036854775807"),
    "seed too small": (_with("seeds", [-(2**63) - 1]), "seeds/0: -9223372036854775809 is less than the minimum", ""),
    "variant seed too large": (_with("variants/deep_bn/seeds", [2**64]), "variants/deep_bn/seeds/0: ", "maximum"),
    "too many bins": (_with("stats/bins", 1000000), "stats/bins: 1000000 is greater than the maximum of 1000", ""),
    "too many samples": (_with("samples", 10**7), "samples: 10000000 is greater than the maximum of 1000", ""),
    "too many snapshots": (_with("stats/snapshot_steps", list(range(1000))), "stats/snapshot_steps: ", "too long"),
    "sha256 read as a number": (_with("names_sha256", 0), "names_sha256: 0 is not allowed; expected a string",
                                "write --config 'names_sha256=!!str …' (or set it in a config file)"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_the_key_and_what_is_allowed(case, names_path):
    change, says, allowed = BAD_CONFIGS[case]
    config = tiny_config(names_path)
    config["variants"] = copy.deepcopy(config["variants"])
    change(config)
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert says in str(e.value) and allowed in str(e.value), str(e.value)


def test_good_config_passes(names_path):
    config = tiny_config(names_path)
    validate(config)
    assert apply_defaults(config)["threads"] == 1


def test_workflow_refuses_a_bad_config_before_any_job(names_path, tmp_path):
    config = tiny_config(names_path, max_steps=0, seeds=[1.5], learning_rate=0.1)
    config["variants"]["fix_tanh"] = dict(FIX_TANH, activation="swish")
    configfile = write_config(tmp_path, config)
    for args in ((), ("--dry-run",)):
        proc = snakemake(tmp_path, configfile, *args, check=False)
        out = output_of(proc)
        assert proc.returncode != 0
        for says in ("invalid config:", "unknown key(s) 'learning_rate'", "max_steps: 0 is less than the minimum of 1",
                     "seeds/0: 1.5 is not allowed; expected an integer",
                     "variants/fix_tanh/activation: 'swish' is not one of ['tanh', 'relu', 'gelu']"):
            assert says in out, out[-3000:]
        assert "Job stats" not in out and "Traceback" not in out
    for directory in ("data", "logs", "results", "report", "benchmarks"):
        assert not (tmp_path / directory).exists(), directory


def test_a_sha256_read_as_a_number_says_how_to_keep_it_a_string(names_path, tmp_path):
    configfile = write_config(tmp_path, tiny_config(names_path))
    proc = snakemake(tmp_path, configfile, "--dry-run", "--config", "names_sha256=" + "0" * 64, check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    assert ("names_sha256: 0 is not allowed; expected a string; Snakemake reads a --config value of digits as a "
            "number, quoted or not: write --config 'names_sha256=!!str …' (or set it in a config file)") in out, out
    # ... and written so, it is a string (here the wrong checksum, so the download would stop on it)
    proc = snakemake(tmp_path, configfile, "--dry-run", "--config", "names_sha256=!!str " + "0" * 64, check=False)
    assert proc.returncode == 0, output_of(proc)[-2000:]
