# Stage 3-4: the training jobs. By default one job per variant: its seeds (and sensitivity twins) train
# side by side as one batched model. With `training_jobs: architecture` the variants that differ only in
# drawn values (init scales, gain, seeds) train in one job, batched together (actgrad.training.job.training_jobs).
# A job may have its own variants and seeds, so each job gets its own rule.
for _job, _members in TRAIN_JOBS.items():
    _specs = {v: SPECS[v] for v in _members}

    rule:
        name:
            f"train_{_job}"
        input:
            splits="data/splits.pt",
        output:
            [path for v in _members for path in run_outputs(v)],
        params:
            # The variants' complete settings: change one and only its job trains again. (A job of one variant
            # keeps the params it always had, so that an existing study does not retrain.)
            **({"variant": _job, "spec": _specs[_job]} if len(_members) == 1
               else {"variants": _members, "spec": _specs}),
            # ... and so do the study-wide settings that shape a run's outputs.
            settings={key: config[key] for key in ("engine", "device", "samples", "stats", "divergence",
                                                   "block_size", "split_seed")},
            # Where the runs go. A function of the output is evaluated only when the job runs, so Snakemake
            # does not record it among the settings whose change retrains (as it did not before).
            results=lambda wildcards, output: RESULTS,
        threads: config["threads"]
        # The most work first: a long job left to run alone at the end would leave CPUs idle.
        priority: round(sum(training_cost(spec, config["block_size"]) for spec in _specs.values()))
        resources:
            # A cluster job that ran out of memory or time asks for twice as much when retried.
            mem_mb=lambda wildcards, attempt: config["resources"]["train_mem_mb"] * attempt,
            runtime=lambda wildcards, attempt: config["resources"]["train_runtime"] * attempt,
            gpu=config["resources"]["train_gpus"],
        log:
            f"logs/train/{_job}.log",
        benchmark:
            f"benchmarks/train/{_job}.tsv"
        script:
            "../scripts/train.py"
