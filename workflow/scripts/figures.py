import os

from actgrad.figures import all_figures
from actgrad.workflow_step import as_step

tables = {name: snakemake.input[name] for name in ("summary", "references", "theory", "sweeps")}
workers = min(snakemake.threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
as_step(snakemake, lambda log: all_figures(snakemake.config, snakemake.params.order, snakemake.input.runs, tables,
                                           dict(snakemake.output.items()), snakemake.params.variant_figures,
                                           workers=workers, log=log))
