# Stage 6: figures (PNG, per variant and across variants) and the self-contained HTML report.
# `snakemake --report report/snakemake-report.html` collects the same figures with their captions.
from pathlib import Path

from actgrad.report.contents import SWEEP_CAPTION, THEORY_CAPTION, VARIANT_FIGURES, featured_variants, figure_path, study_figures, sweep_figure, sweep_names

# The repository: the report's template and the figure captions live in it, whatever --directory says.
REPO_DIR = Path(workflow.basedir)
CAPTIONS = Path(workflow.current_basedir).parent / "report"
REPORT_TEMPLATE = REPO_DIR / "report" / "report.html.j2"

# The cross-variant figures this study has (actgrad.report.contents lists every figure once).
GLOBAL_FIGURES = study_figures(SPECS.values(), config)
# One phase diagram per sweep, drawn from the summary's sweep table.
SWEEP_FIGURES = [sweep_figure(s) for s in sweep_names(config)]
# Per-variant figures only for the variants the report shows in full: every listed one and a few chosen
# points of each sweep (the other points are a row of their sweep's table).
FEATURED = featured_variants(config)
# What the per-variant figures read of each run.
VARIANT_FIGURE_FILES = ["metrics.json", "stats.parquet", "histograms.parquet", "saturation.npz"]


report: "../report/workflow.rst"


# Every figure in one job: its imports cost more than a variant's six figures, so one job per figure set
# spent most of its time starting. It draws in as many processes as it has threads (forked after the imports).
rule figures:
    input:
        # a run's metrics.json stands for all its files (see the summary's rule)
        runs=all_run_outputs(["metrics.json"]),
        summary=f"{RESULTS}/summary.csv",
        references=f"{RESULTS}/reference_check.csv",
        theory=f"{RESULTS}/theory.csv",
        sweeps=f"{RESULTS}/sweeps.csv",
        theory_curves=f"{RESULTS}/theory_curves.csv",
        twin_traces=f"{RESULTS}/twin_traces.csv",
        trainability=f"{RESULTS}/trainability.csv",
        trainability_curve=f"{RESULTS}/trainability_curve.csv",
        code=[package_code(m) for m in ("report/figures", "report/contents", "rundir", "results/summary",
                                        "results/significance", "results/theory", "report/trainability")],
    output:
        [
            report(figure_path(FIGURES, name, v), caption=f"../report/{name}.rst", category="2. Per variant",
                   subcategory=v, labels={"figure": name.replace("_", " "), "variant": v})
            for v in FEATURED
            for name in VARIANT_FIGURES
        ],
        **{
            name: report(figure_path(FIGURES, name),
                         caption=f"../report/{SWEEP_CAPTION if name in SWEEP_FIGURES else name}.rst",
                         category="1. Across variants", labels={"figure": name.replace("_", " ")})
            for name in GLOBAL_FIGURES + SWEEP_FIGURES
        },
    params:
        order=VARIANTS,
        # variant -> (the run files its figures read, figure name -> PNG)
        variant_figures={v: (run_outputs(v, VARIANT_FIGURE_FILES),
                             {name: figure_path(FIGURES, name, v) for name in VARIANT_FIGURES}) for v in FEATURED},
    threads: 4
    resources:
        mem_mb=3000,
        runtime=30,
    log:
        "logs/figures.log",
    script:
        "../scripts/figures.py"


rule report:
    input:
        # the summary's tables: every number the report shows
        tables=rules.summary.output,
        splits="data/splits.json",
        figures=[figure_path(FIGURES, name) for name in GLOBAL_FIGURES + SWEEP_FIGURES]
        + [figure_path(FIGURES, name, v) for v in FEATURED for name in VARIANT_FIGURES],
        template=str(REPORT_TEMPLATE),
        captions=[str(CAPTIONS / f"{name}.rst") for name in GLOBAL_FIGURES + list(VARIANT_FIGURES)]
        + [str(CAPTIONS / f"{name}.rst") for name in (SWEEP_CAPTION, THEORY_CAPTION)],
        code=[package_code(m) for m in ("report/html", "report/contents", "results/significance", "results/normalisation",
                                                 "study/comparisons", "report/trainability")],
    output:
        "report/report.html",
    params:
        # the folders of the inputs above, so that they follow wherever the files are
        results=lambda wildcards, input: str(Path(input.tables[0]).parent),
        figures=lambda wildcards, input: str(Path(input.figures[0]).parent),
        captions=lambda wildcards, input: str(Path(input.captions[0]).parent),
        repo=lambda wildcards, input: str(Path(input.template).parent),  # a folder of the repository, for its commit
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/report.log",
    script:
        "../scripts/report.py"
