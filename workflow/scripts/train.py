from actgrad.runs import train_variant
from actgrad.steps import as_step

as_step(snakemake, lambda log: train_variant(snakemake.config, snakemake.params.variant, snakemake.input.splits,
                                             snakemake.params.results, log=log))
