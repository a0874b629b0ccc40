"""Sweeps: a base variant times a grid of values, expanded into ordinary variants.

A config's ``sweeps:`` section names each sweep; a sweep starts from a listed variant
(``variant:``), a mapping of variant keys (``base:``) or both, and ``grid:`` gives a list of
values per variant key (``init.W1`` for a nested one). :func:`expand_sweeps` turns every point
of the grid into a variant of its own, after the listed ones, so every later stage sees plain
variants. A generated variant's ``sweep`` key records where it came from::

    sweep: {name: gain, point: {gain: 0.5, batchnorm: true}}

Names are ``SWEEP__PART__PART``, one part per grid key in the grid's order: ``gain0p5``
(``p`` for the decimal point, ``m`` for a minus sign, 4 significant digits), ``bn`` /
``nobn`` for a boolean, the value itself for a string, or the label of a labelled value
(``lr_schedule: {fast: [...], slow: [...]}``). A name depends only on the sweep's name and the
point's own values, so adding values to a grid only adds variants: the others keep their names
and settings, and Snakemake trains only the new points.

A grid key that is no variant key is a *bundle*: labelled sets of variant keys that change
together, one grid value each, named by the label. Batch sizes at a fixed number of examples seen::

    grid: {schedule: {batch4: {batch_size: 4, max_steps: 24000}, batch32: {batch_size: 32, max_steps: 3000}}}

A bundle's point records the keys it sets (``{batch_size: 4, max_steps: 24000}``);
:func:`grid_point` gives a point's coordinates in its grid, the bundle's label among them.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re

from actgrad.study.settings import ConfigError, apply_defaults, did_you_mean, load_schema, merge, unknown_keys, validate

# Variant keys that are not settings of the network or the run, so no grid sweeps them; a
# sweep's seeds are the sweep's own ``seeds``.
_NOT_SWEPT = ("description", "references", "sweep", "seeds")

# How a key is written in a generated name; a key not listed is written as itself.
NAME_LABELS = {
    "gain": "gain", "batchnorm": "bn", "sensitivity_twin": "twin", "n_layers": "layers", "n_hidden": "width",
    "n_embd": "embd", "last_layer_scale": "last", "max_steps": "steps", "batch_size": "batch", "lr_schedule": "lr",
    "init.C": "C", "init.W1": "W1", "init.b1": "b1", "init.W2": "W2", "init.b2": "b2",
}
# A part of a name: letters and digits, words joined by single underscores (a double one
# separates the parts).
_PART = re.compile(r"^[A-Za-z0-9]+(_[A-Za-z0-9]+)*$")


def sweepable_keys(schema: dict | None = None) -> list[str]:
    """The keys a grid may sweep, as the schema's grid lists them."""
    schema = schema or load_schema()
    return list(schema["properties"]["sweeps"]["additionalProperties"]["properties"]["grid"]["properties"])


@functools.cache
def _sweepable() -> frozenset[str]:
    return frozenset(sweepable_keys())


def is_bundle(key: str) -> bool:
    """Whether grid key ``key`` is a bundle (no variant key) rather than a variant key."""
    return key not in _sweepable()


def _check_bundles(name: str, grid: dict) -> None:
    """The grid keys that are no variant keys, as bundles: a mapping of labels, each a mapping of variant keys,
    every label setting the same keys, no key set by two grid keys."""
    allowed = sorted(_sweepable())
    bundles = [key for key in grid if is_bundle(key)]
    malformed = [key for key in bundles if not (isinstance(grid[key], dict) and grid[key]
                                                and all(isinstance(v, dict) for v in grid[key].values()))]
    if malformed:
        raise unknown_keys(f"sweeps/{name}/grid", malformed, allowed,
                            "; or a bundle of keys set together: NAME: {label: {key: value, ...}, ...}")
    owner = {key: key for key in grid if not is_bundle(key)}
    for bundle in bundles:
        labels = grid[bundle]
        first = next(iter(labels))
        for label, keys in labels.items():
            where = f"sweeps/{name}/grid/{bundle}/{label}"
            if not isinstance(label, str) or not _PART.match(label):
                raise ConfigError(f"{where}: a bundle's label is letters and digits, words joined by single "
                                  "underscores (it names the variants)")
            if not keys:
                raise ConfigError(f"{where}: is empty; give at least 1 key")
            unknown = [k for k in keys if k not in _sweepable()]
            if unknown:
                raise unknown_keys(where, unknown, allowed)
            if set(keys) != set(labels[first]):
                raise ConfigError(f"{where}: sets {', '.join(sorted(keys))}, but {first} sets "
                                  f"{', '.join(sorted(labels[first]))}: every label of a bundle sets the same keys")
        for key in labels[first]:
            if key in owner:
                raise ConfigError(f"sweeps/{name}/grid/{bundle}: sets {key!r}, which grid/{owner[key]} sets too")
            owner[key] = bundle


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = str(value) if isinstance(value, int) else f"{value:.4g}"
    return text.replace("e+", "e").replace("-", "m").replace(".", "p")


