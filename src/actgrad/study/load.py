"""Loading a study: a config file (with its ``base:`` chain) made into the completed config every stage reads.

This sits above :mod:`.settings`, :mod:`.sweeps` and :mod:`.comparisons`: it expands the sweeps, validates once,
fills in the defaults and checks the comparisons. Nothing below imports it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from actgrad.study.comparisons import check_comparisons
from actgrad.study.jobs import study_cost
from actgrad.study.settings import ConfigError, apply_defaults, load_schema, merge, validate
from actgrad.study.sweeps import expand_sweeps


def read_yaml(path: str | Path) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(config).__name__}")
    return config


def resolve_base(config: dict, origin: str | Path | None = None, seen: tuple = ()) -> dict:
    """A config with ``base: other.yaml`` is that file with this one's keys merged on top.

    ``base`` is looked up beside the file that names it (``origin``, its folder), then
    from the working directory.
    """
    if "base" not in config:
        return config
    base_path = Path(config["base"])
    if origin is not None and not base_path.is_absolute() and (Path(origin) / base_path).exists():
        base_path = Path(origin) / base_path
    key = str(base_path.resolve())
    if key in seen:
        raise ConfigError(f"base: {config['base']} includes itself")
    base = resolve_base(read_yaml(base_path), base_path.parent, seen + (key,))
    return merge(base, {k: v for k, v in config.items() if k != "base"})


def load(path: str | Path, overrides: dict | None = None) -> dict:
    """Read, validate and complete a config file."""
    config = resolve_base(read_yaml(path), Path(path).parent)
    if overrides:
        config = merge(config, overrides)
    return complete(config)


def complete(config: dict) -> dict:
    """A config as written (``base:`` resolved) made into the one every stage reads: sweeps expanded
    into variants, validated, defaults filled in, comparisons checked against the variants."""
    config = expand_sweeps(config)
    schema = load_schema()
    validate(config, schema)
    apply_defaults(config, schema)
    check_size(config)
    check_comparisons(config)
    return config


def describe_size(cost: dict) -> str:
    hours = cost["cpu_hours"]
    return (f"{cost['variants']:,} variant(s), {cost['runs']:,} training run(s), "
            f"{f'about {hours:,.2f}' if hours >= 0.01 else 'under 0.01'} CPU-hours of training (estimated)")


def check_size(config: dict) -> dict:
    """Refuse a study above its ``limits`` (runs, estimated CPU-hours), saying how large it is and which key
    raises the bound; return its size (:func:`actgrad.study.jobs.study_cost`)."""
    cost = study_cost(config)
    limits = config["limits"]
    over = {key: f"limits.{key} ({limits[key]:,})" for key, size in (("runs", cost["runs"]),
                                                                      ("cpu_hours", cost["cpu_hours"]))
            if size > limits[key]}
    if over:
        raise ConfigError(f"the study asks for {describe_size(cost)}, above {' and '.join(over.values())}; "
                          f"if you mean it, raise {' and '.join(f'limits.{key}' for key in over)} "
                          "(config/README.md: limits.runs, limits.cpu_hours)")
    return cost


def check_jobs(config: dict, jobs: dict[str, list[str]], sizes: dict[str, int] | None) -> None:
    """The checks each training job makes before it trains (:func:`actgrad.training.memory.check_job`: a
    minibatch the training split can fill, the memory estimate against ``resources.train_mem_mb``), made for
    every job while the workflow plans, so that a job that would refuse stops the workflow before Snakemake
    deletes anything. ``sizes``: the examples per split (:func:`actgrad.data.planned_split_sizes`); without
    them (names not known yet) the jobs check for themselves. The message names the job as its own would."""
    if sizes is None:
        return
    from actgrad.training.memory import check_job

    n_train, n_examples = sizes["train"], sum(sizes.values())
    for job, names in jobs.items():
        try:
            check_job(config, names, n_train, config["block_size"], n_examples)
        except ConfigError as e:
            # as the job's own line names it: train[<variant>] for a variant's job of the wildcard rule
            step = f"train[{names[0]}]" if len(names) == 1 else f"train_{job}"
            raise ConfigError(f"error: {step}: {e} (refused while planning: nothing was run or deleted)") from None
