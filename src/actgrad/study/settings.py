"""A study's settings: validation against the schema, defaults, and each variant's full settings.

A variant in ``config.yaml`` only says what differs from its model's defaults; the
functions here fill in the rest, so every stage sees the same complete settings.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")

# What a variant gets for every key it leaves out, per model. Both are the lecture's.
MODEL_DEFAULTS = {
    "mlp": {
        "n_embd": 10,
        "n_hidden": 200,
        "activation": "tanh",
        "batchnorm": False,
        "hidden_bias": "added",
        "init": {"C": 1.0, "W1": 1.0, "b1": 1.0, "W2": 1.0, "b2": 1.0},
        "gain": 5 / 3,
        "lr_schedule": [{"from_step": 0, "lr": 0.1}, {"from_step": 100000, "lr": 0.01}],
    },
    "deep": {
        "n_embd": 10,
        "n_hidden": 100,
        "n_layers": 5,
        "activation": "tanh",
        "batchnorm": True,
        "gain": 5 / 3,
        "last_layer_scale": 0.1,
        "weight_init": "gaussian",
        "lr_schedule": [{"from_step": 0, "lr": 0.1}, {"from_step": 150000, "lr": 0.01}],
    },
}


class ConfigError(ValueError):
    """An invalid configuration, with a message that names the key and what is allowed."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _is_integer(checker, instance) -> bool:
    # JSON Schema counts 3.0 as an integer; a seed or a step count written 3.0 is a typo here.
    return isinstance(instance, int) and not isinstance(instance, bool)


_TYPE_CHECKER = jsonschema.Draft7Validator.TYPE_CHECKER.redefine("integer", _is_integer)
_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, type_checker=_TYPE_CHECKER)
_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping of keys"}


def did_you_mean(name, options) -> str:
    """" (did you mean 'x'?)" for the option closest to a misspelt ``name``, or "" where none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys(where: str, unknown, allowed, note: str = "") -> ConfigError:
    """The one message for keys a mapping does not take: each with the closest allowed key, then the allowed ones."""
    hints = [f"did you mean {close[0]!r} for {key!r}?" for key in unknown
             if (close := difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1))]
    hint = f" ({'; '.join(hints)})" if hints else ""
    return ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}{hint}; "
                       f"allowed keys: {', '.join(sorted(allowed))}{note}")


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        return str(unknown_keys(where, sorted(k for k in error.instance if k not in allowed), allowed))
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        message = (f"{where}: {error.instance!r} is not allowed; expected "
                   f"{' or '.join(_TYPE_NAMES.get(t, t) for t in expected)}")
        number = isinstance(error.instance, (int, float)) and not isinstance(error.instance, bool)
        if expected == ["string"] and number and "/" not in where:
            # `--config names_sha256=000...` arrives as a number: Snakemake strips quotes, then tries int() and
            # float() before YAML; only YAML's explicit tag keeps it a string.
            message += (f"; Snakemake reads a --config value of digits as a number, quoted or not: write "
                        f"--config '{where}=!!str …' (or set it in a config file)")
        return message
    if error.validator in ("minItems", "minProperties") and not error.instance:
        return f"{where}: is empty; give at least {error.validator_value}"
    if error.validator == "pattern" and error.schema.get("description"):
        return f"{where}: {error.instance!r} is not allowed: {error.schema['description']}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator in ("oneOf", "anyOf"):
        options = []
        for sub in error.validator_value:
            if "enum" in sub:
                options.append(" or ".join(repr(v) for v in sub["enum"]))
            elif "type" in sub:
                options.append(f"a {sub['type']}" + (f" > {sub['exclusiveMinimum']}" if "exclusiveMinimum" in sub
                                                      else ""))
        return f"{where}: {error.instance!r} is not allowed; expected {' or '.join(options)}"
    return f"{where}: {error.message}"


def validate(config: dict, schema: dict | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem, each naming its key."""
    schema = schema or load_schema()
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in errors))
    for name, variant in config["variants"].items():
        model = variant.get("model", "mlp")
        if model == "mlp" and "n_layers" in variant:
            raise ConfigError(f"variants/{name}/n_layers: only a 'deep' model has n_layers")
        if model == "deep" and ("init" in variant or "hidden_bias" in variant):
            key = "init" if "init" in variant else "hidden_bias"
            raise ConfigError(f"variants/{name}/{key}: only an 'mlp' model has {key}; "
                              "a 'deep' model is set with gain and last_layer_scale")
        if model == "mlp" and "weight_init" in variant:
            raise ConfigError(f"variants/{name}/weight_init: only a 'deep' model has weight_init; "
                              "an 'mlp' draws W1 or W2 orthogonal with init: {W1: orthogonal}")
        if "norm" in variant and "batchnorm" in variant and variant["batchnorm"] != (variant["norm"] == "batchnorm"):
            raise ConfigError(f"variants/{name}/batchnorm: batchnorm: {str(variant['batchnorm']).lower()} "
                              f"contradicts norm: {variant['norm']}; give only norm")
        schedule = variant.get("lr_schedule")
        if schedule and schedule[0]["from_step"] != 0:
            raise ConfigError(f"variants/{name}/lr_schedule: the first entry must start at from_step 0")
        for i, (before, entry) in enumerate(zip(schedule or [], (schedule or [])[1:]), start=1):
            if entry["from_step"] <= before["from_step"]:
                raise ConfigError(f"variants/{name}/lr_schedule/{i}/from_step: {entry['from_step']} does not come "
                                  f"after the entry before it (from_step {before['from_step']}); list the entries "
                                  "in order of from_step, each at a later step")


