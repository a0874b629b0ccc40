"""A batch the training split cannot fill, or a job larger than the memory it asks for, is refused before
training; the estimate bounds a real job."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import (
    FIX_TANH,
    output_of,
    run_targets,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad.study.settings import ConfigError, apply_defaults, validate

N_TRAIN = 182625


def _spec_and_plan(config: dict, name: str):
    from actgrad.study.settings import variant_spec
    from actgrad.training.stats import StatsPlan

    validate(config)
    apply_defaults(config)
    spec = variant_spec(config, name)
    s = config["stats"]
    plan = StatsPlan(every=s["every"], update_every=s["update_every"], histogram_every=s["histogram_every"],
                     snapshot_steps=tuple(s["snapshot_steps"]), bins=s["bins"], last_step=spec["max_steps"] - 1)
    return spec, plan


@pytest.mark.parametrize("where", ["top level", "variant"])
def test_a_batch_larger_than_the_training_split_is_refused(names_path, where):
    from actgrad.training.memory import check_training_job

    config = tiny_config(names_path)
    if where == "top level":
        config["batch_size"], key = 10_000_000, "batch_size"
    else:
        config["variants"]["fix_tanh"] = dict(FIX_TANH, batch_size=10_000_000)
        key = "variants/fix_tanh/batch_size"
    spec, plan = _spec_and_plan(config, "fix_tanh")
    with pytest.raises(ConfigError) as e:
        check_training_job(config, spec, N_TRAIN, 3, plan)
    assert str(e.value) == (f"{key}: 10,000,000 is larger than the training split (182,625 examples); "
                            "use at most 182,625")
    config["variants"]["fix_tanh"]["batch_size"] = config["batch_size"] = N_TRAIN  # the whole split is fine
    spec, plan = _spec_and_plan(config, "fix_tanh")
    check_training_job(config, spec, N_TRAIN, 3, plan, limit_mb=1e9)


def test_a_job_that_would_not_fit_its_memory_is_refused_with_the_estimate(names_path):
    from actgrad.training.memory import check_training_job

    # every statistic at every step of the lecture's 200,000 steps, 5 deep seeds: gigabytes of tiny tensors
    config = tiny_config(names_path, seeds=[1, 2, 3, 4, 5], max_steps=200000,
                         stats={"every": 1, "update_every": 1, "histogram_every": 1, "snapshot_steps": [0],
                                "bins": 1000})
    spec, plan = _spec_and_plan(config, "deep_bn")
    with pytest.raises(ConfigError) as e:
        check_training_job(config, spec, N_TRAIN, 3, plan)
    message = str(e.value)
    assert re.fullmatch(r"variants/deep_bn: training needs about [\d,]+ MB, more than the 4,000 MB it asks for "
                        r"\(resources\.train_mem_mb\); the largest part is histograms \([\d,]+ MB\): make it smaller "
                        r"or raise resources\.train_mem_mb", message), message
    # the default study's settings fit the default 4,000 MB with room to spare
    config = tiny_config(names_path, seeds=[1, 2, 3, 4, 5], max_steps=200000,
                         stats={"every": 1000, "update_every": 100, "histogram_every": 5000,
                                "snapshot_steps": [0, 1000], "bins": 50})
    for name in config["variants"]:
        spec, plan = _spec_and_plan(config, name)
        assert check_training_job(config, spec, N_TRAIN, 3, plan)["total"] < 1500


# The job's own peak (kB): VmHWM belongs to the process image, while ru_maxrss survives exec and so would
# report the forking test process's peak when that is larger.
MEASURE = """
import json, re, sys
from pathlib import Path
from actgrad.study.settings import apply_defaults, validate
from actgrad.training.job import train_variants
config = json.loads(sys.argv[1]); validate(config); apply_defaults(config)
train_variants(config, [sys.argv[2]], sys.argv[3], sys.argv[4], log=lambda message: None)
print(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
"""


@pytest.mark.slow
def test_the_memory_estimate_bounds_a_real_job_from_above(names_path, splits_file, tmp_path):
    """A real job in a fresh process: its peak resident memory is below the estimate, and not far below."""
    import sys

    from actgrad.training.memory import estimate_training_memory_mb

    config = tiny_config(names_path, engine="batched", max_steps=300, seeds=[1, 2, 3], batch_size=5000,
                         variants={"fix_tanh": FIX_TANH})
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config), "fix_tanh", str(splits_file),
                           str(tmp_path)], capture_output=True, text=True, check=True)
    peak_mb = int(proc.stdout.split()[-1]) / 1024
    spec, plan = _spec_and_plan(config, "fix_tanh")
    estimate = estimate_training_memory_mb(spec, 3, N_TRAIN, 3, plan)["total"]
    # an upper bound, and not a loose one (546-548 MB measured, 895 estimated)
    assert peak_mb < estimate < 1.8 * peak_mb, (peak_mb, estimate)


def test_mkls_buffer_cache_is_off_before_torch_loads_unless_the_user_set_it():
    """MKL reads the switch when torch loads it: importing actgrad first must have set it (it bounds a job's
    peak memory: with the cache on, one job peaked at 1.3 GB or at 4.4-5.5 GB from run to run)."""
    import sys

    probe = "import os, actgrad, torch; print(os.environ['MKL_DISABLE_FAST_MM'])"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}).stdout.strip() == "1"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=dict(os.environ, MKL_DISABLE_FAST_MM="0")).stdout.strip() == "0"


def test_a_batch_larger_than_the_split_stops_the_training_job(names_path, tmp_path):
    """The real workflow: the training job refuses before any work, with one line naming the key."""
    config = tiny_config(names_path, batch_size=10_000_000, variants={"fix_tanh": FIX_TANH})
    proc = snakemake(tmp_path, write_config(tmp_path, config), *run_targets(config), check=False)
    assert proc.returncode != 0
    assert ("error: train[fix_tanh]: batch_size: 10,000,000 is larger than the training split (182,625 examples)"
            in output_of(proc))
    assert not (tmp_path / "results" / "runs" / "fix_tanh").exists()


def test_a_job_larger_than_its_memory_grant_stops_before_training(names_path, tmp_path):
    """The real workflow: the estimate is compared with what the job was granted (resources.train_mem_mb)."""
    config = tiny_config(names_path, variants={"fix_tanh": FIX_TANH}, resources={"train_mem_mb": 100})
    proc = snakemake(tmp_path, write_config(tmp_path, config), *run_targets(config), check=False)
    assert proc.returncode != 0
    assert re.search(r"error: train\[fix_tanh\]: variants/fix_tanh: training needs about [\d,]+ MB, more than the "
                     r"100 MB it asks for", output_of(proc)), output_of(proc)[-3000:]