def _value_part(key: str, value) -> str:
    """How one value of ``key`` is written in a generated name."""
    label = NAME_LABELS.get(key, key.replace(".", "_"))
    if isinstance(value, bool):
        return label if value else f"no{label}"
    if isinstance(value, (int, float)):
        # W1_0p2 rather than W10p2, where the key's label ends in a digit.
        return f"{label}{'_' if label[-1].isdigit() else ''}{_number_text(value)}"
    if isinstance(value, str) and _PART.match(value):
        return value
    raise ConfigError(f"{value!r} cannot be written in a variant name; give it a label: "
                      f"{key}: {{label: {value!r}}} (letters, digits and single underscores)")


def _grid_values(sweep: str, key: str, values) -> list[tuple[str, object]]:
    """``(name part, value)`` of each value of one grid key, in the grid's order."""
    where = f"sweeps/{sweep}/grid/{key}"
    if isinstance(values, dict):  # labelled values, or a bundle's labelled keys: the label is the name part
        return list(values.items())
    parts = []
    for value in values:
        try:
            parts.append((_value_part(key, value), value))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    seen = {}
    for part, value in parts:
        if part in seen:
            raise ConfigError(f"{where}: {seen[part]!r} and {value!r} are both written {part!r} in variant names "
                              "(4 significant digits); make them differ there, or label them: "
                              f"{key}: {{label: value, ...}}")
        seen[part] = value
    return parts


def _nested(key: str, value) -> dict:
    """``init.W1`` -> ``{"init": {"W1": value}}``."""
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else copy.deepcopy(value)}


def _check_structure(sweeps: dict, schema: dict) -> None:
    """The ``sweeps`` section against its schema, before anything is generated from it."""
    section = {"type": "object", "properties": {"sweeps": schema["properties"]["sweeps"]},
               "definitions": schema["definitions"]}
    if isinstance(sweeps, dict):
        for name, sweep in sweeps.items():
            if isinstance(sweep, dict) and isinstance(sweep.get("grid"), dict):
                _check_bundles(name, sweep["grid"])
    try:
        validate({"sweeps": sweeps, "variants": {}}, section)
    except ConfigError as e:
        if "/grid/" in str(e) and "expected a number or a string or true or false" in str(e):
            raise ConfigError(f"{e}\n  (a list or a mapping as a value needs a label, which names its variants: "
                              "lr_schedule: {fast: [...], slow: [...]})") from None
        raise


def _start(name: str, sweep: dict, listed: dict) -> dict:
    """The settings every point of a sweep starts from."""
    start = {}
    if "variant" in sweep:
        source = sweep["variant"]
        if source not in listed:
            raise ConfigError(f"sweeps/{name}/variant: {source!r} is not a listed variant"
                              f"{did_you_mean(source, listed)}; "
                              f"listed: {', '.join(listed) or 'none'}")
        # Its references describe its own settings, which a point changes.
        start = {k: v for k, v in listed[source].items() if k not in ("description", "references")}
    start = merge(start, sweep.get("base", {}))
    if "sweep" in start:
        raise ConfigError(f"sweeps/{name}/base/sweep: set by the expansion, not written by hand")
    return start


