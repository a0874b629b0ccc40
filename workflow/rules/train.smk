# Stage 3-4: one job per variant; its seeds (and sensitivity twins) train side by side as one
# batched model. A variant may have its own seeds, so each variant gets its own rule.
for _variant in VARIANTS:
    _spec = SPECS[_variant]

    rule:
        name:
            f"train_{_variant}"
        input:
            splits="data/splits.pt",
        output:
            run_outputs(_variant),
        params:
            variant=_variant,
            # The variant's complete settings: change one and only that variant trains again.
            spec=_spec,
            # ... and so do the study-wide settings that shape a run's outputs.
            settings={key: config[key] for key in ("engine", "device", "samples", "stats", "divergence",
                                                   "block_size", "split_seed")},
            # Where the runs go. A function of the output is evaluated only when the job runs, so Snakemake
            # does not record it among the settings whose change retrains (as it did not before).
            results=lambda wildcards, output: RESULTS,
        threads: config["threads"]
        # The most work first: a long job left to run alone at the end would leave CPUs idle.
        priority: round(training_cost(_spec, config["block_size"]))
        resources:
            # A cluster job that ran out of memory or time asks for twice as much when retried.
            mem_mb=lambda wildcards, attempt: config["resources"]["train_mem_mb"] * attempt,
            runtime=lambda wildcards, attempt: config["resources"]["train_runtime"] * attempt,
            gpu=config["resources"]["train_gpus"],
        log:
            f"logs/train/{_variant}.log",
        benchmark:
            f"benchmarks/train/{_variant}.tsv"
        script:
            "../scripts/train.py"
