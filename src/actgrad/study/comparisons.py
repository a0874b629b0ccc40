"""Which variants a study compares: the config's ``comparisons`` section, or the defaults, as data.

Each comparison is ``after`` against ``before``, in a family over which Holm's correction runs
(:mod:`actgrad.results.significance` does the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from actgrad.study.settings import ConfigError, did_you_mean, load_schema, variant_spec
from actgrad.study.sweeps import grid_point, sweep_groups

# The section's defaults are the schema's.
_SECTION = load_schema()["properties"]["comparisons"]["properties"]
DEFAULT_METRIC = _SECTION["metric"]["default"]
DEFAULT_ALPHA = _SECTION["alpha"]["default"]
DEFAULT_POWER = _SECTION["power"]["default"]


@dataclass(frozen=True)
class Comparison:
    """``after`` against ``before`` (the baseline); ``family`` is the set Holm's correction runs over."""

    family: str
    before: str
    after: str


def consecutive_comparisons(family: str, ordered_names: Sequence[str]) -> list[Comparison]:
    """Each variant against the one before it: the lecture's steps, or one line of a sweep's grid."""
    return [Comparison(family, a, b) for a, b in zip(ordered_names[:-1], ordered_names[1:])]


def grid_lines(sweep: str, points: Mapping[tuple[int, ...], str], axes: Sequence[str]) -> dict[str, list[list[str]]]:
    """The hook for sweeps: a grid's lines, one family per swept key, for ``grids`` of :func:`resolve_comparisons`.

    ``points`` maps each grid point's value indices (one per key of ``axes``, in the grid's order) to
    its variant name. Along each key, every line (the other keys held fixed) is ordered by that key's
    values; family ``<sweep>_<key>`` holds all lines along that key - one question, one Holm correction.
    """
    families = {}
    for k, axis in enumerate(axes):
        lines: dict[tuple, list[tuple[int, str]]] = {}
        for index, name in points.items():
            lines.setdefault(index[:k] + index[k + 1:], []).append((index[k], name))
        ordered = [[name for _, name in sorted(line)] for _, line in sorted(lines.items())]
        families[f"{sweep}_{axis}"] = [line for line in ordered if len(line) > 1]
    return {family: lines for family, lines in families.items() if lines}


def baseline_comparisons(family: str, baseline: str, others: Iterable[str]) -> list[Comparison]:
    """Each of ``others`` against ``baseline``."""
    return [Comparison(family, baseline, name) for name in others]


def comparison_settings(config: dict) -> dict:
    """The section's metric, alpha and power, with their defaults where the config was not completed."""
    section = config.get("comparisons") or {}
    return {"metric": section.get("metric", DEFAULT_METRIC), "alpha": float(section.get("alpha", DEFAULT_ALPHA)),
            "power": float(section.get("power", DEFAULT_POWER))}


def _unknown_variant(config: dict, key: str, name) -> ConfigError:
    names = list(config["variants"])
    hint = did_you_mean(name, names) or f" (variants: {', '.join(names)})"
    return ConfigError(f"{key}: {name!r} is not a variant{hint}")


def _family_comparisons(config: dict, family: str, spec: dict) -> list[tuple[str, Comparison]]:
    """A family's comparisons, each with the config key it came from (for error messages)."""
    key = f"comparisons/families/{family}"
    forms = [form for form in ("consecutive", "baseline", "pairs") if form in spec]
    if len(forms) != 1 or ("against" in spec and forms != ["baseline"]):
        raise ConfigError(f"{key}: give exactly one of 'consecutive', 'baseline' (with optional 'against') or "
                          f"'pairs'; got {', '.join(repr(k) for k in spec) or 'nothing'}")
    variants = config["variants"]
    if "consecutive" in spec:
        names = spec["consecutive"]
        for i, name in enumerate(names):
            if name not in variants:
                raise _unknown_variant(config, f"{key}/consecutive/{i}", name)
        return [(f"{key}/consecutive/{i + 1}", c) for i, c in enumerate(consecutive_comparisons(family, names))]
    if "baseline" in spec:
        baseline = spec["baseline"]
        if baseline not in variants:
            raise _unknown_variant(config, f"{key}/baseline", baseline)
        if "against" in spec:
            others = spec["against"]
            for i, name in enumerate(others):
                if name not in variants:
                    raise _unknown_variant(config, f"{key}/against/{i}", name)
        else:
            model = variant_spec(config, baseline)["model"]
            others = [n for n in variants if n != baseline and variant_spec(config, n)["model"] == model]
        return [(f"{key}/against/{i}", c) for i, c in enumerate(baseline_comparisons(family, baseline, others))]
    out = []
    for i, (before, after) in enumerate(spec["pairs"]):
        for j, name in enumerate((before, after)):
            if name not in variants:
                raise _unknown_variant(config, f"{key}/pairs/{i}/{j}", name)
        out.append((f"{key}/pairs/{i}", Comparison(family, before, after)))
    return out


def _check_family(keyed: list[tuple[str, Comparison]]) -> None:
    seen: dict[frozenset, str] = {}
    for key, c in keyed:
        if c.before == c.after:
            raise ConfigError(f"{key}: compares {c.before!r} with itself")
        pair = frozenset((c.before, c.after))
        if pair in seen:
            # Counted twice, it would also count twice in the family's Holm correction.
            raise ConfigError(f"{key}: compares {c.before!r} and {c.after!r} again (already at {seen[pair]})")
        seen[pair] = key


