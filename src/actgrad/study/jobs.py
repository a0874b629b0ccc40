"""The study's training jobs: which variants train together, and in which order the jobs start.

The workflow asks :func:`training_jobs` for its jobs and :func:`training_cost` for their priority.
"""

from __future__ import annotations

import json

from actgrad.study.settings import matmul_flops_per_step, variant_spec

# What one engine call can batch: models that differ only in their drawn values. A variant's other settings
# (architecture, steps, batch size, learning-rate schedule, anything added later) must match to share a job.
BATCHABLE_KEYS = ("name", "seeds", "init", "gain", "last_layer_scale", "weight_init", "sensitivity_twin",
                  "w1_perturbation")


def batch_key(spec: dict) -> str:
    """What variants must share to train in one engine call: their spec less :data:`BATCHABLE_KEYS`."""
    return json.dumps({k: v for k, v in spec.items() if k not in BATCHABLE_KEYS}, sort_keys=True, default=str)


TRAINING_JOB_MODES = ("variant", "architecture", "model")


def training_jobs(config: dict, mode: str | None = None) -> dict[str, list[str]]:
    """The study's training jobs: job name -> the variants it trains, in the config's order.

    ``mode`` (``training_jobs`` in the config): ``variant`` gives every variant a job of its own, named after
    it; ``architecture`` puts the variants that :func:`batch_key` says can train together into one job;
    ``model`` puts every variant of one model (``mlp``, ``deep``) into one job, which trains them group by group
    (a group being what ``architecture`` would make a job). A job of several is named after its first variant
    (alone, it is that variant's job).
    """
    mode = mode or config["training_jobs"]
    names = list(config["variants"])
    if mode == "variant":
        return {name: [name] for name in names}
    if mode not in TRAINING_JOB_MODES:
        raise ValueError(f"training_jobs: {mode!r} unknown; it is one of {', '.join(map(repr, TRAINING_JOB_MODES))}")
    key = batch_key if mode == "architecture" else (lambda spec: spec["model"])
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key(variant_spec(config, name)), []).append(name)
    return {members[0] if len(members) == 1 else f"{members[0]}_and_{len(members) - 1}": members
            for members in groups.values()}


def training_cost(spec: dict, block_size: int) -> float:
    """A variant's training work in GFLOP, for ordering jobs: longest first leaves no lone job at the end.

    A normalisation's elementwise work is counted as half the matmuls again, an upper bound (measured
    at 5 models, one core, with the C kernels: a deep BatchNorm or LayerNorm step takes about 1.16x a
    plain one, a shallow BatchNorm step 1.2x; 1.3x and 1.25x before the engine's later kernels).
    """
    models = len(spec["seeds"]) * (2 if spec["sensitivity_twin"] else 1)
    flops = matmul_flops_per_step(spec, block_size, spec["batch_size"]) * spec["max_steps"] * models
    return flops * (1.5 if spec["norm"] != "none" else 1.0) / 1e9
