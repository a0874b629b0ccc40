"""Checks a training job makes before any work: a minibatch the training split can fill, and memory.

:func:`estimate_training_memory_mb` adds up what a job holds at its peak from the config
alone: the interpreter with torch, the splits, the batched engine's workspace and minibatch
indices, the losses, the statistics and histograms the recorder keeps, and the whole-split
tensors of the evaluations. :func:`check_training_job` refuses, before the job trains, a batch
larger than the training split and a job whose estimate is above the memory it asks for
(``resources.train_mem_mb``), with the estimate and its largest part in the message.
:func:`check_job` makes both checks for a whole training job; the workflow makes them while it plans,
before Snakemake deletes any output (``workflow/rules/common.smk``), and the job again before it trains.
This module imports no torch: the workflow's planning loads it.
"""

from __future__ import annotations

from types import SimpleNamespace

from actgrad.study.jobs import batch_key
from actgrad.study.settings import ConfigError, variant_spec

MB = 1024 * 1024
VOCAB = 27

# Calibrated against the peak RSS (VmHWM) of real training jobs: `train_variants` alone in a fresh
# process, on this project's reference machine (2 cores, torch 2.13.0 CPU, C kernels on, MKL's buffer
# cache off (see actgrad/__init__.py), 182,625 training examples), three runs each:
#
#   job                                                        measured MB    parts MB   estimate MB
#   mlp, 5 seeds, 300 steps, batch 32                             396-422         455           569
#   mlp, 3 seeds, 300 steps, batch 5,000                          546-548         716           895
#   mlp, 3 seeds, 3,000 steps, batch 5,000                      1,289-1,292     1,204         1,505
#   mlp, 2 seeds, 200 steps, batch 20,000                         937-1,817       973         1,216
#   deep BatchNorm, 3 seeds, 300 steps                            590-609         584           730
#   deep BatchNorm, 1 seed, 2,000 steps, every statistic every
#     step, histograms of 1,000 bins                            1,631-1,669     1,891         2,364
#   mlp with 2,000 hidden units, 2 seeds, 100 steps               530-538         681           851
#   deep BatchNorm, reference engine, 1 seed, 100 steps,
#     batch 20,000                                              1,299-1,420     1,179         1,474
#
# The parts alone miss some peaks by up to 20 %, hence the RUN_TO_RUN margin on top. One kind of job
# escapes it: minibatches of 20,000 and more, where glibc's heap fragments under MKL's large packing
# buffers in some runs and not in others (937 or 1,817 MB for one job). Before MKL's buffer cache was
# switched off, every kind of job varied so: one job of 3,000 steps at batch 5,000 peaked at 1.3 GB or
# at 4.4-5.5 GB.
BASE_MB = 380  # python, torch, numpy, pandas and pyarrow imported; the C kernels loaded
FLOAT = 4
INDEX = 8
# Bytes a recorded statistic costs: a small tensor kept until the end, then a row of Python
# objects and a pandas row (measured about 0.9 kB per stored tensor of up to five values).
STAT_ENTRY_BYTES = 1000
# Bytes a histogram bin costs at its peak: the counts, then a table row per bin and its parquet
# bytes (measured 96-112 bytes).
HISTOGRAM_BIN_BYTES = 130
RUN_TO_RUN = 0.25  # the margin for what the parts miss and for run-to-run variation (the table above)
EVAL_CHUNK = 8192  # rows per forward pass of an evaluation (actgrad.training.evaluation.EVAL_CHUNK)

def _layer_widths(spec: dict, block_size: int) -> list[int]:
    """Input width and every layer's output width, embedding first."""
    hidden = [spec["n_hidden"]] * (spec.get("n_layers", 1) if spec["model"] == "deep" else 1)
    return [spec["n_embd"] * block_size, *hidden, VOCAB]


