from pathlib import Path

from actgrad.steps import as_step
from actgrad.summary import write_summary

as_step(snakemake, lambda log: write_summary(snakemake.config, snakemake.input.metrics, snakemake.params.results,
                                             Path(snakemake.output.summary).parent))
