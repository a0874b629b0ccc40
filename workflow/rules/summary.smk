# Stage 5: the runs' metrics as tables - per run, per variant over seeds, significance, references.


rule summary:
    input:
        metrics=all_run_outputs(["metrics.json"]),
        losses=all_run_outputs(["losses.parquet"]),
    output:
        summary="results/summary.csv",
        variants="results/variants.csv",
        significance="results/significance.csv",
        references="results/reference_check.csv",
    params:
        results="results",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/summary.log",
    script:
        "../scripts/summary.py"
