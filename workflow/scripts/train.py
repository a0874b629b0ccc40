from actgrad.training.job import train_variants
from actgrad.workflow_step import as_step

# Torch gets the threads Snakemake granted (fewer than asked when --cores is smaller).
config = dict(snakemake.config, threads=snakemake.threads)
variants = snakemake.params.get("variants") or [snakemake.params.variant]  # a job of several, or of one
as_step(snakemake, lambda log: train_variants(config, variants, snakemake.input.splits,
                                              snakemake.params.results, log=log,
                                              # a retried cluster job is checked against its larger grant
                                              mem_mb=snakemake.resources.mem_mb))
