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

from . import inference
from .config import variant_spec
from .conventions import EXPECTED_INIT_LOSS, natural_key
from .data import atomic_write_bytes
from .rundir import Run, read_runs
from .sweeps import sweep_groups

LECTURE_SEED = 2147483647
RUN_COLUMNS = ["variant", "seed", "model", "batchnorm", "steps", "steps_done", "status", "diverged_at",
               "step0_loss", "init_loss", "expected_init_loss", "train_loss", "val_loss", "test_loss",
               "train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated",
               "sat97_init", "sat97_final", "sat99_init", "sat99_final", "twin_final_abs_delta", "seconds"]
SPREAD_METRICS = ["step0_loss", "init_loss", "train_loss", "val_loss", "test_loss", "sat97_init", "sat97_final",
                  "sat99_init", "sat99_final"]
# Measured before the first step: a run that diverged later still has them.
BEFORE_TRAINING = {"step0_loss", "init_loss", "sat97_init", "sat99_init"}
# The variant's settings that the study-level tables carry beside every row.
STUDY_SETTINGS = ("model", "batchnorm", "gain", "activation")
# What the summary writes: the keys write_summary takes, and each file's name under results/.
TABLES = {
    "summary": "summary.csv", "variants": "variants.csv", "significance": "significance.csv",
    "references": "reference_check.csv", "deep_layers": "deep_layers.csv", "deep_variants": "deep_variants.csv",
    "samples": "samples.csv", "stats": "stats.parquet", "histograms": "histograms.parquet", "chaos": "chaos.csv",
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


def sweep_grids(config: dict) -> dict[str, list[list[str]]]:
    """The sweeps' grid lines (family name -> lines of variant names), for :func:`inference.resolve_comparisons`.

    A generated variant records its sweep and its point; each key's values are indexed in the order
    they first appear, which is the grid's order (the expansion walks the grid with the last key fastest).
    """
    groups = sweep_groups(config)
    grids: dict[str, list[list[str]]] = {}
    for sweep, names in groups.items():
        if sweep is None:
            continue
        points = {name: config["variants"][name]["sweep"]["point"] for name in names}
        axes = list(points[names[0]])
        values: dict[str, list] = {axis: [] for axis in axes}
        for point in points.values():
            for axis in axes:
                # a labelled value may be a list or a mapping: compared by equality, not hashed
                if not any(type(v) is type(point[axis]) and v == point[axis] for v in values[axis]):
                    values[axis].append(point[axis])
        index = {tuple(next(i for i, v in enumerate(values[axis]) if type(v) is type(point[axis])
                            and v == point[axis]) for axis in axes): name for name, point in points.items()}
        grids.update(inference.grid_lines(sweep, index, axes))
    return grids


def significance(config: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The config's comparisons (and the sweeps' grid lines), each tested with every statistic and its inputs."""
    comparisons = inference.resolve_comparisons(config, sweep_grids(config) or None)
    return inference.significance_table(runs, comparisons, **inference.comparison_settings(config))


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
                items.append(("minibatch loss", step, ours, value, step < int(run.steps_done), None))
            for quantity in ("init_loss", "train_loss", "val_loss"):
                if quantity in ref:
                    column = f"{quantity}_calibrated" if calibrated and quantity != "init_loss" else quantity
                    final_step = int(run.steps) - 1 if quantity != "init_loss" else 0
                    label = quantity.replace("_", " ") + (" (calibrated BN)" if column.endswith("calibrated") else "")
                    # A final loss is only comparable after as many steps as the source trained.
                    full_length = int(run.steps) == int(ref["steps"]) or quantity == "init_loss"
                    final = column if quantity != "init_loss" else None
                    items.append((label, final_step, float(run[column]), ref[quantity], full_length, final))
            for quantity, step, ours, value, compared, final in items:
                chaotic = chaotic_after is not None and step > int(chaotic_after)
                rows.append({
                    "variant": name, "seed": seed, "quantity": quantity, "step": step, "ours": ours,
                    "reference": float(value), "difference": ours - float(value), "precision": precision,
                    "match": _round_eq(ours, value, precision), "chaotic": chaotic, "source": ref["source"],
                    "compared": compared,
                    **(reference_spread(runs, name, final, float(value), precision) if final and compared else {}),
                })
    columns = ["variant", "seed", "quantity", "step", "ours", "reference", "difference", "precision", "match",
               "chaotic", "source", "compared", *SPREAD_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


# Where a printed final loss lies among our seeds' values (the reference check's last columns).
SPREAD_COLUMNS = ["spread_n", "spread_mean", "spread_sd", "spread_z", "spread_rank", "spread_sentence"]


def reference_spread(runs: pd.DataFrame, variant: str, column: str, reference: float, precision: int) -> dict:
    """The lecture's value against ``column`` over the variant's finished seeds (inference.reference_in_spread)."""
    sub = runs[(runs.variant == variant) & (runs.status == "ok")]
    spread = inference.reference_in_spread(reference, sub[column].astype(float).to_numpy(), precision)
    return {f"spread_{key}": spread[key] for key in ("n", "mean", "sd", "z", "rank")} | \
        {"spread_sentence": spread["sentence"]}


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


# -- chaos, measured: the sensitivity twins as a rate ----------------------------------------------------------
TWIN_DISTANCE = {"kind": "twin", "layer": "parameters", "stat": "distance"}  # the rows runs.py writes
LYAPUNOV_STEP = 10_000  # the step the lecture-length study quotes lambda at (also given at the last step)
CHAOS_COLUMNS = [
    "variant", "seeds", "w1_perturbation", "last_step", "lyapunov_last_mean", "lyapunov_last_sd",
    "lyapunov_last_lecture_seed", "lyapunov_10k_mean", "lyapunov_10k_lecture_seed", "lyapunov_unit", "growth",
    "window", "twin_gap_mean", "seed_sd", "decorrelation", "threshold", "chaotic", "basis", "config_chaotic",
    "agrees", "lyapunov_last_values", "twin_gaps", "seed_values",
]


def final_window(steps: int) -> int:
    """The last steps whose mean minibatch loss stands for a run's final loss in the twin comparison.

    One minibatch's loss differs between two seeds by the batch drawn as much as by the parameters,
    while a twin draws the same batches as its run; averaged over the lecture's 1,000-step window
    (steps/20 in a short run) the batch's share of the seed spread shrinks and parameters are compared
    with parameters. The twins' gap is that window's mean loss against the twin's.
    """
    return 1000 if steps >= 20_000 else max(1, steps // 20)


def twin_trace(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """The twins' parameter distance (steps, distances) from the run's statistics, its finite part; None
    without a trace that starts at step 0 with a positive distance."""
    stats = run.stats()
    sel = stats[(stats.kind == TWIN_DISTANCE["kind"]) & (stats.layer == TWIN_DISTANCE["layer"])
                & (stats.stat == TWIN_DISTANCE["stat"])].sort_values("step")
    steps, distances = sel.step.to_numpy(dtype=np.int64), sel.value.to_numpy(dtype=float)
    finite = np.isfinite(distances)
    steps, distances = steps[finite], distances[finite]
    if len(steps) < 2 or steps[0] != 0 or distances[0] <= 0:
        return None
    return steps, distances


def twin_final_losses(run: Run) -> tuple[float, float]:
    """The run's and its twin's mean minibatch loss over the :func:`final_window` (NaN without a twin)."""
    losses = run.losses()
    if "twin_loss" not in losses or losses.empty:
        return np.nan, np.nan
    window = final_window(len(losses))
    return (float(losses.loss.to_numpy(dtype=float)[-window:].mean()),
            float(losses.twin_loss.to_numpy(dtype=float)[-window:].mean()))


def _joined(values: dict) -> str:
    return ";".join(f"{seed}:{value!r}" for seed, value in values.items())


def chaos_table(config: dict, runs: pd.DataFrame, runs_by_variant: dict[str, list[Run]]) -> pd.DataFrame:
    """One row per variant with sensitivity twins: is it chaotic, measured rather than declared?

    From each finished run's twin trace, the finite-time Lyapunov estimate lambda at the last logged
    step and at step 10,000 (mean and sd over seeds, and the lecture seed's); the twins' final-loss gap
    against the seed-to-seed spread of the same loss (:func:`inference.twin_decorrelation`); the verdict
    of :func:`inference.chaos_verdict`, beside the config's flag (a reference with ``chaotic_after_step``)
    and whether the two agree. The inputs are the last three columns.
    """
    rows = []
    for name in config["variants"]:
        spec = variant_spec(config, name)
        if not spec["sensitivity_twin"] or not runs_by_variant.get(name):
            continue
        status = runs[runs.variant == name].set_index("seed").status
        finished = [r for r in runs_by_variant[name] if status.get(r.seed, "ok") == "ok"]
        traces = {r.seed: trace for r in finished if (trace := twin_trace(r)) is not None}
        finals = {r.seed: twin_final_losses(r) for r in finished}
        lecture = lecture_seed_of([r.seed for r in runs_by_variant[name]])
        lam_last = {seed: inference.lyapunov_at(*trace) for seed, trace in traces.items()}
        lam_10k = {seed: inference.lyapunov_at(*trace, LYAPUNOV_STEP) for seed, trace in traces.items()}
        gaps = {seed: abs(base - twin) for seed, (base, twin) in finals.items()}
        seed_values = {seed: base for seed, (base, _) in finals.items()}
        # With one seed the verdict reads a trace: the lecture seed's, else the first there is.
        trace = traces.get(lecture) or next(iter(traces.values()), None)
        verdict = inference.chaos_verdict(list(gaps.values()), list(seed_values.values()),
                                          *(trace if trace is not None else (None, None)),
                                          perturbation=spec["w1_perturbation"])
        if not traces and not any(map(math.isfinite, gaps.values())):
            verdict["basis"] = "no finished run with a twin trace" if not finished else "no twin trace recorded"
        references = config["variants"][name].get("references") or []  # not part of the spec
        flagged = any(ref.get("chaotic_after_step") is not None for ref in references)
        finite = lambda values: np.array([v for v in values.values() if math.isfinite(v)])
        last, ten_k = finite(lam_last), finite(lam_10k)
        values = finite(seed_values)
        rows.append({
            "variant": name, "seeds": len(traces), "w1_perturbation": spec["w1_perturbation"],
            "last_step": int(trace[0][-1]) if trace is not None else np.nan,
            "lyapunov_last_mean": last.mean() if len(last) else np.nan,
            "lyapunov_last_sd": last.std(ddof=1) if len(last) > 1 else np.nan,
            "lyapunov_last_lecture_seed": lam_last.get(lecture, np.nan),
            "lyapunov_10k_mean": ten_k.mean() if len(ten_k) else np.nan,
            "lyapunov_10k_lecture_seed": lam_10k.get(lecture, np.nan),
            "lyapunov_unit": inference.LYAPUNOV_UNIT, "growth": verdict["growth"],
            "window": final_window(int(spec["max_steps"])),
            "twin_gap_mean": float(np.nanmean(list(gaps.values()))) if any(map(math.isfinite, gaps.values()))
            else np.nan,
            "seed_sd": values.std(ddof=1) if len(values) > 1 else np.nan,
            "decorrelation": verdict["decorrelation"], "threshold": inference.CHAOS_DECORRELATION,
            "chaotic": verdict["chaotic"], "basis": verdict["basis"], "config_chaotic": flagged,
            "agrees": None if verdict["chaotic"] is None else verdict["chaotic"] == flagged,
            "lyapunov_last_values": _joined(lam_last), "twin_gaps": _joined(gaps), "seed_values": _joined(seed_values),
        })
    return pd.DataFrame(rows, columns=CHAOS_COLUMNS)


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
        "significance": significance(config, runs),
        "references": reference_table(config, runs, {(r.variant, r.seed): r for r in run_list}),
        "deep_layers": deep_layers,
        "deep_variants": deep_variants,
        "samples": samples_table(config, by_variant),
        "chaos": chaos_table(config, runs, by_variant),
        "stats": study_frame(config, run_list, Run.stats),
        "histograms": study_frame(config, run_list, Run.histograms),
    }
    for name, df in tables.items():
        path = Path(outputs[name])
        atomic_write_bytes(path, _parquet_bytes(df) if path.suffix == ".parquet" else _csv_bytes(df))
    return tables
