"""One CPU-bound training job per CPU: jobs beyond the machine's CPUs wait instead of time-sharing.

``snakemake --cores 4`` on a 2-CPU machine starts four single-threaded training jobs. They
share the two CPUs by time-slicing, and every switch evicts the other job's working set from
the CPU's caches: measured here, four deep BatchNorm jobs on two CPUs each ran 8 % slower
(in CPU time) than two. :func:`cpu_slot` makes a job claim as many CPUs as it runs threads,
with one lock file per CPU; a job that finds none free waits (asleep) until one is released.
A lock is released when its holder exits, however it exits.

Only the CPUs this process may run on count (``os.sched_getaffinity``), so two cluster jobs
that the scheduler gave disjoint CPUs on one node never wait for each other. Set
``ACTGRAD_CPU_SLOTS=off`` to switch the claiming off.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no claiming
    fcntl = None

ENV_SWITCH = "ACTGRAD_CPU_SLOTS"


def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover


def default_lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"actgrad-cpu-slots-{uid}"


@contextmanager
def cpu_slot(threads: int = 1, *, cpus: list[int] | None = None, lock_dir: str | os.PathLike | None = None,
             log=print, poll_seconds: float = 0.5):
    """Hold ``threads`` of the usable CPUs (all of them, if fewer) for the duration of the block."""
    if fcntl is None or os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
        yield []
        return
    cpus = usable_cpus() if cpus is None else list(cpus)
    need = max(1, min(int(threads), len(cpus)))
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: list[tuple[int, object]] = []
    waited_since = None
    try:
        while True:
            for cpu in cpus:
                f = open(lock_dir / f"cpu{cpu}.lock", "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    continue
                held.append((cpu, f))
                if len(held) == need:
                    break
            if len(held) == need:
                break
            # All or nothing: holding some CPUs while waiting for more could deadlock two jobs.
            _release(held)
            if waited_since is None:
                waited_since = time.monotonic()
                log(f"waiting for a free CPU: all {len(cpus)} are running other training jobs")
            time.sleep(poll_seconds)
        if waited_since is not None:
            log(f"got CPU(s) {[c for c, _ in held]} after {time.monotonic() - waited_since:.0f} s")
        yield [c for c, _ in held]
    finally:
        _release(held)


def _release(held: list) -> None:
    for _, f in held:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
    held.clear()
