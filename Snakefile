# makemore part 3 as a pipeline: names -> splits -> runs -> statistics -> summary -> report.
# Each stage is a rule file under workflow/rules/; the logic lives in the actgrad package.
from snakemake.utils import min_version

min_version("9.0")


# A --configfile replaces the default study instead of being merged into it; a config file
# that only changes a few keys says `base: config/config.yaml` (see config/smoke.yaml).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/report.smk"


# Every run's files and every figure are asked for too: Snakemake does not rebuild a missing intermediate
# file whose consumers are up to date, so a deleted or lost run would otherwise never be trained again, and
# a deleted figure never drawn again (`snakemake --report` then fails on it).
rule all:
    default_target: True
    input:
        all_run_outputs(),
        "results/summary.csv",
        rules.figures.output,
        "report/report.html",


onstart:
    print(f"actgrad: {STUDY_SIZE}; report -> report/report.html")


onsuccess:
    print("actgrad: done. Open report/report.html")


onerror:
    print("actgrad: a step failed; its message is above (logs/ holds every step's log)")
