"""From the runs to the tables: every number the report shows is computed here.

Per run, per variant over seeds, significance, the reference check, the deep networks layer by
layer, the lecture seed's samples, and the study's statistics and histograms in one tidy table
each. The summary reads only what the runs wrote (through :mod:`actgrad.rundir`); the report
reads only what the summary and the figure step write.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from actgrad.data import EXPECTED_INIT_LOSS, atomic_write_bytes
from actgrad.results.diagnosis import diagnosis_tables
from actgrad.results.normalisation import normalisation_table, normalisation_tests
from actgrad.results.significance import (
    CHAOS_DECORRELATION,
    LYAPUNOV_UNIT,
    chaos_verdict,
    lyapunov_at,
    lyapunov_exponents,
    reference_in_spread,
    significance_table,
)
from actgrad.results.trainability import trainability_tables
from actgrad.results.vocabulary import (
    EXPLODING_ABOVE,
    LECTURE_SEED,
    SWEEP_METRICS,
    TABLES,
    THEORY_QUANTITIES,
    TWIN_DISTANCE,
    VANISHING_BELOW,
    averaging_window,
)
from actgrad.rundir import SUMMARY_METRICS, Run, natural_key, parquet_bytes, read_runs
from actgrad.study.comparisons import comparison_settings, resolve_comparisons, sweep_grids
from actgrad.study.settings import variant_spec
from actgrad.study.sweeps import sweep_groups

RUN_COLUMNS = ["variant", "seed", "model", "batchnorm", "steps", "steps_done", "status", "diverged_at",
               "step0_loss", "init_loss", "expected_init_loss", "train_loss", "val_loss", "test_loss",
               "train_loss_calibrated", "val_loss_calibrated", "test_loss_calibrated",
               "sat97_init", "sat97_final", "sat99_init", "sat99_final", "twin_final_abs_delta", "seconds",
               # the activation's own shares, BatchNorm's batch-statistics evaluation, the Jacobian
               "norm", "activation", "weight_init", "batch_size", "nonpositive_init", "nonpositive_final",
               "val_loss_batch_stats", "jacobian_sv_mean", "jacobian_sv_std", "jacobian_sv_min", "jacobian_sv_max",
               "jacobian_sv_mean_sq", "jacobian_sv_std_sq"]
SPREAD_METRICS = ["step0_loss", "init_loss", "train_loss", "val_loss", "test_loss", "sat97_init", "sat97_final",
                  "sat99_init", "sat99_final", "nonpositive_init", "nonpositive_final", "val_loss_batch_stats"]
# Measured before the first step: a run that diverged later still has them.
BEFORE_TRAINING = {"step0_loss", "init_loss", "sat97_init", "sat99_init", "nonpositive_init"}
# The variant's settings that the study-level tables carry beside every row.
STUDY_SETTINGS = ("model", "batchnorm", "gain", "activation")
# What the summary writes: the keys write_summary takes, and each file's name under results/.


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


def study_significance(config: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The config's comparisons (and the sweeps' grid lines), each tested with every statistic and its inputs."""
    chosen = resolve_comparisons(config, sweep_grids(config) or None)
    return significance_table(runs, chosen, **comparison_settings(config))


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
    """The lecture's value against ``column`` over the variant's finished seeds (reference_in_spread)."""
    sub = runs[(runs.variant == variant) & (runs.status == "ok")]
    spread = reference_in_spread(reference, sub[column].astype(float).to_numpy(), precision)
    return {f"spread_{key}": spread[key] for key in ("n", "mean", "sd", "z", "rank")} | \
        {"spread_sentence": spread["sentence"]}


def _finite(stats: pd.DataFrame) -> pd.DataFrame:
    return stats[np.isfinite(stats.value.astype(float))]


def gradient_verdict(ratio: float) -> str:
    if not math.isfinite(ratio):
        return ""
    return ("vanishing towards the input" if ratio < VANISHING_BELOW else
            "exploding towards the input" if ratio > EXPLODING_ABOVE else "stable")


