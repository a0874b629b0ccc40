"""What the workflow's scripts call: each stage as one function of paths and settings.

``workflow/scripts/*.py`` stay two lines long; :func:`as_step` gives every stage the same
behaviour: its messages go to the rule's log *and* the terminal, and any failure ends the
step with one line, ``error: <rule>: <what went wrong>`` (``<rule>[<wildcards>]`` for a job of a
wildcard rule, e.g. ``train[fix_tanh]``), in both. A known problem (bad data,
bad config) is that line alone; anything else also leaves its traceback in the log, for a
developer, and an input file that cannot be read is named with the command that fixes it.

:func:`forward_interrupts_to_jobs` runs in the Snakemake process itself (the workflow calls
it): it makes ``kill -INT <snakemake>`` stop the running jobs, as Ctrl-C in a terminal does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

from actgrad.data import DataError
from actgrad.study.settings import ConfigError

KNOWN_PROBLEMS = (DataError, ConfigError)
# Input files that can be checked by reading them whole: what the pipeline's own steps wrote.
CHECKED_SUFFIXES = (".parquet", ".json", ".npz", ".pt", ".csv")
RUN_DIR = re.compile(r"^(?P<dir>(?:.*/)?runs/[^/]+/seed-?\d+)/[^/]+$")


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()

    def flush(self):
        for s in self.streams:
            s.flush()


class Stopped(BaseException):
    """The step got SIGINT or SIGTERM: a BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signal(signum, frame):
    # A terminal's Ctrl-C reaches the job twice (from the terminal and forwarded by Snakemake):
    # the second must not interrupt the step's last words.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unreadable(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` cannot be read as what its name says, or None if it can."""
    path = Path(path)
    suffix = path.suffix
    if suffix not in CHECKED_SUFFIXES or not path.is_file():
        return None
    try:
        if path.stat().st_size == 0 and suffix != ".csv":  # an empty table is a valid (empty) CSV
            return "the file is empty"
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_table(path)
        elif suffix == ".json":
            json.loads(path.read_bytes())
        elif suffix == ".npz":
            import numpy as np

            with np.load(path) as archive:
                for key in archive.files:
                    archive[key]
        elif suffix == ".pt":
            import torch

            torch.load(path, weights_only=True)
        elif suffix == ".csv":
            import pandas as pd

            if path.read_bytes().strip():
                pd.read_csv(path)
    except Exception as e:  # whatever the reader says is the reason
        return one_line(f"{type(e).__name__}: {e}", 200)
    return None


def fix_for(path: str) -> str:
    """The command that brings back a lost or corrupt output of the pipeline."""
    run = RUN_DIR.match(Path(path).as_posix())
    target = run.group("dir") if run else path
    return f"to make it anew: rm -r {target}, then run snakemake again"


def diagnose(inputs) -> str | None:
    """The first input that cannot be read, with what to do about it."""
    for path in inputs:
        why = unreadable(path)
        if why:
            return f"{path} is corrupt ({why}); {fix_for(str(path))}"
    return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """On Linux, have the kernel send this process ``sig`` when the process that started it ends: a step that
    Snakemake runs locally then stops when Snakemake is killed (``kill -9``, a closed terminal) instead of
    training on as an orphan. Returns whether it could be arranged (not on macOS or Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have ended before the request was made: then there is no one left to wait for.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True


def _parent_ended(parent: int, wait: float = 1.0) -> bool:
    """Whether the process ``parent`` that started this one has ended (this one is reparented). The kernel sends
    the death signal when the thread that started us ends, before the rest of its process may have: wait a
    little for the whole process to go."""
    import time

    deadline = time.monotonic() + wait
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def as_step(snakemake, fn) -> None:
    """Run ``fn(log)`` as a workflow step, logging to the rule's log file.

    A step Snakemake runs on this machine stops with Snakemake (:func:`die_with_parent`), as SIGTERM does.
    """
    step = getattr(snakemake, "rule", None) or "step"
    wildcards = [str(value) for value in getattr(snakemake, "wildcards", None) or []]
    if wildcards:  # which job of the rule: train[fix_tanh]
        step = f"{step}[{','.join(wildcards)}]"
    log_path = Path(snakemake.log[0]) if snakemake.log else None
    log_file = None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")
    out = _Tee(sys.stderr, *([log_file] if log_file else []))

    def log(message: str) -> None:
        out.write(message + "\n")

    def fail(problem: str, details: str | None = None):
        if details and log_file:
            log_file.write(details)
            log_file.flush()
        log(f"error: {step}: {problem}")

    main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    parent = os.getppid()
    if main:
        die_with_parent()
    stopped_by = None
    try:
        fn(log)
    except KNOWN_PROBLEMS as e:
        fail(str(e))
        sys.exit(1)
    except (Stopped, KeyboardInterrupt) as e:
        stopped_by = getattr(e, "signum", signal.SIGINT)
        if stopped_by == signal.SIGTERM and _parent_ended(parent):  # from die_with_parent: nobody cleans up
            fail(f"stopped by {signal.Signals(stopped_by).name}: the Snakemake that ran it ended; run snakemake "
                 "again to redo the step (it reruns incomplete outputs)")
        else:
            fail(f"stopped by {signal.Signals(stopped_by).name}; its unfinished outputs are removed, "
                 "run again to redo it")
    except MemoryError:
        fail("ran out of memory; give the job more (resources.train_mem_mb for training) or make it smaller",
             traceback.format_exc())
        sys.exit(1)
    except Exception as e:  # anything unforeseen still ends in one line
        where = f" (the traceback is in {log_path})" if log_path else ""
        problem = diagnose(list(getattr(snakemake, "input", []) or []))
        fail(problem or f"{one_line(f'{type(e).__name__}: {e}')}{where}", traceback.format_exc())
        sys.exit(1)
    finally:
        if log_file:
            log_file.close()
        for sig, handler in previous.items():
            if stopped_by is None and handler is not None:
                signal.signal(sig, handler)
    if stopped_by is not None:
        # Die of the signal, as the step would have without us: Snakemake reports it as such.
        signal.signal(stopped_by, signal.SIG_DFL)
        os.kill(os.getpid(), stopped_by)


def _signal_children(sig: int) -> None:
    try:
        import psutil  # a dependency of Snakemake, in whose process this runs
    except ImportError:  # pragma: no cover
        return
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
        except psutil.Error:  # already gone
            pass


def forward_interrupts_to_jobs() -> None:
    """In the Snakemake process: on SIGINT, send SIGINT to every running job, then stop as before.

    Snakemake's local executor runs each ``script:`` job as a child process and, on SIGINT,
    waits for the running ones to end by themselves: a training job would finish its whole
    run first. A terminal's Ctrl-C reaches the jobs too (they share its process group), but
    ``kill -INT`` on Snakemake alone does not; this makes the two the same.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        _signal_children(signal.SIGINT)
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
