# Stage 5: the runs' metrics as tables - per run, per variant over seeds, significance, references.
from pathlib import Path


rule summary:
    input:
        metrics=all_run_outputs(["metrics.json"]),
        losses=all_run_outputs(["losses.parquet"]),
        code=package_code("summary"),
    output:
        summary="results/summary.csv",
        variants="results/variants.csv",
        significance="results/significance.csv",
        references="results/reference_check.csv",
    params:
        results=lambda wildcards, input: str(Path(input.metrics[0]).parents[3]),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/summary.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/summary.py"