def apply_defaults(config: dict, schema: dict | None = None) -> dict:
    """Fill in, in place, every key the schema gives a default for: the study's keys and sections, each
    variant's keys and each of its references' keys.

    This is the one place the schema's defaults are applied; everything downstream reads the completed
    config. A variant's network settings default per model, in :data:`MODEL_DEFAULTS` (see :func:`variant_spec`).
    Sweeps, where a config has them, are expanded into variants before this, so that their points are completed too.
    """
    schema = schema or load_schema()
    _fill(config, schema, sections=True)
    for variant in config["variants"].values():
        _fill(variant, schema["definitions"]["variant"])
        for reference in variant.get("references") or []:
            _fill(reference, schema["definitions"]["reference"])
    return config


def study_defaults() -> dict:
    """The schema's defaults of the study-wide keys and sections, for code that runs without a config
    (the benchmark's statistics plan)."""
    return apply_defaults({"variants": {}})


def _fill(node: dict, schema: dict, sections: bool = False) -> None:
    """The defaults of ``schema``'s properties into ``node``; with ``sections``, an absent section of the study
    (stats, sensitivity, resources) is created and completed too."""
    for key, prop in schema.get("properties", {}).items():
        if key not in node:
            if "default" in prop:
                node[key] = copy.deepcopy(prop["default"])
            elif sections and prop.get("type") == "object" and "properties" in prop:
                node[key] = {}
        if sections and isinstance(node.get(key), dict) and "properties" in prop:
            _fill(node[key], prop, sections=True)


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, recursively for mappings."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_spec(config: dict, name: str) -> dict:
    """The complete settings of one variant: its model's defaults, overlaid by what it says, and the
    study-wide settings it does not override. ``config`` is a completed one (:func:`apply_defaults`)."""
    variant = config["variants"][name]
    model = variant["model"]
    spec = merge(MODEL_DEFAULTS[model], {k: v for k, v in variant.items() if k not in ("references", "description",
                                                                                        "sweep")})
    # One answer for downstream code: norm, and batchnorm true exactly when norm is batchnorm.
    spec["norm"] = variant.get("norm") or ("batchnorm" if spec["batchnorm"] else "none")
    spec["batchnorm"] = spec["norm"] == "batchnorm"
    spec["name"] = name
    spec["max_steps"] = int(variant.get("max_steps", config["max_steps"]))
    spec["batch_size"] = int(variant.get("batch_size", config["batch_size"]))
    spec["seeds"] = [int(s) for s in variant.get("seeds", config["seeds"])]
    spec["sensitivity_twin"] = bool(variant.get("sensitivity_twin", config["sensitivity"]["enabled"]))
    spec["w1_perturbation"] = float(config["sensitivity"]["w1_perturbation"])
    return spec


def linear_shapes(spec: dict, block_size: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each of the network's Linear layers, input to logits."""
    if spec["model"] == "mlp":
        dims = [spec["n_embd"] * block_size, spec["n_hidden"], 27]
    else:
        dims = [spec["n_embd"] * block_size] + [spec["n_hidden"]] * spec["n_layers"] + [27]
    return list(zip(dims[:-1], dims[1:]))


def matmul_flops_per_step(spec: dict, block_size: int, batch_size: int = 32) -> int:
    """Forward + backward matmul FLOPs of one model-step: 3 x (2 * batch * sum of fan_in * fan_out).

    The backward pass does two matmuls per forward one (input gradient, weight gradient);
    elementwise work, the embedding lookup and BatchNorm are left out.
    """
    return 3 * 2 * batch_size * sum(a * b for a, b in linear_shapes(spec, block_size))
