from actgrad.data import save_splits
from actgrad.workflow_step import as_step

as_step(snakemake, lambda log: log(str(save_splits(snakemake.input[0], snakemake.output.tensors,
                                                   snakemake.output.summary, snakemake.params.block_size,
                                                   snakemake.params.seed))))
