"""The study's training jobs: which variants train together, and in which order the jobs start.

The workflow asks :func:`training_jobs` for its jobs, :func:`training_cost` for their priority and
:func:`study_cost` for the size of the whole study (which it prints, and bounds by ``limits``).
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


# What the estimate of a study's CPU time takes a core to do: the engine's matmul work per second at the
# pipeline's 5 models per job (docs/engine.md: 33-53 % of a 165 GFLOP/s sgemm peak; elementwise work and a
# normalisation's are in training_cost's count), and each job's start-up (config/README.md). Against the
# shipped studies' measured wall times on 2 cores (README): the default study 0.53 CPU-hours estimated, about
# 0.30 used; signal-propagation 0.22 against 0.15; normalisation (batches of 4 and 8, where the fixed cost of a
# step dominates) 0.07 against 0.16. A rough figure, meant for the order of magnitude.
GFLOP_PER_CPU_SECOND = 40.0
JOB_START_SECONDS = 1.5


def study_cost(config: dict) -> dict:
    """The study's training runs (seeds of every variant; twins not counted as runs) and an estimate of the CPU
    time they take, in hours (:data:`GFLOP_PER_CPU_SECOND`)."""
    specs = [variant_spec(config, name) for name in config["variants"]]
    gflop = sum(training_cost(spec, config["block_size"]) for spec in specs)
    seconds = gflop / GFLOP_PER_CPU_SECOND + JOB_START_SECONDS * len(training_jobs(config))
    return {"runs": sum(len(spec["seeds"]) for spec in specs), "variants": len(specs), "cpu_hours": seconds / 3600}
