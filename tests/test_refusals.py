"""A study that cannot run is refused before anything runs or is deleted, with one line naming the key."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import NAMES, tiny_config
from finished_study import copy_of, finished_study, output_of, snakemake_in

from actgrad.study.load import complete
from actgrad.study.settings import ConfigError


@pytest.mark.slow
@pytest.mark.parametrize("change, says", [
    ({"variants": {"deep_bn": {"batch_size": 10_000_000}}},
     r"error: train\[deep_bn\]: variants/deep_bn/batch_size: 10,000,000 is larger than the training split "
     r"\(182,625 examples\); use at most 182,625 \(refused while planning: nothing was run or deleted\)"),
    ({"resources": {"train_mem_mb": 100}},
     r"error: train\[fix_tanh\]: variants/fix_tanh: training needs about [\d,]+ MB, more than the 100 MB it asks for"),
], ids=["batch larger than the split", "job larger than its memory grant"])
def test_a_job_that_would_refuse_stops_the_workflow_before_anything_is_deleted(change, says, tmp_path_factory,
                                                                               tmp_path):
    work = copy_of(finished_study(tmp_path_factory), tmp_path)
    config = yaml.safe_load((work / "config.yaml").read_text())
    for key, value in change.items():
        if key == "variants":
            for name, extra in value.items():
                config["variants"][name].update(extra)
        else:
            config[key] = value
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()}
    proc = snakemake_in(work, check=False)
    assert proc.returncode != 0
    assert re.search(says, output_of(proc)), output_of(proc)[-3000:]
    assert "Job stats" not in output_of(proc)
    # every run, table and figure is still there, untouched
    assert {p: p.stat().st_mtime_ns for p in (work / "results").rglob("*") if p.is_file()} == before
    assert (work / "results" / "runs" / "deep_bn").is_dir()


def test_an_lr_schedule_out_of_order_is_refused_naming_the_entry():
    config = tiny_config(NAMES)
    config["variants"]["fix_tanh"]["lr_schedule"] = [{"from_step": 0, "lr": 0.1}, {"from_step": 150, "lr": 0.01},
                                                      {"from_step": 100, "lr": 0.05}]
    with pytest.raises(ConfigError) as e:
        complete(config)
    assert str(e.value).startswith("variants/fix_tanh/lr_schedule/2/from_step: 100 does not come after the entry "
                                   "before it (from_step 150)")
    config["variants"]["fix_tanh"]["lr_schedule"][2]["from_step"] = 150  # the same step twice is no order either
    with pytest.raises(ConfigError, match="lr_schedule/2/from_step: 150 does not come after"):
        complete(config)


def test_a_study_above_its_limits_is_refused_with_its_size_and_the_key_that_raises_the_bound():
    config = tiny_config(NAMES)
    # 1,250 sweep points x 2 seeds: 2,500 runs, above the default limits.runs of 2,000
    config["sweeps"] = {"big": {"variant": "fix_tanh", "grid": {"gain": [0.5 + i / 100 for i in range(50)],
                                                                "n_hidden": list(range(10, 35))}}}
    with pytest.raises(ConfigError) as e:
        complete(config)
    assert re.fullmatch(r"the study asks for 1,252 variant\(s\), 2,504 training run\(s\), (about [\d.,]+|under 0\.01) "
                        r"CPU-hours of training \(estimated\), above limits\.runs \(2,000\); if you mean it, raise "
                        r"limits\.runs \(config/README\.md: limits\.runs, limits\.cpu_hours\)", str(e.value))
    config["limits"] = {"runs": 3000}
    assert len(complete(config)["variants"]) == 1252
    # ... and so is one whose estimated CPU time is above limits.cpu_hours
    long = tiny_config(NAMES, max_steps=200_000, seeds=list(range(40)), limits={"cpu_hours": 0.01})
    with pytest.raises(ConfigError, match=r"CPU-hours of training \(estimated\), above limits\.cpu_hours \(0\.01\)"):
        complete(long)


def test_samples_are_bounded_where_their_cost_is_stated():
    with pytest.raises(ConfigError, match=r"samples: 10000 is greater than the maximum of 1000"):
        complete(tiny_config(NAMES, samples=10_000))
    complete(tiny_config(NAMES, samples=1000))