def layer_share_stat(activation: str) -> str:
    """The per-layer statistic that says how much of a layer does not respond: tanh's saturated share (|t| > 0.97),
    ReLU's and GELU's share at or below zero (actgrad.training.stats records both names)."""
    return "saturated_pct" if activation == "tanh" else "nonpositive_pct"


def deep_tables(config: dict, runs_by_variant: dict[str, list[Run]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The deep networks layer by layer, over seeds: ``deep_layers`` (tidy: variant, layer, step, stat, value)
    and ``deep_variants`` (one row per deep variant).

    Per layer: the saturated share (for ReLU and GELU the share at or below zero: :func:`layer_share_stat`) at
    the snapshot step (the one the figures show, recorded by the lecture seed's run) and at the last step, and
    the gradient's std at step 0. Per variant: the first tanh layer's
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
        share = layer_share_stat(variant_spec(config, name)["activation"])
        saturated = act[act.stat == share]
        for step in dict.fromkeys(s for s in (snapshot, last) if s is not None):
            per_layer = saturated[saturated.step == step].groupby("layer").value.mean()
            layer_rows += [(name, layer, step, share, per_layer[layer])
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
LYAPUNOV_STEP = 10_000  # the step the lecture-length study quotes lambda at (also given at the last step)
CHAOS_COLUMNS = [
    "variant", "seeds", "w1_perturbation", "last_step", "lyapunov_last_mean", "lyapunov_last_sd",
    "lyapunov_last_lecture_seed", "lyapunov_10k_mean", "lyapunov_10k_lecture_seed", "lyapunov_unit", "growth",
    "window", "twin_gap_mean", "seed_sd", "decorrelation", "threshold", "chaotic", "basis", "config_chaotic",
    "agrees", "lyapunov_last_values", "twin_gaps", "seed_values",
]


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
    """The run's and its twin's mean minibatch loss over the last
    :func:`~actgrad.results.vocabulary.averaging_window` (NaN without a twin)."""
    losses = run.losses()
    if "twin_loss" not in losses or losses.empty:
        return np.nan, np.nan
    window = averaging_window(len(losses))
    return (float(losses.loss.to_numpy(dtype=float)[-window:].mean()),
            float(losses.twin_loss.to_numpy(dtype=float)[-window:].mean()))


def _joined(values: dict) -> str:
    return ";".join(f"{seed}:{value!r}" for seed, value in values.items())


TWIN_TRACE_COLUMNS = ["variant", "seed", "step", "distance", "growth", "lyapunov", "perturbation"]


def twin_traces_table(runs_by_variant: dict[str, list[Run]]) -> pd.DataFrame:
    """Each finished run's twin trace (``results/twin_traces.csv``): the parameters' distance to the twin's at every
    recorded step, its growth d(t)/d(0) and the Lyapunov estimate ln(d(t)/d(0)) / t (:func:`lyapunov_exponents`),
    and the W1 perturbation. A diverged run is left out, as in the chaos table: its distance measures the blow-up."""
    frames = []
    for variant, runs in runs_by_variant.items():
        for r in runs:
            trace = twin_trace(r) if r.diverged_at is None else None
            if trace is None:
                continue
            steps, distances = np.asarray(trace[0]), np.asarray(trace[1], dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                growth = distances / distances[0]
            frames.append(pd.DataFrame({"variant": variant, "seed": r.seed, "step": steps, "distance": distances,
                                        "growth": growth, "lyapunov": lyapunov_exponents(steps, distances),
                                        "perturbation": r.metrics.get("twin_w1_perturbation")}))
    return pd.concat(frames, ignore_index=True)[TWIN_TRACE_COLUMNS] if frames else \
        pd.DataFrame(columns=TWIN_TRACE_COLUMNS)


def chaos_table(config: dict, runs: pd.DataFrame, runs_by_variant: dict[str, list[Run]]) -> pd.DataFrame:
    """One row per variant with sensitivity twins: is it chaotic, measured rather than declared?

    From each finished run's twin trace, the finite-time Lyapunov estimate lambda at the last logged
    step and at step 10,000 (mean and sd over seeds, and the lecture seed's); the twins' final-loss gap
    against the seed-to-seed spread of the same loss (:func:`twin_decorrelation`); the verdict
    of :func:`chaos_verdict`, beside the config's flag (a reference with ``chaotic_after_step``)
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
        lam_last = {seed: lyapunov_at(*trace) for seed, trace in traces.items()}
        lam_10k = {seed: lyapunov_at(*trace, LYAPUNOV_STEP) for seed, trace in traces.items()}
        gaps = {seed: abs(base - twin) for seed, (base, twin) in finals.items()}
        seed_values = {seed: base for seed, (base, _) in finals.items()}
        # With one seed the verdict reads a trace: the lecture seed's, else the first there is.
        trace = traces.get(lecture) or next(iter(traces.values()), None)
        verdict = chaos_verdict(list(gaps.values()), list(seed_values.values()),
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
            "lyapunov_unit": LYAPUNOV_UNIT, "growth": verdict["growth"],
            "window": averaging_window(int(spec["max_steps"])),
            "twin_gap_mean": float(np.nanmean(list(gaps.values()))) if any(map(math.isfinite, gaps.values()))
            else np.nan,
            "seed_sd": values.std(ddof=1) if len(values) > 1 else np.nan,
            "decorrelation": verdict["decorrelation"], "threshold": CHAOS_DECORRELATION,
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


# -- theory next to measurement, and the sweeps ---------------------------------------------------
# The runs do not record the embedding's output at init, so the theory's input is what the settings imply.
INPUT_MOMENT_SOURCE = "from the settings (C ~ randn x init scale), not measured"


def init_layer_stats(stats: pd.DataFrame) -> pd.DataFrame:
    """Every run's per-layer statistics at step 0 as (variant, seed, layer, quantity, value), from the study's
    stats table; ``grad_std_rel_last`` is each run's gradient std over its own last layer's."""
    columns = ["variant", "seed", "layer", "quantity", "value"]
    if stats.empty:
        return pd.DataFrame(columns=columns)
    wanted = {(kind, stat): q for q, ((kind, stat), *_) in THEORY_QUANTITIES.items() if stat != "std_rel_last"}
    step0 = _finite(stats[stats.step == 0])
    keys = list(zip(step0.kind, step0.stat))
    step0 = step0.assign(quantity=[wanted.get(k) for k in keys])
    step0 = step0[step0.quantity.notna()][columns]
    grads = step0[step0.quantity == "grad_std"]
    last_layer = grads.groupby(["variant", "seed"]).layer.agg(lambda layers: max(layers, key=natural_key))
    last = grads.merge(last_layer.rename("last").reset_index(), on=["variant", "seed"])
    top = last[last.layer == last["last"]].set_index(["variant", "seed"]).value
    rel = grads.assign(quantity="grad_std_rel_last",
                       value=grads.value.to_numpy() / top.reindex(list(zip(grads.variant, grads.seed))).to_numpy())
    return pd.concat([step0, rel], ignore_index=True)


# A saturation predicted below this (%) gets no relative difference: it is a handful of the 3,200 values
# of a 32 x 100 batch, and theory's 1e-90 % against a measured 0 says nothing.
MIN_SATURATION_COMPARED = 0.5


def _relative(measured, predicted, quantity: str = "") -> float:
    if not (np.isfinite(measured) and np.isfinite(predicted)) or predicted == 0:
        return np.nan
    if quantity == "saturated_pct" and predicted < MIN_SATURATION_COMPARED:
        return np.nan
    return (measured - predicted) / abs(predicted)


def theory_table(config: dict, stats: pd.DataFrame) -> pd.DataFrame:
    """Predicted vs measured at init, per variant and layer: ``results/theory.csv``.

    Measured: the mean and sd over seeds and the lecture seed's value; predicted: mean-field theory
    (:func:`actgrad.results.theory.predict_network`, BatchNorm nets at q = 1); relative difference = (measured -
    predicted) / predicted. Every mlp and deep variant has rows; ``predicted`` is empty where the theory
    has no prediction (a saturation share for ReLU, an absolute gradient past a near-uniform softmax).
    """
    from actgrad.results.theory import embedding_second_moment, predict_variant  # scipy: only the step that predicts

    init = init_layer_stats(stats)
    rows = []
    for name in config["variants"]:
        measured = init[init.variant == name]
        if measured.empty:
            continue
        spec = variant_spec(config, name)
        predicted = predict_variant(spec, config["block_size"])
        lookup = {(r.layer, r.kind, r.stat): r.value for r in predicted.itertuples()}
        lecture = lecture_seed_of(measured.seed.unique())
        sweep = config["variants"][name].get("sweep", {}).get("name")
        for layer in sorted(measured.layer.unique(), key=natural_key):
            for quantity, ((kind, stat), *_) in THEORY_QUANTITIES.items():
                values = measured[(measured.layer == layer) & (measured.quantity == quantity)]
                if values.empty:
                    continue
                mean = float(values.value.mean())
                own = values[values.seed == lecture].value
                lecture_value = float(own.iloc[0]) if len(own) else np.nan
                pred = float(lookup.get((layer, kind, stat), np.nan))
                rows.append({
                    "variant": name, "sweep": sweep, "model": spec["model"], "activation": spec["activation"],
                    "batchnorm": bool(spec["batchnorm"]), "gain": spec["gain"], "layer": layer,
                    "quantity": quantity, "n": len(values), "measured_mean": mean,
                    "measured_sd": float(values.value.std(ddof=1)) if len(values) > 1 else np.nan,
                    "lecture_seed": lecture, "measured_lecture_seed": lecture_value, "predicted": pred,
                    "relative_difference": _relative(mean, pred, quantity),
                    "relative_difference_lecture_seed": _relative(lecture_value, pred, quantity),
                    "input_second_moment": embedding_second_moment(spec), "input_source": INPUT_MOMENT_SOURCE,
                })
    columns = ["variant", "sweep", "model", "activation", "batchnorm", "gain", "layer", "quantity", "n",
               "measured_mean", "measured_sd", "lecture_seed", "measured_lecture_seed", "predicted",
               "relative_difference", "relative_difference_lecture_seed", "input_second_moment", "input_source"]
    return pd.DataFrame(rows, columns=columns)


def _point_value(value):
    """A swept value as a table cell: a labelled list or mapping as compact JSON."""
    import json

    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def sweep_point_measurements(init: pd.DataFrame, runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """One sweep point's per-seed values of each :data:`SWEEP_METRICS` (``init``: its init_layer_stats rows)."""
    out = {}
    if not init.empty:
        layers = sorted(init.layer.unique(), key=natural_key)
        first, last = layers[0], layers[-1]

        def per_seed(layer, quantity):
            return init[(init.layer == layer) & (init.quantity == quantity)].set_index("seed").value

        out["last_activation_std"] = per_seed(last, "activation_std").to_numpy(float)
        out["last_saturated_pct"] = per_seed(last, "saturated_pct").to_numpy(float)
        out["grad_ratio_first_last"] = per_seed(first, "grad_std_rel_last").to_numpy(float)
    ok = runs[runs.status == "ok"]
    out["val_loss"] = ok.val_loss.astype(float).to_numpy()
    out["twin_final_abs_delta"] = runs.twin_final_abs_delta.astype(float).to_numpy()
    return {k: v[np.isfinite(v)] for k, v in out.items()}


def sweep_point_predictions(predicted: pd.DataFrame) -> dict[str, float]:
    """The theory's value of the init metrics of :data:`SWEEP_METRICS` for one point (its predict_network rows)."""
    if predicted.empty:
        return {}
    layers = sorted(predicted.layer.unique(), key=natural_key)

    def value(layer, kind, stat):
        sel = predicted[(predicted.layer == layer) & (predicted.kind == kind) & (predicted.stat == stat)]
        return float(sel.value.iloc[0]) if len(sel) else np.nan

    return {"last_activation_std": value(layers[-1], "activation", "std"),
            "last_saturated_pct": value(layers[-1], "activation", "saturated_pct"),
            "grad_ratio_first_last": value(layers[0], "activation_grad", "std_rel_last")}


def sweep_table(config: dict, runs: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Each sweep point's phase-diagram numbers: ``results/sweeps.csv``, tidy.

    Columns: sweep, variant, one column per swept key (the point's value), metric, mean, sd, n and the
    theory's prediction (init metrics only). Metrics: the last layer's activation std and saturated %
    and the gradient std of the first layer over the last's at step 0 (every seed), the final validation
    loss (seeds that finished) and the sensitivity twins' final |loss - twin loss| (where twins ran).
    """
    from actgrad.results.theory import predict_variant  # scipy: only the step that predicts

    init = init_layer_stats(stats)
    rows, keys = [], []
    for sweep, names in sweep_groups(config).items():
        if sweep is None:
            continue
        for name in names:
            point = config["variants"][name]["sweep"]["point"]
            keys += [k for k in point if k not in keys]
            measured = sweep_point_measurements(init[init.variant == name], runs[runs.variant == name])
            predicted = sweep_point_predictions(predict_variant(variant_spec(config, name), config["block_size"]))
            for metric in SWEEP_METRICS:
                values = measured.get(metric, np.array([]))
                rows.append({"sweep": sweep, "variant": name, **{k: _point_value(v) for k, v in point.items()},
                             "metric": metric, "mean": values.mean() if len(values) else np.nan,
                             "sd": values.std(ddof=1) if len(values) > 1 else np.nan, "n": len(values),
                             "predicted": predicted.get(metric, np.nan)})
    return pd.DataFrame(rows, columns=["sweep", "variant", *keys, "metric", "mean", "sd", "n", "predicted"])


def sweep_axes(rows: pd.DataFrame, keys: list[str]) -> tuple[str, list[str]]:
    """The x axis of a sweep's phase diagram (the gain if swept, else its first numeric key, else its first
    key) and the keys that tell its curves apart (the rest)."""
    numeric = [k for k in keys if pd.api.types.is_numeric_dtype(rows[k]) and not pd.api.types.is_bool_dtype(rows[k])]
    x = "gain" if "gain" in keys else (numeric[0] if numeric else keys[0])
    return x, [k for k in keys if k != x]


def curve_label(values: dict) -> str:
    """A phase-diagram curve's legend label from the point's other swept values."""
    if not values:
        return "measured"
    parts = []
    for key, value in values.items():
        if key == "batchnorm":
            parts.append("BatchNorm" if str(value).lower() == "true" else "no BatchNorm")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def sweep_keys(config: dict, rows: pd.DataFrame) -> list[str]:
    """The keys a sweep's rows of sweeps.csv vary (its points' keys that have values there)."""
    keys = list(config["variants"][rows.variant.iloc[0]]["sweep"]["point"]) if len(rows) else []
    return [k for k in keys if k in rows and rows[k].notna().any()]


def sweep_theory_curves(config: dict, rows: pd.DataFrame, keys: list[str]) -> tuple[dict, float | None]:
    """Dense theory curves over the gain for a deep-net sweep (label -> frame with x and the phase_curves
    columns), and the critical gain of its activation; ({}, None) for a sweep the curves do not describe."""
    from actgrad.results import theory
    from actgrad.results.theory import embedding_second_moment

    x_key, others = sweep_axes(rows, keys)
    if x_key != "gain" or rows.empty:
        return {}, None
    gains = rows["gain"].astype(float)
    dense = np.geomspace(gains.min() / 1.15, gains.max() * 1.15, 160)
    curves, critical = {}, None
    for variant, group in rows.groupby("variant", sort=False):
        label = curve_label(group.iloc[0][others].to_dict()) if others else "measured"
        if label in curves:
            continue
        spec = variant_spec(config, variant)
        if spec["model"] != "deep" or spec["activation"] not in theory.ACTIVATIONS:
            return {}, None
        norm = theory.spec_norm(spec)
        frame = theory.phase_curves(dense, spec["n_layers"], spec["activation"], embedding_second_moment(spec),
                                    norms=(norm,))
        curves[label] = frame.rename(columns={"gain": "x"})
        if critical is None:
            critical = theory.critical_gain(spec["activation"], q0=embedding_second_moment(spec))
    return curves, critical


THEORY_CURVES_COLUMNS = ["sweep", "curve", "critical_gain", "x"]


def theory_curves_table(config: dict, sweeps: pd.DataFrame) -> pd.DataFrame:
    """The mean-field curves drawn through each sweep's phase diagram (``results/theory_curves.csv``): per sweep
    and curve (its other swept values, :func:`curve_label`), the theory over a dense grid of gains ``x`` and the
    activation's critical gain; no rows for a sweep the curves do not describe."""
    frames = []
    for sweep in dict.fromkeys(sweeps.sweep) if len(sweeps) else []:
        rows = sweeps[sweeps.sweep == sweep]
        keys = sweep_keys(config, rows)
        curves, critical = sweep_theory_curves(config, rows, keys) if keys else ({}, None)
        for label, frame in curves.items():
            frames.append(frame.assign(sweep=sweep, curve=label, critical_gain=critical))
    if not frames:
        return pd.DataFrame(columns=THEORY_CURVES_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    return table[THEORY_CURVES_COLUMNS + [c for c in table.columns if c not in THEORY_CURVES_COLUMNS]]


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def write_summary(config: dict, run_paths, outputs: dict[str, str | os.PathLike],
                  splits=None) -> dict[str, pd.DataFrame]:
    """Read the runs that ``run_paths`` belong to and write every table of :data:`TABLES` to its path in
    ``outputs`` (table name -> path); ``splits`` (data/splits.pt) gives the trainability table its baseline."""
    missing = set(TABLES) - set(outputs)
    if missing:
        raise ValueError(f"write_summary needs a path for each of {sorted(missing)}")
    run_list = read_runs(run_paths, SUMMARY_METRICS)
    by_variant: dict[str, list[Run]] = {}
    for r in run_list:
        by_variant.setdefault(r.variant, []).append(r)
    runs = run_table(run_list)
    deep_layers, deep_variants = deep_tables(config, by_variant)
    tables = {
        "summary": runs,
        "variants": variant_table(runs, list(config["variants"])),
        "significance": study_significance(config, runs),
        "references": reference_table(config, runs, {(r.variant, r.seed): r for r in run_list}),
        "deep_layers": deep_layers,
        "deep_variants": deep_variants,
        "samples": samples_table(config, by_variant),
        "chaos": chaos_table(config, runs, by_variant),
        "twin_traces": twin_traces_table(by_variant),
        "stats": study_frame(config, run_list, Run.stats),
        "histograms": study_frame(config, run_list, Run.histograms),
    }
    tables["theory"] = theory_table(config, tables["stats"])
    tables["sweeps"] = sweep_table(config, runs, tables["stats"])
    tables["theory_curves"] = theory_curves_table(config, tables["sweeps"])
    tables["jacobian"] = jacobian_table(config, runs)
    tables["normalisation"] = normalisation_table(config, runs)
    tables["normalisation_tests"] = normalisation_tests(config, runs)
    tables.update(diagnosis_tables(config, tables, by_variant))  # what is wrong, and whether the fixes worked
    tables.update(trainability_tables(config, runs, init_layer_stats(tables["stats"]), splits))  # how deep can it go
    for name, df in tables.items():
        path = Path(outputs[name])
        atomic_write_bytes(path, parquet_bytes(df) if path.suffix == ".parquet" else _csv_bytes(df))
    return tables


# -- the Jacobian at init --------------------------------------
JACOBIAN_COLUMNS = [
    "variant", "sweep", "model", "norm", "activation", "weight_init", "gain", "n_layers", "seeds",
    "sv_mean_mean", "sv_mean_sd", "sv_std_mean", "sv_std_sd", "sv_min_mean", "sv_max_mean",
    "mean_sq_mean", "rel_spread_sq_mean", "rel_spread_sq_sd",
    "predicted_mean_sq", "predicted_rel_spread_sq_gaussian", "predicted_rel_spread_sq_orthogonal", "theory",
]


def jacobian_theory(spec: dict) -> dict:
    """Pennington et al.'s prediction for a variant's hidden stack
    (:func:`actgrad.results.theory.jacobian_spectrum`): the
    mean squared singular value for its own weights and the relative spread std/mean of the squares for Gaussian
    and orthogonal weights, or why there is none. It counts the hidden layers as square and wide, and leaves out
    the last (scaled, 100 -> 27) layer; the relative spread does not depend on a layer's scale."""
    from actgrad.results import theory

    if spec["model"] != "deep":
        return {"theory": "none for the one-hidden-layer net"}
    if spec["norm"] != "none":
        return {"theory": f"none with {spec['norm']} (the prediction is for unnormalised layers)"}
    if spec["activation"] not in theory.ACTIVATIONS:
        return {"theory": f"none for {spec['activation']}"}
    out = {"theory": f"{spec['n_layers']} square {spec['activation']} layers at gain {spec['gain']:.4g}"}
    for weights in ("gaussian", "orthogonal"):
        p = theory.jacobian_spectrum(spec["n_layers"], float(spec["gain"]), spec["activation"], weights)
        out[f"predicted_rel_spread_sq_{weights}"] = p["std_sq"] / p["mean_sq"] if p["mean_sq"] > 0 else np.nan
        if weights == spec.get("weight_init", "gaussian"):
            out["predicted_mean_sq"] = p["mean_sq"]
    return out


def jacobian_table(config: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The input-output Jacobian's singular values at init per variant (``results/jacobian.csv``): mean and sd over
    seeds of each run's mean, spread, smallest and largest singular value (one batch of 32 training examples), and
    the relative spread of the squares, std/mean, beside :func:`jacobian_theory`'s prediction."""
    rows = []
    for name in config["variants"]:
        sub = runs[runs.variant == name] if "jacobian_sv_mean" in runs else runs.iloc[0:0]
        sub = sub[sub.jacobian_sv_mean.notna()] if len(sub) else sub
        if sub.empty:
            continue
        spec = variant_spec(config, name)

        def stat(column, how="mean", sub=sub):
            values = sub[column].astype(float)
            return values.mean() if how == "mean" else (values.std(ddof=1) if len(values) > 1 else np.nan)

        rel = (sub.jacobian_sv_std_sq.astype(float) / sub.jacobian_sv_mean_sq.astype(float))
        rows.append({
            "variant": name, "sweep": config["variants"][name].get("sweep", {}).get("name"), "model": spec["model"],
            "norm": spec["norm"], "activation": spec["activation"], "weight_init": spec.get("weight_init", "gaussian"),
            "gain": spec["gain"], "n_layers": spec.get("n_layers", 1), "seeds": len(sub),
            "sv_mean_mean": stat("jacobian_sv_mean"), "sv_mean_sd": stat("jacobian_sv_mean", "sd"),
            "sv_std_mean": stat("jacobian_sv_std"), "sv_std_sd": stat("jacobian_sv_std", "sd"),
            "sv_min_mean": stat("jacobian_sv_min"), "sv_max_mean": stat("jacobian_sv_max"),
            "mean_sq_mean": stat("jacobian_sv_mean_sq"),
            "rel_spread_sq_mean": rel.mean(), "rel_spread_sq_sd": rel.std(ddof=1) if len(rel) > 1 else np.nan,
            **jacobian_theory(spec),
        })
    return pd.DataFrame(rows, columns=JACOBIAN_COLUMNS)
