from actgrad.figures import theory_figures
from actgrad.workflow_step import as_step

as_step(snakemake, lambda log: theory_figures(snakemake.config, snakemake.input.theory, snakemake.input.sweeps,
                                              dict(snakemake.output.items()), log=log))
