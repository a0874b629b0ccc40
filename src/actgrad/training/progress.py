"""Progress lines while a training job runs: ``tail -f logs/train/*.log`` shows where it is and when it ends.

Both engines call :meth:`ProgressLog.report` every ``every`` steps with the minibatch losses they
already read back for their divergence check, so a line costs no extra work on the device.
"""

from __future__ import annotations

import math
import time
from datetime import datetime


def duration(seconds: float) -> str:
    """``45s``, ``2m17s``, ``1h02m``: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    """One timestamped line per ``every`` steps for a job of ``n_models`` runs of ``total_steps`` each, and at
    most one per ``min_seconds`` (a run's last step always gets its line): ``progress_every: 1`` is a line a
    second, not one per step.

    The batched engine trains its runs side by side and reports all their losses at once; the
    reference loop trains them one after another and calls :meth:`start_run` before each.
    """

    def __init__(self, log, total_steps: int, n_models: int = 1, every: int = 10000, label: str = "",
                 clock=time.perf_counter, now=datetime.now, min_seconds: float = 0.0):
        if every < 1:
            raise ValueError(f"progress every must be at least 1 step, not {every}")
        self.min_seconds = min_seconds
        self.last_logged = -math.inf  # when the last line was logged (clock)
        self.log, self.total_steps, self.n_models, self.every = log, total_steps, n_models, every
        self.prefix = f"[{label}] " if label else ""
        self.clock, self.now = clock, now
        self.started = clock()
        self.model_steps = 0  # done so far, over every run of the job
        self.runs_started = 0  # by start_run (the reference loop); 0 while the batched engine trains
        self.last_step = 0

    def start_run(self) -> None:
        self.runs_started += 1
        self.last_step = 0

    def due(self, steps_done: int) -> bool:
        return steps_done % self.every == 0 or steps_done == self.total_steps

    def due_between(self, after: int, upto: int) -> list[int]:
        """The step counts in (after, upto] that get a line."""
        due = list(range((after // self.every + 1) * self.every, upto + 1, self.every))
        if after < self.total_steps <= upto and self.total_steps not in due:
            due.append(self.total_steps)
        return due

    def report(self, steps_done: int, losses, lr: float) -> str:
        """Log (and return) the line for ``steps_done`` steps, with each running model's latest minibatch loss."""
        losses = [float(v) for v in losses]
        self.model_steps += (steps_done - self.last_step) * len(losses)
        self.last_step = steps_done
        elapsed = self.clock() - self.started
        rate = self.model_steps / elapsed if elapsed > 0 else float("nan")
        remaining = (self.total_steps - steps_done) * len(losses)
        if self.runs_started:
            remaining += (self.n_models - self.runs_started) * self.total_steps
        run = f" run {self.runs_started}/{self.n_models}" if self.runs_started and self.n_models > 1 else ""
        loss = _mean_and_range(losses)
        line = (f"{self.now():%Y-%m-%d %H:%M:%S} {self.prefix}{run.strip()}{' ' if run else ''}"
                f"step {steps_done:,}/{self.total_steps:,}  loss {loss}  lr {lr:g}  "
                f"{rate:,.0f} model-steps/s  ETA {duration(remaining / rate if rate > 0 else math.inf)}")
        if steps_done == self.total_steps or self.clock() - self.last_logged >= self.min_seconds:
            self.last_logged = self.clock()
            self.log(line)
        return line


def _mean_and_range(losses: list[float]) -> str:
    if not losses:
        return "-"
    mean = sum(losses) / len(losses)
    if len(losses) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(losses):.2f}–{max(losses):.2f})"
