# Stage 5: from the runs to the tables - every number the report shows is computed here
# (actgrad.results.summary): per run, per variant over seeds, significance, references, the deep networks
# layer by layer, the lecture seed's samples, the sensitivity twins as a chaos verdict (chaos.csv), and the
# study's statistics and histograms as one table each.
from actgrad.results.vocabulary import TABLES

# What the summary reads of each run (not the parameters, nor the saturation maps).
SUMMARY_RUN_FILES = ["metrics.json", "losses.parquet", "stats.parquet", "histograms.parquet", "samples.txt"]


rule summary:
    input:
        runs=all_run_outputs(SUMMARY_RUN_FILES),
        code=[package_code(m) for m in ("results/summary", "results/normalisation", "results/diagnosis", "rundir",
                                        "results/significance", "study/comparisons", "study/sweeps", "results/theory")],
    output:
        **{name: f"{RESULTS}/{filename}" for name, filename in TABLES.items()},
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/summary.log",
    script:
        "../scripts/summary.py"
