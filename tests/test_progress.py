"""Progress lines: every so many steps, the minibatch loss over the job's runs, the rate and the ETA."""

import re
from datetime import datetime

import pytest
import torch

from actgrad.training import loop as reference
from actgrad.training.engine import train_batched
from actgrad.training.networks import LECTURE_NETWORKS
from actgrad.training.progress import ProgressLog, duration
from actgrad.training.stats import StatsPlan, StatsRecorder

SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 100, "lr": 0.01}]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \[job\] (run \d/\d )?step ([\d,]+)/([\d,]+)  "
                  r"loss (\S+)( \((\S+)–(\S+)\))?  lr (\S+)  ([\d,]+) model-steps/s  ETA (\S+)$")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0, 45.4, 137, 3600 + 125, float("inf"))] == ["0s", "45s", "2m17s", "1h02m", "?"]


def test_a_line_has_the_time_the_step_the_loss_range_the_rate_and_the_eta():
    clock, lines = Clock(), []
    log = ProgressLog(lines.append, total_steps=200000, n_models=5, every=10000, label="deep_gain1", clock=clock,
                      now=lambda: datetime(2026, 11, 29, 19, 40, 3))
    clock.t = 10000 * 5 / 6950
    log.report(10000, [2.31, 2.27, 2.36, 2.30, 2.31], 0.1)
    assert lines == ["2026-11-29 19:40:03 [deep_gain1] step 10,000/200,000  loss 2.31 (2.27–2.36)  lr 0.1  "
                     "6,950 model-steps/s  ETA 2m17s"]


def test_lines_are_due_every_so_many_steps_and_at_the_end():
    log = ProgressLog(print, total_steps=250, every=100)
    assert log.due_between(0, 100) == [100] and log.due_between(100, 199) == []
    assert log.due_between(200, 250) == [250] and log.due_between(0, 250) == [100, 200, 250]
    with pytest.raises(ValueError, match="every"):
        ProgressLog(print, total_steps=10, every=0)


def test_the_batched_engine_logs_its_runs_losses_at_the_interval(splits):
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = zip(*[reference.init_network(LECTURE_NETWORKS["shallow"], seed, 3) for seed in (1, 2, 3)])
    lines = []
    progress = ProgressLog(lines.append, total_steps=230, n_models=3, every=50, label="job")
    results = train_batched(list(nets), list(gens), Xtr, Ytr, steps=230, batch_size=32, lr_schedule=SCHEDULE,
                            progress=progress, divergence_check_every=25)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(3).replace(",", "")) for m in parsed] == [50, 100, 150, 200, 230]
    for m in parsed:
        step = int(m.group(3).replace(",", ""))
        at = torch.stack([r.losses[step - 1] for r in results])
        assert m.group(4) == "230" and m.group(2) is None
        assert float(m.group(5)) == pytest.approx(at.mean().item(), abs=0.006)
        assert (float(m.group(7)), float(m.group(8))) == pytest.approx((at.min().item(), at.max().item()), abs=0.006)
        assert float(m.group(9)) == reference.learning_rate(SCHEDULE, step - 1)
        assert int(m.group(10).replace(",", "")) > 0
    assert parsed[-1].group(11) == "0s"


def test_the_reference_loop_logs_each_run_in_turn(splits):
    Xtr, Ytr = splits["splits"]["train"]
    nets, gens = zip(*[reference.init_network(LECTURE_NETWORKS["shallow"], seed, 3) for seed in (1, 2)])
    lines = []
    progress = ProgressLog(lines.append, total_steps=100, n_models=2, every=50, label="job")
    recorders = [StatsRecorder(StatsPlan(every=50, update_every=50, histogram_every=50, snapshot_steps=(), bins=5))
                 for _ in nets]
    results = reference.train_reference_runs(list(nets), list(gens), Xtr, Ytr, steps=100, batch_size=32,
                                         lr_schedule=SCHEDULE, recorders=recorders, progress=progress)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(2), m.group(3)) for m in parsed] == [("run 1/2 ", "50"), ("run 1/2 ", "100"),
                                                          ("run 2/2 ", "50"), ("run 2/2 ", "100")]
    assert float(parsed[2].group(5)) == pytest.approx(results[1].losses[49].item(), abs=0.006)
    assert all(not rec.stats_frame().empty for rec in recorders)
