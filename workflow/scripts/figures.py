from actgrad.report.figures import all_figures
from actgrad.workflow_step import as_step

tables = {name: snakemake.input[name] for name in ("summary", "references", "theory", "sweeps", "theory_curves",
                                                      "twin_traces", "trainability", "trainability_curve")}
as_step(snakemake, lambda log: all_figures(snakemake.config, snakemake.params.order, snakemake.input.runs, tables,
                                           dict(snakemake.output.items()), snakemake.params.variant_figures,
                                           workers=snakemake.threads, log=log))
