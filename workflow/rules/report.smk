# Stage 6: figures (PNG, per variant and across variants) and the self-contained HTML report.
# `snakemake --report report/snakemake-report.html` collects the same figures with their captions.
import re
from pathlib import Path

# The repository: the report's template and the figure captions live in it, whatever --directory says.
REPO_DIR = Path(workflow.basedir)
CAPTIONS = Path(workflow.current_basedir).parent / "report"
REPORT_TEMPLATE = REPO_DIR / "report" / "report.html.j2"

# Which cross-variant figures this study has: the deep comparison only with deep variants, the
# sensitivity figure only when some run has a twin.
GLOBAL_FIGURES = ["loss_curves", "final_losses"]
if any(variant_spec(config, v)["model"] == "deep" for v in VARIANTS):
    GLOBAL_FIGURES.append("deep_layers")
if any(variant_spec(config, v)["sensitivity_twin"] for v in VARIANTS):
    GLOBAL_FIGURES.append("sensitivity")
VARIANT_FIGURES = ["init", "activations", "activation_grads", "weight_grads", "updates", "heatmap"]
VARIANT_FIGURE_FILES = ["metrics.json", "stats.parquet", "histograms.parquet", "saturation.npz"]


report: "../report/workflow.rst"


rule figures_variant:
    input:
        runs=lambda wc: run_outputs(wc.variant, VARIANT_FIGURE_FILES),
        code=[package_code("figures"), package_code("conventions")],
    output:
        **{
            name: report(f"results/figures/{{variant}}/{name}.png", caption=f"../report/{name}.rst",
                         category="2. Per variant", subcategory="{variant}",
                         labels={"figure": name.replace("_", " "), "variant": "{variant}"})
            for name in VARIANT_FIGURES
        },
    wildcard_constraints:
        variant="|".join(re.escape(v) for v in VARIANTS),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    log:
        "logs/figures/{variant}.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/figures.py"


rule figures_global:
    input:
        runs=all_run_outputs(["metrics.json", "losses.parquet", "stats.parquet"]),
        summary="results/summary.csv",
        references="results/reference_check.csv",
        code=[package_code("figures"), package_code("conventions")],
    output:
        **{
            name: report(f"results/figures/{name}.png", caption=f"../report/{name}.rst",
                         category="1. Across variants", labels={"figure": name.replace("_", " ")})
            for name in GLOBAL_FIGURES
        },
    params:
        order=VARIANTS,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    log:
        "logs/figures/global.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/figures.py"


rule report:
    input:
        summary="results/summary.csv",
        variants="results/variants.csv",
        significance="results/significance.csv",
        references="results/reference_check.csv",
        splits="data/splits.json",
        runs=all_run_outputs(["metrics.json", "stats.parquet", "samples.txt"]),
        figures=[f"results/figures/{name}.png" for name in GLOBAL_FIGURES]
        + [f"results/figures/{v}/{name}.png" for v in VARIANTS for name in VARIANT_FIGURES],
        template=str(REPORT_TEMPLATE),
        captions=[str(CAPTIONS / f"{name}.rst") for name in GLOBAL_FIGURES + VARIANT_FIGURES],
        code=[package_code("report"), package_code("conventions")],
    output:
        "report/report.html",
    params:
        # derived from the inputs, so that they follow wherever the files are
        results=lambda wildcards, input: str(Path(input.summary).parent),
        figures=lambda wildcards, input: str(Path(input.figures[0]).parent),
        captions=lambda wildcards, input: str(Path(input.captions[0]).parent),
        repo=lambda wildcards, input: str(Path(input.template).parents[1]),  # the repository, for its commit
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/report.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/report.py"
