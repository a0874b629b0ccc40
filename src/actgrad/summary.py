"""From the runs to the tables: every number the report shows is computed here.

Per run, per variant over seeds, significance, the reference check, the deep networks layer by
layer, the lecture seed's samples, and the study's statistics and histograms in one tidy table
each. The summary reads only what the runs wrote (through :mod:`actgrad.rundir`); the report
reads only what the summary and the figure step write.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .config import variant_spec
from .conventions import EXPECTED_INIT_LOSS, natural_key
from .data import atomic_write_bytes
from .rundir import Run, read_runs

LECTURE_SEED = 2147483647
RUN_COLUMNS = ["variant", "seed", "model", "batchnorm", "steps", "steps_done", "status", "diverged_at",
               "step0_loss", "init_loss", "expected_init_loss", "train_loss", "val_loss", "test_loss",
               "train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated",
               "sat97_init", "sat97_final", "sat99_init", "sat99_final", "twin_final_abs_delta", "seconds"]
SPREAD_METRICS = ["step0_loss", "init_loss", "train_loss", "val_loss", "test_loss", "sat97_init", "sat97_final",
                  "sat99_init", "sat99_final"]
# Measured before the first step: a run that diverged later still has them.
BEFORE_TRAINING = {"step0_loss", "init_loss", "sat97_init", "sat99_init"}
ALPHA = 0.05
# The variant's settings that the study-level tables carry beside every row.
STUDY_SETTINGS = ("model", "batchnorm", "gain", "activation")
# What the summary writes: the keys write_summary takes, and each file's name under results/.
TABLES = {
    "summary": "summary.csv", "variants": "variants.csv", "significance": "significance.csv",
    "references": "reference_check.csv", "deep_layers": "deep_layers.csv", "deep_variants": "deep_variants.csv",
    "samples": "samples.csv", "stats": "stats.parquet", "histograms": "histograms.parquet",
}
# A deep net's gradient at the first tanh layer against the last one's, at step 0.
VANISHING_BELOW, EXPLODING_ABOVE = 0.5, 2.0


def run_table(runs: list[Run]) -> pd.DataFrame:
    df = pd.DataFrame([r.metrics for r in runs])
    for col in RUN_COLUMNS:
        if col not in df:
            df[col] = np.nan
    return df[RUN_COLUMNS + [c for c in df.columns if c not in RUN_COLUMNS]]


def lecture_seed_of(seeds) -> int:
    seeds = list(seeds)
    return LECTURE_SEED if LECTURE_SEED in seeds else seeds[0]


def lecture_run(runs: list[Run]) -> Run:
    seed = lecture_seed_of([r.seed for r in runs])
    return next(r for r in runs if r.seed == seed)


def variant_table(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds, and the lecture seed's value.

    A number measured before training is over every seed; one measured after, over the runs that finished.
    """
    rows = []
    for variant in order:
        sub = runs[runs.variant == variant]
        ok = sub[sub.status == "ok"]
        lecture = sub[sub.seed == lecture_seed_of(sub.seed)]
        row = {"variant": variant, "model": sub.model.iloc[0], "seeds": len(sub), "diverged": int((sub.status ==
                                                                                                   "diverged").sum())}
        for m in SPREAD_METRICS:
            values = (sub if m in BEFORE_TRAINING else ok)[m].astype(float).dropna()
            row[f"{m}_mean"] = values.mean() if len(values) else np.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{m}_lecture_seed"] = float(lecture[m].iloc[0]) if len(lecture) else np.nan
        row["init_loss_gap"] = row["init_loss_mean"] - EXPECTED_INIT_LOSS  # above the uniform guess's loss
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


def reference_table(config: dict, runs: pd.DataFrame, run_of: dict[tuple[str, int], Run]) -> pd.DataFrame:
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
            precision = int(ref["precision"])
            chaotic_after = ref.get("chaotic_after_step")
            calibrated = ref["evaluation"] == "calibrated"
            items = []
            for step, value in sorted(ref.get("step_losses", {}).items(), key=lambda kv: int(kv[0])):
                if losses is None:
                    losses = run_of[(name, seed)].losses()
                step = int(step)
                ours = float(losses.loss.iloc[step]) if step < len(losses) else np.nan
                items.append(("minibatch loss", step, ours, value, step < int(run.steps_done)))
            for quantity in ("init_loss", "train_loss", "val_loss"):
                if quantity in ref:
                    column = f"{quantity}_calibrated" if calibrated and quantity != "init_loss" else quantity
                    final_step = int(run.steps) - 1 if quantity != "init_loss" else 0
                    label = quantity.replace("_", " ") + (" (calibrated BN)" if column.endswith("calibrated") else "")
                    # A final loss is only comparable after as many steps as the source trained.
                    full_length = int(run.steps) == int(ref["steps"]) or quantity == "init_loss"
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


def _finite(stats: pd.DataFrame) -> pd.DataFrame:
    return stats[np.isfinite(stats.value.astype(float))]


def gradient_verdict(ratio: float) -> str:
    if not math.isfinite(ratio):
        return ""
    return ("vanishing towards the input" if ratio < VANISHING_BELOW else
            "exploding towards the input" if ratio > EXPLODING_ABOVE else "stable")


