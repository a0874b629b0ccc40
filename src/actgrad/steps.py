"""What the workflow's scripts call: each stage as one function of paths and settings.

``workflow/scripts/*.py`` stay two lines long; :func:`as_step` gives every stage the same
behaviour: its messages go to the rule's log *and* the terminal, and a known problem
(bad data, bad config) ends the step with one line that names it, not a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ConfigError
from .data import DataError

KNOWN_PROBLEMS = (DataError, ConfigError)


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


def as_step(snakemake, fn) -> None:
    """Run ``fn(log)`` as a workflow step, logging to the rule's log file."""
    log_path = Path(snakemake.log[0]) if snakemake.log else None
    log_file = None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")
    out = _Tee(sys.stderr, *([log_file] if log_file else []))

    def log(message: str) -> None:
        out.write(message + "\n")

    try:
        fn(log)
    except KNOWN_PROBLEMS as e:
        log(f"error: {e}")
        sys.exit(1)
    finally:
        if log_file:
            log_file.close()