def _parameter_count(spec: dict, block_size: int) -> int:
    widths = _layer_widths(spec, block_size)
    count = VOCAB * spec["n_embd"]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        count += fan_in * fan_out + fan_out  # a bias or BatchNorm's gain and shift
    if spec.get("batchnorm"):
        count += 4 * sum(widths[1:-1])  # running statistics, and the last layer's BatchNorm
    elif spec.get("norm") == "layernorm":
        count += 2 * sum(widths[1:])  # a gain and shift per unit besides the (absent) bias: an upper-ish bound
    return count


def _recorded_steps(steps: int, every: int, snapshots: int) -> int:
    return -(-steps // max(1, every)) + snapshots + 1


def estimate_training_memory_mb(spec: dict, n_models: int, n_train: int, block_size: int, plan,
                                n_examples: int | None = None, engine: str = "batched",
                                index_chunk: int = 1000) -> dict:
    """Peak resident memory of one training job, in MB, and its parts.

    ``spec`` is the variant's complete settings (:func:`actgrad.study.settings.variant_spec`),
    ``n_models`` the runs trained together (seeds, and their sensitivity twins), ``n_train``
    the training split's examples and ``n_examples`` all splits' (1.25 x ``n_train`` if not
    given), ``plan`` the job's :class:`~actgrad.training.stats.StatsPlan`. Returns ``{"total": MB,
    "parts": {name: MB}}``. The parts are upper-ish bounds, each calibrated against the peak
    resident memory of real jobs (the table above ``BASE_MB``).
    """
    steps, batch = int(spec["max_steps"]), int(spec["batch_size"])
    n_examples = int(n_examples if n_examples is not None else n_train * 1.25)
    widths = _layer_widths(spec, block_size)
    hidden_layers = len(widths) - 2
    recorded_models = n_models // 2 if spec.get("sensitivity_twin") else n_models
    # the batched engine trains every model at once; the reference loop one after another
    at_once = n_models if engine == "batched" else 1
    snapshots = len(plan.snapshot_steps)

    parts = {"python and torch": float(BASE_MB)}
    parts["splits"] = n_examples * (block_size + 1) * INDEX / MB
    params = _parameter_count(spec, block_size)
    # parameters, gradients and the engine's copies; every layer's activations, their gradients and
    # the log-probabilities, for a whole minibatch
    # (GELU keeps its input beside its output: one more hidden-layer buffer per layer.)
    per_hidden = 5 if spec.get("activation") == "gelu" else 4
    workspace = 4 * params + batch * (2 * widths[0] + per_hidden * sum(widths[1:-1]) + 6 * VOCAB)
    if engine != "batched":
        workspace *= 3  # autograd keeps every intermediate of the graph
    parts["training"] = at_once * workspace * FLOAT / MB
    # a chunk of minibatch indices at a time: the drawn rows, the gathered characters and targets
    parts["minibatch indices"] = at_once * min(steps, index_chunk) * batch * (block_size + 3) * INDEX / MB
    parts["losses"] = 3 * n_models * steps * FLOAT / MB
    # evaluations run in chunks of rows into whole-split logits (two, a Scratch keeps them); calibrating
    # a BatchNorm net's statistics holds a whole-split hidden layer and its output
    whole_split = 2 * VOCAB + (2 * max(widths[1:-1]) if spec.get("batchnorm") else 0)
    parts["evaluation"] = (n_train * whole_split + 4 * EVAL_CHUNK * max(widths)) * FLOAT / MB
    series = _recorded_steps(steps, plan.every, snapshots)
    updates = _recorded_steps(steps, plan.update_every, snapshots)
    entries = series * (4 * hidden_layers + 1) + updates * (hidden_layers + 2) * 2
    parts["statistics"] = recorded_models * entries * STAT_ENTRY_BYTES / MB
    histograms = (_recorded_steps(steps, plan.histogram_every, snapshots) * hidden_layers
                  + (snapshots + 1) * 3 * (hidden_layers + 1))
    parts["histograms"] = recorded_models * histograms * plan.bins * HISTOGRAM_BIN_BYTES / MB
    # what the parts miss (the allocator's leftovers, mostly), measured against real jobs
    parts["run-to-run variation"] = RUN_TO_RUN * sum(parts.values())
    return {"total": sum(parts.values()), "parts": parts}


def check_batch_size(batch_size: int, n_train: int, key: str = "batch_size") -> None:
    """A minibatch is drawn from the training split: it cannot be larger."""
    if batch_size > n_train:
        raise ConfigError(f"{key}: {batch_size:,} is larger than the training split ({n_train:,} examples); "
                          f"use at most {n_train:,}")


def check_training_job(config: dict, spec: dict, n_train: int, block_size: int, plan,
                       n_examples: int | None = None, limit_mb: float | None = None) -> dict:
    """Refuse, with a :class:`ConfigError` naming the key, a job that cannot run; return the estimate.

    ``limit_mb`` is the memory the job asks for, ``resources.train_mem_mb`` by default.
    """
    name = spec["name"]
    key = f"variants/{name}/batch_size" if "batch_size" in config["variants"][name] else "batch_size"
    check_batch_size(spec["batch_size"], n_train, key)
    n_models = len(spec["seeds"]) * (2 if spec["sensitivity_twin"] else 1)
    estimate = estimate_training_memory_mb(spec, n_models, n_train, block_size, plan, n_examples,
                                           engine=config["engine"])
    if limit_mb is None:
        limit_mb = config["resources"]["train_mem_mb"]
    if estimate["total"] > limit_mb:
        largest = max(estimate["parts"], key=estimate["parts"].get)
        raise ConfigError(
            f"variants/{name}: training needs about {estimate['total']:,.0f} MB, more than the "
            f"{limit_mb:,.0f} MB it asks for (resources.train_mem_mb); the largest part is {largest} "
            f"({estimate['parts'][largest]:,.0f} MB): make it smaller or raise resources.train_mem_mb")
    return estimate


def memory_plan(stats: dict, steps: int) -> SimpleNamespace:
    """What the estimate reads of a run's :class:`~actgrad.training.stats.StatsPlan`, from the config's (resolved)
    ``stats`` section, without torch (:func:`actgrad.training.job.stats_plan` makes the real one)."""
    return SimpleNamespace(every=stats["every"], update_every=stats["update_every"],
                           histogram_every=stats["histogram_every"],
                           snapshot_steps=tuple(x for x in stats["snapshot_steps"] if x < steps), bins=stats["bins"])


def job_label(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def check_job(config: dict, names: list[str], n_train: int, block_size: int, n_examples: int | None = None,
              mem_mb: float | None = None) -> dict[str, dict]:
    """Refuse, with a :class:`ConfigError`, a training job of the variants ``names`` that cannot run: a variant's
    minibatch larger than the training split, or a job above its memory grant ``mem_mb``
    (``resources.train_mem_mb`` by default). Returns the estimate of each group the job trains in one engine
    call (by :func:`job_label`): the variants with the same :func:`~actgrad.study.jobs.batch_key`, their
    models counted as seeds of the first."""
    specs = [variant_spec(config, name) for name in names]
    for spec in specs:  # each variant's own batch size and bounds, named as its own
        check_training_job(config, spec, n_train, block_size, memory_plan(config["stats"], spec["max_steps"]),
                           n_examples, limit_mb=float("inf"))
    groups: dict[str, list[dict]] = {}
    for spec in specs:
        groups.setdefault(batch_key(spec), []).append(spec)
    estimates = {}
    for group in groups.values():
        models = sum(len(s["seeds"]) * (2 if s["sensitivity_twin"] else 1) for s in group)
        whole = dict(group[0], seeds=list(range(models)), sensitivity_twin=False)
        estimates[job_label([s["name"] for s in group])] = check_training_job(
            config, whole, n_train, block_size, memory_plan(config["stats"], whole["max_steps"]), n_examples,
            limit_mb=mem_mb)
    return estimates
