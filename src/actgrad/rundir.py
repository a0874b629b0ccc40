"""The run directory: where one run's files live, what each holds, and how to read them back.

A run is one seed of one variant, in ``{results}/runs/{variant}/seed{seed}/``:

``metrics.json``       the run's figures (losses, saturation, status, snapshot step, timing)
``losses.parquet``     every step's minibatch loss (and the sensitivity twin's, if any)
``stats.parquet``      tidy statistics: step, layer, kind, stat, value
``histograms.parquet`` tidy histograms: step, layer, kind, bin_left, bin_right, fraction
``saturation.npz``     |h| > 0.99 over the first minibatch, per activation layer (step 0)
``params.pt``          the trained network's state_dict
``samples.txt``        names sampled from the trained network

The training job writes them (:mod:`actgrad.training.job`), ``metrics.json`` last: it marks the run
complete. The workflow's rules, the summary and the figures find them through this module.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from actgrad.data import DataError

RUN_FILES = ("metrics.json", "losses.parquet", "stats.parquet", "histograms.parquet", "saturation.npz",
             "params.pt", "samples.txt")
METRICS = "metrics.json"
# What every training job writes into metrics.json and every reader of a run relies on: a file without one
# of them was not written by a finished job (or was edited). The summary needs more (SUMMARY_METRICS).
REQUIRED_METRICS = ("variant", "seed", "steps")
SUMMARY_METRICS = REQUIRED_METRICS + ("model", "status", "steps_done", "train_loss", "val_loss")


class RunFileError(DataError):
    """A run's file is missing or cannot be read; the message names it and how to get it back."""


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """A table as the pipeline stores it (a run's tables and the study's): parquet, without the index."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def run_dir(results: str | os.PathLike, variant: str, seed: int) -> Path:
    return Path(results) / "runs" / variant / f"seed{seed}"


def run_files(results: str | os.PathLike, variant: str, seeds, files=RUN_FILES) -> list[str]:
    """The paths of ``files`` of every seed of a variant, seed by seed (what one training job writes)."""
    unknown = set(files) - set(RUN_FILES)
    if unknown:
        raise ValueError(f"not a run file: {sorted(unknown)}; a run has {RUN_FILES}")
    variant_dir = str(Path(results) / "runs" / variant)  # joined once: a sweep's plan asks for 10^5 paths
    return [f"{variant_dir}/seed{seed}/{f}" for seed in seeds for f in files]


LECTURE_SNAPSHOT = 1000  # the step the lecture's diagnostic plots show


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def pick_snapshot(steps, last_step=None, target: int = LECTURE_SNAPSHOT):
    """The lecture's step 1,000 if recorded, else the configured snapshot nearest to it, else the last."""
    steps = sorted({int(s) for s in steps if int(s) > 0})
    if not steps:
        return None
    if target in steps:
        return target
    middle = [s for s in steps if s != last_step] or steps
    return min(middle, key=lambda s: abs(s - target))


def _unreadable(path: Path, cause) -> RunFileError:
    return RunFileError(f"{path}: {cause}; delete {path.parent.parent} and rerun the workflow to train it again")


@dataclass
class Run:
    """One run directory; ``metrics`` is read at once, every other file when asked for."""

    path: Path
    metrics: dict

    @classmethod
    def read(cls, path: str | os.PathLike, required=REQUIRED_METRICS) -> Run:
        """The run in directory ``path``, or the run that a file ``path`` belongs to; its ``metrics.json`` must
        hold the keys ``required``."""
        path = Path(path)
        directory = path.parent if path.name in RUN_FILES else path
        metrics_path = directory / METRICS
        try:
            metrics = json.loads(metrics_path.read_text())
        except FileNotFoundError:
            raise _unreadable(metrics_path, "missing") from None
        except (OSError, ValueError) as e:
            raise _unreadable(metrics_path, f"not valid JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise _unreadable(metrics_path, "not a JSON object")
        missing = [key for key in required if key not in metrics]
        if missing:
            raise _unreadable(metrics_path, f"lacks {', '.join(map(repr, missing))}, which every finished "
                                            "training job writes")
        return cls(directory, metrics)

    @property
    def variant(self) -> str:
        return str(self.metrics.get("variant", self.path.parent.name))

    @property
    def seed(self) -> int:
        return int(self.metrics.get("seed", -1))

    @property
    def diverged_at(self) -> int | None:
        return self.metrics.get("diverged_at")

    @property
    def snapshot_step(self) -> int | None:
        """The step the diagnostic figures and the report show beside step 0.

        The training job records it; for a run written before it did, it is picked the same way
        from the steps that have full snapshots (the pre-activations are recorded only there).
        """
        if "snapshot_step" in self.metrics:
            return self.metrics["snapshot_step"]
        stats = self.stats()
        snapshots = stats[stats.kind == "preactivation"].step.unique()
        steps = self.metrics.get("steps")
        return pick_snapshot(snapshots, last_step=int(steps) - 1 if steps else None)

    def file(self, name: str) -> Path:
        if name not in RUN_FILES:
            raise ValueError(f"not a run file: {name!r}; a run has {RUN_FILES}")
        path = self.path / name
        if not path.exists():
            raise _unreadable(path, "missing")
        return path

    def _parquet(self, name: str) -> pd.DataFrame:
        path = self.file(name)
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several kinds for a truncated or foreign file
            raise _unreadable(path, f"not a readable parquet file ({type(e).__name__}: {e})") from None

    def losses(self) -> pd.DataFrame:
        return self._parquet("losses.parquet")

    def stats(self) -> pd.DataFrame:
        return self._parquet("stats.parquet")

    def histograms(self) -> pd.DataFrame:
        return self._parquet("histograms.parquet")

    def saturation(self) -> dict[str, np.ndarray]:
        path = self.file("saturation.npz")
        try:
            with np.load(path) as z:
                return {k: z[k] for k in sorted(z.files, key=natural_key)}
        except Exception as e:  # a truncated zip raises BadZipFile, EOFError or ValueError
            raise _unreadable(path, f"not a readable .npz file ({type(e).__name__}: {e})") from None

    def samples(self) -> list[str]:
        try:
            text = self.file("samples.txt").read_text()
        except UnicodeDecodeError as e:
            raise _unreadable(self.path / "samples.txt", f"not text ({e})") from None
        return [s for s in text.splitlines() if s.strip()]


def read_runs(paths, required=REQUIRED_METRICS) -> list[Run]:
    """The distinct runs that a list of run files (or run directories) belong to, in order (each with the
    metrics ``required``)."""
    runs, seen = [], set()
    for p in paths:
        p = Path(p)
        directory = p.parent if p.name in RUN_FILES else p
        if directory not in seen:
            seen.add(directory)
            runs.append(Run.read(directory, required))
    return runs