def _is_gain(value: float, gain: float) -> bool:
    return math.isclose(float(value), gain, rel_tol=1e-6)


def _settings_without(spec: dict, *keys: str) -> tuple:
    # What makes two variants comparable: every setting except the one compared (and the run bookkeeping).
    skip = {"name", "seeds", "sensitivity_twin", "w1_perturbation", *keys}
    return tuple(sorted((k, repr(v)) for k, v in spec.items() if k not in skip))


def default_comparisons(config: dict, names: Sequence[str] | None = None) -> list[Comparison]:
    """The comparisons when the config names none (``names``: the variants to draw them from, default all).

    - ``mlp_consecutive``: the shallow ``mlp`` variants, each against the one before it in config
      order - the lecture's steps (original, fix softmax, fix tanh, Kaiming, BatchNorm).
    - ``gain_vs_<baseline>``: each deep variant against the deep variant with gain 5/3 whose other
      settings (BatchNorm included) are the same; one family per such baseline.
    - ``batchnorm_vs_none``: each deep variant with BatchNorm against the one without, all else equal.
    """
    names = list(config["variants"]) if names is None else list(names)
    specs = {name: variant_spec(config, name) for name in names}
    comparisons = consecutive_comparisons("mlp_consecutive", [n for n in names if specs[n]["model"] == "mlp"])
    deep = [n for n in names if specs[n]["model"] == "deep"]
    groups: dict[tuple, list[str]] = {}
    for name in deep:
        groups.setdefault(_settings_without(specs[name], "gain"), []).append(name)
    for members in groups.values():
        baselines = [n for n in members if _is_gain(specs[n]["gain"], 5 / 3)]
        if baselines:
            others = [n for n in members if not _is_gain(specs[n]["gain"], 5 / 3)]
            comparisons += baseline_comparisons(f"gain_vs_{baselines[0]}", baselines[0], others)
    # `norm` says the same as `batchnorm` where both exist (norm: batchnorm | none).
    without_bn = {_settings_without(specs[n], "batchnorm", "norm"): n for n in reversed(deep)
                  if not specs[n]["batchnorm"] and specs[n].get("norm", "none") == "none"}
    for name in deep:
        partner = without_bn.get(_settings_without(specs[name], "batchnorm", "norm"))
        if specs[name]["batchnorm"] and partner is not None:
            comparisons.append(Comparison("batchnorm_vs_none", partner, name))
    return comparisons


def resolve_comparisons(config: dict, grids: Mapping[str, Sequence[Sequence[str]]] | None = None) -> list[Comparison]:
    """The comparisons of a resolved config, in order; raises :class:`ConfigError` naming a bad key.

    ``comparisons.families`` in the config, when given, are all the comparisons. Without it the
    defaults of :func:`default_comparisons` apply, and ``grids`` (family name -> lines of variant names,
    each ordered along a sweep's key; see :func:`grid_lines`) add one family each, every line compared
    consecutively; the variants in a grid are then compared only along it.
    """
    grids = {family: [list(line) for line in lines] for family, lines in (grids or {}).items()}
    for family, lines in grids.items():
        for i, line in enumerate(lines):
            for j, name in enumerate(line):
                if name not in config["variants"]:
                    raise _unknown_variant(config, f"grid {family}/{i}/{j}", name)
    families = (config.get("comparisons") or {}).get("families")
    keyed: list[tuple[str, Comparison]] = []
    if families:
        for family, spec in families.items():
            found = _family_comparisons(config, family, spec)
            _check_family(found)
            keyed += found
        return [c for _, c in keyed]
    in_grid = {name for lines in grids.values() for line in lines for name in line}
    comparisons = default_comparisons(config, [n for n in config["variants"] if n not in in_grid])
    for family, lines in grids.items():
        for line in lines:
            comparisons += consecutive_comparisons(family, line)
    return comparisons


def check_comparisons(config: dict) -> None:
    """Raise :class:`ConfigError` if the config's comparisons name a variant that does not exist (or repeat one)."""
    resolve_comparisons(config)


def sweep_grids(config: dict) -> dict[str, list[list[str]]]:
    """The sweeps' grid lines (family name -> lines of variant names), for :func:`resolve_comparisons`.

    A generated variant records its sweep and its point; each key's values are indexed in the order
    they first appear, which is the grid's order (the expansion walks the grid with the last key fastest).
    """
    groups = sweep_groups(config)
    grids: dict[str, list[list[str]]] = {}
    for sweep, names in groups.items():
        if sweep is None:
            continue
        points = {name: grid_point(config, name) for name in names}  # a bundle is one axis, by its labels
        axes = list(points[names[0]])
        values: dict[str, list] = {axis: [] for axis in axes}
        for point in points.values():
            for axis in axes:
                # a labelled value may be a list or a mapping: compared by equality, not hashed
                if not any(type(v) is type(point[axis]) and v == point[axis] for v in values[axis]):
                    values[axis].append(point[axis])
        index = {tuple(next(i for i, v in enumerate(values[axis]) if type(v) is type(point[axis])
                            and v == point[axis]) for axis in axes): name for name, point in points.items()}
        grids.update(grid_lines(sweep, index, axes))
    return grids