def deep_tables(config: dict, runs_by_variant: dict[str, list[Run]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The deep networks layer by layer, over seeds: ``deep_layers`` (tidy: variant, layer, step, stat, value)
    and ``deep_variants`` (one row per deep variant).

    Per layer: the saturated share at the snapshot step (the one the figures show, recorded by the lecture
    seed's run) and at the last step, and the gradient's std at step 0. Per variant: the first tanh layer's
    gradient against the last one's and the verdict, the median log10 update:data ratio of the weights over
    every recorded step, and the dead units (summed over layers) at init and at the end.
    """
    layer_rows, variant_rows = [], []
    for name in config["variants"]:
        runs = runs_by_variant.get(name, [])
        if not runs or variant_spec(config, name)["model"] != "deep":
            continue
        stats = _finite(pd.concat([r.stats().assign(seed=r.seed) for r in runs], ignore_index=True))
        act = stats[stats.kind == "activation"]
        last = int(act.step.max()) if len(act) else None
        snapshot = lecture_run(runs).snapshot_step
        saturated = act[act.stat == "saturated_pct"]
        for step in dict.fromkeys(s for s in (snapshot, last) if s is not None):
            per_layer = saturated[saturated.step == step].groupby("layer").value.mean()
            layer_rows += [(name, layer, step, "saturated_pct", per_layer[layer])
                           for layer in sorted(per_layer.index, key=natural_key)]
        grads = stats[(stats.kind == "activation_grad") & (stats.stat == "std") & (stats.step == 0)]
        grads = grads.groupby("layer").value.mean()
        order = sorted(grads.index, key=natural_key)
        layer_rows += [(name, layer, 0, "activation_grad_std", grads[layer]) for layer in order]
        first, final = (float(grads[order[0]]), float(grads[order[-1]])) if order else (np.nan, np.nan)
        ratio = first / final if math.isfinite(first) and math.isfinite(final) and final > 0 else np.nan
        weights = set(stats[stats.kind == "weight_grad"].layer)
        updates = stats[(stats.kind == "update") & stats.layer.isin(weights)].value
        dead = act[act.stat == "dead_units"]
        variant_rows.append({
            "variant": name, "snapshot_step": snapshot, "last_step": last,
            "grad_std_first": first, "grad_std_last": final, "grad_ratio": ratio,
            "grad_verdict": gradient_verdict(ratio),
            "update_log10_median": updates.median() if len(updates) else np.nan,
            "dead_units_init": dead[dead.step == 0].groupby("seed").value.sum().mean(),
            "dead_units_last": dead[dead.step == last].groupby("seed").value.sum().mean() if last is not None
            else np.nan,
        })
    layers = pd.DataFrame(layer_rows, columns=["variant", "layer", "step", "stat", "value"])
    columns = ["variant", "snapshot_step", "last_step", "grad_std_first", "grad_std_last", "grad_ratio",
               "grad_verdict", "update_log10_median", "dead_units_init", "dead_units_last"]
    return layers, pd.DataFrame(variant_rows, columns=columns)


def samples_table(config: dict, runs_by_variant: dict[str, list[Run]]) -> pd.DataFrame:
    """The names the lecture seed's run of each variant sampled (none for a run that diverged)."""
    rows = []
    for name in config["variants"]:
        if runs_by_variant.get(name):
            run = lecture_run(runs_by_variant[name])
            rows += [(name, run.seed, sample) for sample in run.samples()]
    return pd.DataFrame(rows, columns=["variant", "seed", "name"])


def study_frame(config: dict, runs: list[Run], read) -> pd.DataFrame:
    """Every run's rows of one tidy table (``read``: Run.stats or Run.histograms), with the run's variant,
    seed and its variant's main settings as the first columns: one table for the whole study."""
    settings = {name: variant_spec(config, name) for name in config["variants"]}
    frames = []
    for r in runs:
        frame = read(r)
        spec = settings[r.variant]
        labels = {"variant": r.variant, "seed": r.seed, **{key: spec[key] for key in STUDY_SETTINGS}}
        for i, (key, value) in enumerate(labels.items()):
            frame.insert(i, key, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def write_summary(config: dict, run_paths, outputs: dict[str, str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """Read the runs that ``run_paths`` belong to and write every table of :data:`TABLES` to its path in
    ``outputs`` (table name -> path)."""
    missing = set(TABLES) - set(outputs)
    if missing:
        raise ValueError(f"write_summary needs a path for each of {sorted(missing)}")
    run_list = read_runs(run_paths)
    by_variant: dict[str, list[Run]] = {}
    for r in run_list:
        by_variant.setdefault(r.variant, []).append(r)
    runs = run_table(run_list)
    deep_layers, deep_variants = deep_tables(config, by_variant)
    tables = {
        "summary": runs,
        "variants": variant_table(runs, list(config["variants"])),
        "significance": significance_table(runs, default_comparisons(config)),
        "references": reference_table(config, runs, {(r.variant, r.seed): r for r in run_list}),
        "deep_layers": deep_layers,
        "deep_variants": deep_variants,
        "samples": samples_table(config, by_variant),
        "stats": study_frame(config, run_list, Run.stats),
        "histograms": study_frame(config, run_list, Run.histograms),
    }
    for name, df in tables.items():
        path = Path(outputs[name])
        atomic_write_bytes(path, _parquet_bytes(df) if path.suffix == ".parquet" else _csv_bytes(df))
    return tables
