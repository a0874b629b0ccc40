from actgrad.report.html import write_report
from actgrad.workflow_step import as_step

as_step(snakemake, lambda log: write_report(snakemake.config, snakemake.params.results, snakemake.params.figures,
                                            snakemake.input.template, snakemake.output[0],
                                            captions_dir=snakemake.params.captions, splits_json=snakemake.input.splits,
                                            repo=snakemake.params.repo, log=log))
