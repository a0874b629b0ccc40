from actgrad.results.summary import write_summary
from actgrad.workflow_step import as_step

as_step(snakemake, lambda log: write_summary(snakemake.config, snakemake.input.runs, dict(snakemake.output.items()),
                                             splits=snakemake.input.splits))
