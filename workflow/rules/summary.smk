# Stage 5: from the runs to the tables - every number the report shows is computed here
# (actgrad.results.summary): per run, per variant over seeds, significance, references, the deep networks
# layer by layer, the lecture seed's samples, the sensitivity twins as a chaos verdict (chaos.csv), and the
# study's statistics and histograms as one table each.
from actgrad.results.vocabulary import TABLES

# The summary reads a run's metrics.json, losses, statistics, histograms and samples, but asks Snakemake for its
# metrics.json alone: a training job writes it last, after every other file of the run, so it is newer than they
# are, and `rule all` asks for every run file, so a deleted one is trained again (and metrics.json with it). One
# file a run instead of five keeps a sweep of thousands of points planning in seconds.


rule summary:
    input:
        runs=all_run_outputs(["metrics.json"]),
        splits="data/splits.pt",  # the trainability table's input-blind baseline
        code=[package_code(m) for m in ("results/summary", "results/normalisation", "results/diagnosis", "rundir",
                                        "results/significance", "study/comparisons", "study/sweeps", "results/theory",
                                        "results/trainability")],
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
