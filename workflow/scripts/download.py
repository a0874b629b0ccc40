from actgrad.data import download_names
from actgrad.workflow_step import as_step

as_step(snakemake, lambda log: log(str(download_names(snakemake.params.url, snakemake.params.sha256,
                                                      snakemake.output[0]))))
