from actgrad.steps import as_step
from actgrad.summary import write_summary

as_step(snakemake, lambda log: write_summary(snakemake.config, snakemake.input.runs, dict(snakemake.output.items())))
