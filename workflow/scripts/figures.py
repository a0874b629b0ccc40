from actgrad.figures import global_figures, variant_figures
from actgrad.workflow_step import as_step

outputs = dict(snakemake.output.items())
if snakemake.rule == "figures_global":
    as_step(snakemake, lambda log: global_figures(snakemake.params.order, snakemake.input.runs, snakemake.input.summary,
                                                  snakemake.input.references, outputs, log=log))
else:
    as_step(snakemake, lambda log: variant_figures(snakemake.input.runs, outputs, log=log))
