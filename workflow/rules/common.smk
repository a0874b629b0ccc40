# Config validation and the small functions the other rule files share.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from actgrad.study.settings import ConfigError, variant_spec
from actgrad.data import planned_split_sizes
from actgrad.study.load import check_jobs, complete, describe_size, resolve_base
from actgrad.study.jobs import study_cost, training_cost
from actgrad.rundir import RUN_FILES, run_files
from actgrad.study.jobs import training_jobs

# The schema is workflow/schemas/config.schema.yaml; errors name the key and what is allowed,
# and stop the workflow before any job runs.
try:
    # `base:` is looked up beside the --configfile that names it.
    _origin = Path(workflow.overwrite_configfiles[-1]).parent if workflow.overwrite_configfiles else None
    # Sweeps expanded into variants, validated, defaults filled in, comparisons checked.
    # A study above its limits (runs, CPU-hours) is refused here.
    _completed = complete(resolve_base(dict(config), _origin))
    config.clear()
    config.update(_completed)
    # Training job name -> the variants it trains (config key training_jobs).
    TRAIN_JOBS = training_jobs(config)
    # What each training job checks before it trains (its minibatch against the training split, its memory
    # estimate against resources.train_mem_mb), checked here as well: a refusal from inside a job comes
    # after Snakemake has deleted that job's earlier outputs. The split sizes follow from the names' checksum
    # (known ones, data/splits.json, or a local copy); where they are not known yet the job checks alone.
    _local = [config["names_url"]] if "://" not in config["names_url"] else []
    check_jobs(config, TRAIN_JOBS, planned_split_sizes(config["names_sha256"], config["split_seed"],
                                                       ["data/splits.json", "data/names.txt", *_local]))
except ConfigError as e:
    raise WorkflowError(str(e)) from None

VARIANTS = list(config["variants"])
SPECS = {v: variant_spec(config, v) for v in VARIANTS}
# The study's size, for the line printed when the workflow starts.
STUDY_SIZE = describe_size(study_cost(config))
# Where the steps write, relative to the working directory; a run's own layout is actgrad.rundir's.
RESULTS = "results"
FIGURES = f"{RESULTS}/figures"


def run_outputs(variant, files=RUN_FILES):
    """Every file of every seed of a variant: one training job writes them all."""
    return run_files(RESULTS, variant, SPECS[variant]["seeds"], files)


# The package module a light step runs, as one of its inputs: editing it reruns the step (Snakemake's
# code trigger sees only the two-line scripts). Training leaves its modules out on purpose: a
# refactor of the engine should not silently retrain a quarter of an hour of runs.
PACKAGE_DIR = Path(workflow.basedir) / "src" / "actgrad"


def package_code(module):
    return str(PACKAGE_DIR / f"{module}.py")


def all_run_outputs(files=RUN_FILES):
    return [path for v in VARIANTS for path in run_outputs(v, files)]


# Light steps run on the submit host, not as cluster jobs.
localrules:
    all,
    download,
    splits,
    summary,
    report,


# `kill -INT <snakemake>` stops running jobs too, as Ctrl-C in a terminal does (Snakemake alone waits for them).
from actgrad.workflow_step import forward_interrupts_to_jobs

forward_interrupts_to_jobs()
