# Stage 3-4: the training jobs. By default one job per variant: its seeds (and sensitivity twins) train
# side by side as one batched model. With `training_jobs: architecture` the variants that differ only in
# drawn values (init scales, gain, seeds) train in one job, batched together (actgrad.study.jobs.training_jobs).
#
# A variant with a job of its own is trained by a wildcard rule, `train` (wildcard `variant`), so that a sweep
# of thousands of points plans in seconds. A rule's outputs are fixed patterns, so variants that override
# `seeds` get a rule per distinct seed set (`train_seeds_<seeds>`), each constrained to its variants. A job of
# several variants writes files of several variants, which is no pattern: each gets a rule of its own,
# `train_<first variant>_and_<n>`.
import re

# The study-wide settings that shape a run's outputs: a change retrains every variant.
TRAIN_SETTINGS = {key: config[key] for key in ("engine", "device", "samples", "stats", "divergence", "block_size",
                                               "split_seed")}
# Variants with a job of their own, by seed set (the study's seeds first).
_SOLO = {}
for _job, _members in TRAIN_JOBS.items():
    if _members == [_job]:
        _SOLO.setdefault(tuple(SPECS[_job]["seeds"]), []).append(_job)
_SOLO = dict(sorted(_SOLO.items(), key=lambda item: item[0] != tuple(config["seeds"])))


def _only(names):
    """A wildcard constraint that matches exactly the variants ``names``: the shorter of a list of them and a
    list of every other variant (a regular expression of thousands of names is slow to match)."""
    others = [v for v in VARIANTS if v not in set(names)]
    if not others:
        return "[^/]+"
    if len(names) <= len(others):
        return "|".join(map(re.escape, names))
    return "(?!(?:" + "|".join(map(re.escape, others)) + ")/)[^/]+"


def _variant_spec(wildcards):
    return SPECS[wildcards.variant]


def _variant_cost(wildcards):
    return round(training_cost(SPECS[wildcards.variant], config["block_size"]))


for _index, (_seeds, _members) in enumerate(_SOLO.items()):

    rule:
        name:
            "train" if _index == 0 else "train_seeds_" + "_".join(map(str, _seeds))
        input:
            splits="data/splits.pt",
        output:
            run_files(RESULTS, "{variant}", _seeds),
        wildcard_constraints:
            variant=_only(_members),
        params:
            # The variant's complete settings: change one and only its job trains again.
            variant=lambda wildcards: wildcards.variant,
            spec=_variant_spec,
            # ... and so do the study-wide settings that shape a run's outputs.
            settings=TRAIN_SETTINGS,
            # Where the runs go. A function of the output is evaluated only when the job runs, so Snakemake
            # does not record it among the settings whose change retrains.
            results=lambda wildcards, output: RESULTS,
        threads: config["threads"]
        # The most work first: a long job left to run alone at the end would leave CPUs idle.
        priority: _variant_cost
        resources:
            # A cluster job that ran out of memory or time asks for twice as much when retried.
            mem_mb=lambda wildcards, attempt: config["resources"]["train_mem_mb"] * attempt,
            runtime=lambda wildcards, attempt: config["resources"]["train_runtime"] * attempt,
            gpu=config["resources"]["train_gpus"],
        log:
            "logs/train/{variant}.log",
        benchmark:
            "benchmarks/train/{variant}.tsv"
        script:
            "../scripts/train.py"


for _job, _members in TRAIN_JOBS.items():
    if _members == [_job]:
        continue
    _specs = {v: SPECS[v] for v in _members}

    rule:
        name:
            f"train_{_job}"
        input:
            splits="data/splits.pt",
        output:
            [path for v in _members for path in run_outputs(v)],
        params:
            variants=_members,
            spec=_specs,
            settings=TRAIN_SETTINGS,
            results=lambda wildcards, output: RESULTS,
        threads: config["threads"]
        priority: round(sum(training_cost(spec, config["block_size"]) for spec in _specs.values()))
        resources:
            mem_mb=lambda wildcards, attempt: config["resources"]["train_mem_mb"] * attempt,
            runtime=lambda wildcards, attempt: config["resources"]["train_runtime"] * attempt,
            gpu=config["resources"]["train_gpus"],
        log:
            f"logs/train/{_job}.log",
        benchmark:
            f"benchmarks/train/{_job}.tsv"
        script:
            "../scripts/train.py"

    # Snakemake checks that a rule makes a file by matching the file against each of the rule's outputs in
    # turn: for a job of N outputs that is N regular-expression matches per file, N^2 for the plan (minutes for
    # a job of 10,000 files). A rule without wildcards makes exactly its outputs: a set lookup says the same.
    _rule = workflow.get_rule(f"train_{_job}")
    if not _rule.wildcard_names:
        _rule.is_producer = frozenset(map(str, _rule.products())).__contains__
