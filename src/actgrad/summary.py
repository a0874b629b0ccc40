"""From the runs to the tables: per run, per variant over seeds, significance, and the reference check.

The summary reads only what the runs wrote; the report reads only what the summary writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .config import variant_spec

LECTURE_SEED = 2147483647
RUN_COLUMNS = ["variant", "seed", "model", "batchnorm", "steps", "steps_done", "status", "diverged_at",
               "step0_loss", "init_loss", "expected_init_loss", "train_loss", "val_loss", "test_loss",
               "train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated",
               "sat97_init", "sat97_final", "sat99_init", "sat99_final", "twin_final_abs_delta", "seconds"]
SPREAD_METRICS = ["step0_loss", "init_loss", "train_loss", "val_loss", "test_loss", "sat97_init", "sat97_final",
                  "sat99_init", "sat99_final"]
ALPHA = 0.05


def run_table(metrics_paths: list[str | os.PathLike]) -> pd.DataFrame:
    rows = [json.loads(Path(p).read_text()) for p in metrics_paths]
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df:
            df[col] = np.nan
    return df[RUN_COLUMNS + [c for c in df.columns if c not in RUN_COLUMNS]]


def lecture_seed_of(seeds) -> int:
    seeds = list(seeds)
    return LECTURE_SEED if LECTURE_SEED in seeds else seeds[0]


def variant_table(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds (runs that finished), and the lecture seed's value."""
    rows = []
    for variant in order:
        sub = runs[runs.variant == variant]
        ok = sub[sub.status == "ok"]
        lecture = sub[sub.seed == lecture_seed_of(sub.seed)]
        row = {"variant": variant, "model": sub.model.iloc[0], "seeds": len(sub), "diverged": int((sub.status ==
                                                                                                   "diverged").sum())}
        for m in SPREAD_METRICS:
            values = ok[m].astype(float)
            row[f"{m}_mean"] = values.mean() if len(values) else np.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{m}_lecture_seed"] = float(lecture[m].iloc[0]) if len(lecture) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def default_comparisons(config: dict) -> list[tuple[str, str]]:
    """Each variant against the one before it of the same model, in the config's order (the lecture's steps)."""
    pairs, last = [], {}
    for name in config["variants"]:
        model = variant_spec(config, name)["model"]
        if model in last:
            pairs.append((last[model], name))
        last[model] = name
    return pairs


def significance_table(runs: pd.DataFrame, pairs: list[tuple[str, str]], metric: str = "val_loss") -> pd.DataFrame:
    """Welch's t-test over seeds: is the difference in ``metric`` larger than the seed-to-seed noise?"""
    # Imported here, not with the module: the report uses this module's helpers and tests nothing,
    # and scipy.stats takes half a second of CPU to import.
    from scipy import stats as scipy_stats

    rows = []
    for before, after in pairs:
        a = runs[(runs.variant == before) & (runs.status == "ok")][metric].astype(float).to_numpy()
        b = runs[(runs.variant == after) & (runs.status == "ok")][metric].astype(float).to_numpy()
        row = {"before": before, "after": after, "metric": metric, "n_before": len(a), "n_after": len(b),
               "mean_before": a.mean() if len(a) else np.nan, "mean_after": b.mean() if len(b) else np.nan}
        row["difference"] = row["mean_after"] - row["mean_before"]
        if len(a) >= 2 and len(b) >= 2 and (a.std() > 0 or b.std() > 0):
            t, p = scipy_stats.ttest_ind(b, a, equal_var=False)
            row.update(t=float(t), p_value=float(p), significant=bool(p < ALPHA),
                       verdict=("real difference" if p < ALPHA else "within seed noise") + f" (p = {p:.3g})")
        else:
            row.update(t=np.nan, p_value=np.nan, significant=np.nan,
                       verdict="needs at least 2 seeds per variant")
        rows.append(row)
    return pd.DataFrame(rows)


def _round_eq(ours: float, ref: float, precision: int) -> bool:
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return False
    return round(float(ours), precision) == round(float(ref), precision)


def reference_table(config: dict, runs: pd.DataFrame, results: str | os.PathLike) -> pd.DataFrame:
    """One row per printed reference number: ours next to it, and whether they agree at its precision."""
    rows = []
    for name, variant in config["variants"].items():
        refs = variant.get("references") or []
        if not refs:
            continue
        seed = lecture_seed_of(variant_spec(config, name)["seeds"])
        run = runs[(runs.variant == name) & (runs.seed == seed)]
        if run.empty:
            continue
        run = run.iloc[0]
        losses = None
        for ref in refs:
            precision = int(ref.get("precision", 4))
            chaotic_after = ref.get("chaotic_after_step")
            calibrated = ref.get("evaluation", "running") == "calibrated"
            items = []
            for step, value in sorted(ref.get("step_losses", {}).items(), key=lambda kv: int(kv[0])):
                if losses is None:
                    losses = pd.read_parquet(Path(results) / "runs" / name / f"seed{seed}" / "losses.parquet")
                step = int(step)
                ours = float(losses.loss.iloc[step]) if step < len(losses) else np.nan
                items.append(("minibatch loss", step, ours, value, step < int(run.steps_done)))
            for quantity in ("init_loss", "train_loss", "val_loss"):
                if quantity in ref:
                    column = f"{quantity}_calibrated" if calibrated and quantity != "init_loss" else quantity
                    final_step = int(run.steps) - 1 if quantity != "init_loss" else 0
                    label = quantity.replace("_", " ") + (" (calibrated BN)" if column.endswith("calibrated") else "")
                    # A final loss is only comparable after as many steps as the source trained.
                    full_length = int(run.steps) == int(ref.get("steps", 200000)) or quantity == "init_loss"
                    items.append((label, final_step, float(run[column]), ref[quantity], full_length))
            for quantity, step, ours, value, compared in items:
                chaotic = chaotic_after is not None and step > int(chaotic_after)
                rows.append({
                    "variant": name, "seed": seed, "quantity": quantity, "step": step, "ours": ours,
                    "reference": float(value), "difference": ours - float(value), "precision": precision,
                    "match": _round_eq(ours, value, precision), "chaotic": chaotic, "source": ref["source"],
                    "compared": compared,
                })
    columns = ["variant", "seed", "quantity", "step", "ours", "reference", "difference", "precision", "match",
               "chaotic", "source", "compared"]
    return pd.DataFrame(rows, columns=columns)


def write_summary(config: dict, metrics_paths, results: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write summary.csv, variants.csv, significance.csv and reference_check.csv into ``out_dir``."""
    from .data import atomic_write_bytes

    runs = run_table(metrics_paths)
    order = list(config["variants"])
    tables = {
        "summary.csv": runs,
        "variants.csv": variant_table(runs, order),
        "significance.csv": significance_table(runs, default_comparisons(config)),
        "reference_check.csv": reference_table(config, runs, results),
    }
    for filename, df in tables.items():
        atomic_write_bytes(Path(out_dir) / filename, df.to_csv(index=False).encode())
    return tables
