from actgrad.figures import theory_figures
from actgrad.steps import as_step

as_step(snakemake, lambda log: theory_figures(snakemake.config, snakemake.input.theory, snakemake.input.sweeps,
                                              dict(snakemake.output.items()), log=log))