def format_value(value) -> str:
    """A swept value as the names and descriptions show it: true/false, floats to 4 significant digits."""
    if isinstance(value, dict):  # a bundle's keys
        return ", ".join(f"{key} {format_value(v)}" for key, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _point_description(sweep_name: str, sweep: dict, combination) -> str:
    """One sentence for the report: the sweep's description and the point's values (or labels)."""
    values = ", ".join(
        f"{key} {part} ({format_value(value)})" if is_bundle(key) else
        f"{key} {part if isinstance(value, (dict, list)) else format_value(value)}"
        for key, (part, value) in zip(sweep["grid"], combination))
    lead = sweep.get("description", f"Sweep {sweep_name}").rstrip(".")
    return f"{lead}: {values}."


def generate(name: str, sweep: dict, listed: dict) -> dict:
    """The variants of one sweep, by name, in grid order (the last grid key varies fastest)."""
    start = _start(name, sweep, listed)
    keys = list(sweep["grid"])
    columns = [_grid_values(name, key, sweep["grid"][key]) for key in keys]
    variants = {}
    for combination in itertools.product(*columns):
        point = {}
        for key, (_, value) in zip(keys, combination):
            point.update(value if is_bundle(key) else {key: value})  # a bundle sets its keys
        variant = start
        for key, value in point.items():
            variant = merge(variant, _nested(key, value))
        if "seeds" in sweep:
            variant["seeds"] = list(sweep["seeds"])
        variant["description"] = _point_description(name, sweep, combination)
        variant["sweep"] = {"name": name, "point": copy.deepcopy(point)}
        variants["__".join([name] + [part for part, _ in combination])] = variant
    return variants


def _completed(variant: dict, schema: dict) -> dict:
    """A variant with the schema's defaults filled in, to compare an expanded config's with a new point."""
    return apply_defaults({"variants": {"v": copy.deepcopy(variant)}}, schema)["variants"]["v"]


def expand_sweeps(config: dict) -> dict:
    """A new config whose ``variants`` are the listed ones followed by every sweep's points.

    Expanding an expanded config changes nothing, even one completed by ``apply_defaults``, so a
    caller need not know whether it was.
    Raises :class:`ConfigError` naming the sweep and key for a misspelled or empty grid, an
    unknown ``variant``, a generated name that is already a listed variant's, or a point whose
    settings are invalid (every generated variant is validated like a listed one).
    """
    variants = config.get("variants") or {}
    sweeps = config.get("sweeps") or {}
    if not isinstance(variants, dict):
        if sweeps:
            raise ConfigError(f"variants: {variants!r} is not allowed; expected a mapping of keys (or none)")
        return copy.deepcopy(config)
    listed = {name: v for name, v in variants.items() if not (isinstance(v, dict) and "sweep" in v)}
    expanded = {name: v for name, v in variants.items() if name not in listed}
    out = copy.deepcopy(config)
    if not sweeps and not expanded:
        return out
    schema = load_schema()
    _check_structure(sweeps, schema)

    generated, origin = {}, {}
    for sweep_name, sweep in sweeps.items():
        for name, variant in generate(sweep_name, sweep, listed).items():
            if name in listed:
                raise ConfigError(f"sweeps/{sweep_name}: its point {variant['sweep']['point']} is named {name!r}, "
                                  f"which is a listed variant; rename that variant or the sweep")
            generated[name] = variant
            origin[name] = sweep_name
    for name, variant in expanded.items():
        if name not in generated or _completed(generated[name], schema) != _completed(variant, schema):
            raise ConfigError(f"variants/{name}/sweep: written by the expansion of sweeps:, not by hand; "
                              "remove the key (or the variant)")
        generated[name] = variant  # as it was: a completed config stays completed

    out["variants"] = {**copy.deepcopy(listed), **copy.deepcopy(generated)}
    try:
        validate(out, schema)
    except ConfigError as e:
        mentioned = [name for name in generated if f"variants/{name}/" in str(e)]
        notes = [f"({name} is the point {generated[name]['sweep']['point']} of sweeps/{origin[name]})"
                 for name in mentioned]
        raise ConfigError("\n  ".join([str(e)] + notes)) from None
    return out


def grid_point(config: dict, name: str) -> dict:
    """A generated variant's coordinates in its sweep's grid, by grid key: the point's value, or for a bundle
    the label whose keys the point has. Without its sweep in ``config``, the point itself."""
    record = config["variants"][name]["sweep"]
    point = record["point"]
    grid = ((config.get("sweeps") or {}).get(record["name"]) or {}).get("grid") or {}
    if not any(is_bundle(key) for key in grid):
        return dict(point)
    coordinates = {}
    for key, values in grid.items():
        if is_bundle(key):
            coordinates[key] = next(label for label, keys in values.items()
                                    if all(point.get(k) == v for k, v in keys.items()))
        else:
            coordinates[key] = point[key]
    return coordinates


def sweep_groups(config: dict) -> dict[str | None, list[str]]:
    """Variant names by the sweep that generated them (``None``: the listed ones), in config order."""
    groups: dict[str | None, list[str]] = {}
    for name, variant in config["variants"].items():
        groups.setdefault(variant.get("sweep", {}).get("name"), []).append(name)
    return groups
