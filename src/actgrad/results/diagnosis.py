"""Diagnosis: what is wrong with each network, what to change, and whether the change worked.

The lecture's real lesson is a skill: read the initial loss, the saturation, the gradients across depth and the
update:data ratios, and say what is wrong with a network and how to fix it. This module does it from the tables
:mod:`actgrad.results.summary` has already built (per run, per variant, the deep networks layer by layer, the
statistics, the significance and chaos tables) and from :mod:`actgrad.results.theory`. It runs inside the summary
step and writes two tables:

- ``diagnosis.csv``: one row per finding - variant, code, severity (severe / warning / info), the check and the
  quantity it measured, the measured value, the threshold it crossed, the theory's prediction where there is one,
  the figure that shows the evidence, the prescription as a config change (JSON, merged into the variant) and a
  sentence;
- ``fixes.csv``: for each variant ``X`` of the study that has a partner ``X__fixed`` (a prescription tried, as
  ``actgrad diagnose --write-fixes`` writes them), each of ``X``'s findings beside the same check on ``X__fixed``
  (gone, weaker or still there) and the final-loss difference from the significance table (the same Welch / Holm
  test as every other comparison).

Every threshold is a constant below, with where its number comes from.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd

from actgrad.data import EXPECTED_INIT_LOSS
from actgrad.results.vocabulary import EXPLODING_ABOVE, VANISHING_BELOW
from actgrad.study.settings import merge, variant_spec

SEVERE, WARNING, INFO = "severe", "warning", "info"
SEVERITIES = (SEVERE, WARNING, INFO)
FIXED_SUFFIX = "__fixed"  # the name of a variant with its prescription applied: <variant>__fixed

# -- thresholds --------------------------------------------------------------------------------------------------
# Initial loss above -ln(1/27) = 3.2958, in nats. Every well-initialised variant of the lecture (fix_softmax on) starts
# within 0.02 nats of it (the smoke study: at most 0.012); the lecture's original starts at ~27. A gap of 0.1 nat
# means logits with a std of about 0.45 (the loss of Gaussian logits is about ln 27 + std^2 / 2): a warning. A gap of
# 1 nat is logits with a std of about 1.5, a net confidently wrong at init that spends its first steps only squashing
# the logits (the lecture's hockey stick): severe.
INIT_LOSS_GAP_WARNING = 0.1
INIT_LOSS_GAP_SEVERE = 1.0
# tanh units saturated at init (|t| > 0.97, in %), above what the mean-field theory predicts for the same network
# initialised the lecture's way (Kaiming's gain 5/3 on W1 or on every layer; with BatchNorm q = 1), in percentage
# points. The theory matches the measured share to about 2 points (theory.csv) and the seeds spread it by 1-2
# points, so 10 points is a real excess: a warning. 25 points - a quarter of all units more - is severe; the
# lecture's two "too saturated" nets are far beyond it (original ~70 % against ~21 %, deep gain 3 ~43 % against
# ~10 %), its good ones at or below the reference (fix_tanh 5 %, Kaiming 20 %, BatchNorm 3 %).
SATURATION_EXCESS_WARNING = 10.0
SATURATION_EXCESS_SEVERE = 25.0
# torch.nn.init.calculate_gain's (GELU has none there: ReLU's)
KAIMING_GAIN = {"tanh": 5 / 3, "relu": math.sqrt(2), "gelu": math.sqrt(2)}
# Dead units (a tanh at |t| > 0.99, a ReLU at or below zero, for every example of a batch), in % of a layer's units,
# at init or at the end: every lecture variant has none (smoke and default study), and the lecture says a white
# column of the saturation map is a unit that never learns. 1 % is two units of the lecture's 200: a warning;
# 10 %: severe.
DEAD_WARNING = 1.0
DEAD_SEVERE = 10.0
# The update:data ratio (log10 of std(lr * grad) / std(weight)): the lecture's guide is about 1e-3 (-3). The
# median over the weight matrices and the steps of the first learning rate: one decade away is a warning, two
# decades severe. The lecture's variants sit within about half a decade of it (-2.4 to -3.3 in the smoke study).
UPDATE_RATIO_GUIDE = -3.0
UPDATE_RATIO_WARNING = 1.0
UPDATE_RATIO_SEVERE = 2.0
# Loss still falling: what doubling the steps would still gain, in nats, from a straight line of the minibatch loss
# against ln(step) over the second half of training at its last learning rate (a loss falling like a power of the
# steps falls by the same amount per doubling). 0.05 nats is the size of the differences the lecture's fixes make
# to the final loss (2.17 -> 2.13 -> 2.10): a run that would still gain more has stopped before such differences
# settle. The gain must also exceed STILL_FALLING_NOISE standard errors (of the mean over seeds), so that minibatch
# noise alone does not fire it: at 300 steps a run's standard error is about 0.05 nats, at 3,000 about 0.02.
STILL_FALLING = 0.05
STILL_FALLING_NOISE = 2.0
# Prescribed training length: the gain per doubling shrinks slowly, so (gain / threshold)^2 times the steps; at
# least 2x, at most 10x. A schedule that never decayed within the run gets the lecture's decay (lr / 10) at half of
# the new length; one that did keeps its decays at the same fraction of training.
MORE_STEPS_MIN, MORE_STEPS_MAX = 2, 10
# BatchNorm: the validation loss with the running statistics minus that with each minibatch's own statistics,
# in nats; the same 0.05 as above (a difference of the size the lecture's fixes make). Beyond it the running
# averages do not describe the batches the net was trained on: a small batch (or too few steps for the running
# averages' momentum).
BATCHNORM_GAP = 0.05
# Ten times that is severe: the running statistics then break the net (a deep BatchNorm net trained on batches of 4
# evaluates hundreds of nats worse with them than with each batch's own).
BATCHNORM_GAP_SEVERE = 0.5
LECTURE_BATCH_SIZE = 32

# Which figure of the report shows each check's evidence (a per-variant figure name, or a global one).
FIGURES = {
    "initial_loss": "loss_curves", "saturation": "init", "dead_units": "init", "signal_propagation":
    "activation_grads", "update_ratio": "updates", "divergence": "loss_curves", "still_falling": "loss_curves",
    "batchnorm_statistics": "init", "chaos": "sensitivity",
}
QUANTITIES = {
    "initial_loss": "init loss - (-ln 1/27), nats", "saturation": "tanh saturated at init (|t| > 0.97), %",
    "dead_units": "dead units, % of a layer", "signal_propagation": "gradient std, first layer / last, at init",
    "update_ratio": "median log10 update:data ratio", "divergence": "runs diverged, %",
    "still_falling": "loss a doubling of the steps would still gain, nats",
    "batchnorm_statistics": "val loss, running - batch statistics, nats", "chaos": "twins' decorrelation",
}
COLUMNS = ["variant", "code", "severity", "check", "quantity", "measured", "threshold", "predicted", "figure",
           "prescription", "sentence"]
FIX_COLUMNS = ["variant", "fixed", "code", "check", "severity", "quantity", "measured", "measured_fixed",
               "threshold", "outcome", "findings_fixed", "mean_before", "mean_after", "difference", "ci_low",
               "ci_high", "p_holm", "verdict", "metric"]
GONE, WEAKER, STILL = "gone", "weaker", "still there"
# Checks whose finding is a symptom with many causes: their prescription is tried only where no other finding of
# the same severity has one (a net that diverges because BatchNorm sees batches of 4 needs larger batches, not a
# smaller learning rate; one still falling at the end because its learning rate is wrong needs the right one).
SYMPTOMS = ("divergence", "still_falling")


def _num(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x


def _grade(value: float, warning: float, severe: float) -> str | None:
    if not math.isfinite(value):
        return None
    return SEVERE if value >= severe else WARNING if value >= warning else None


def _check(variant, check, measured, threshold, severity=None, code="", predicted=math.nan, prescription=None,
           sentence="") -> dict:
    return {"variant": variant, "check": check, "code": code, "severity": severity, "measured": _num(measured),
            "threshold": _num(threshold), "predicted": _num(predicted), "prescription": prescription or {},
            "sentence": sentence, "quantity": QUANTITIES[check], "figure": FIGURES[check]}


def _sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits}g}")


# -- the theory's side -------------------------------------------------------------------------------------------


def recommended_gain(activation: str, n_layers: int, input_second_moment: float = 1.0) -> float:
    """The gain at which the mean-field theory predicts the same gradient std at the first hidden layer as at the
    last (a deep stack without normalisation, :func:`actgrad.results.theory.propagate`): for ReLU Kaiming's
    sqrt(2) at any depth, for tanh 1.55 at 2 layers, 1.39 at 5, 1.29 at 10 (below Kaiming's 5/3, which keeps the
    activations' spread instead). Kaiming's gain where the root cannot be bracketed."""
    from scipy.optimize import brentq

    from actgrad.results import theory

    if n_layers < 2:
        return KAIMING_GAIN.get(activation, 1.0)

    def off(gain):
        return math.log(theory.propagate(n_layers, gain, activation, input_second_moment)[0].grad_std_rel_last)

    try:
        return float(brentq(off, 0.3, 5.0, xtol=1e-6))
    except ValueError:
        return KAIMING_GAIN.get(activation, 1.0)


def _kaiming_reference(spec: dict) -> dict:
    """The variant's network initialised the lecture's way: Kaiming's gain on W1 (b1 x 0.01) or on every layer."""
    ref = copy.deepcopy(spec)
    gain = KAIMING_GAIN.get(spec["activation"], 5 / 3)
    ref["gain"] = gain
    if spec["model"] == "mlp":
        ref["init"] = {**spec["init"], "W1": "kaiming", "b1": 0.01}
    return ref


def _predicted_saturation(spec: dict, block_size: int) -> float:
    from actgrad.results.theory import predict_variant

    p = predict_variant(spec, block_size)
    sat = p[(p.kind == "activation") & (p.stat == "saturated_pct")].value
    return float(sat.mean()) if len(sat) else math.nan


def _gain_fix(spec: dict) -> dict:
    return {"gain": _sig(recommended_gain(spec["activation"], spec["n_layers"]), 3)}


def _init_fix(spec: dict) -> dict:
    """The lecture's hidden-layer init for a one-hidden-layer net: Kaiming W1, b1 x 0.01, the activation's gain."""
    fix = {"init": {"W1": "kaiming", "b1": 0.01}}
    gain = KAIMING_GAIN.get(spec["activation"], 5 / 3)
    if not math.isclose(float(spec["gain"]), gain, rel_tol=1e-6):
        fix["gain"] = _sig(gain, 4)
    return fix


def _scaled_schedule(spec: dict, factor: float) -> dict:
    return {"lr_schedule": [{"from_step": int(e["from_step"]), "lr": _sig(float(e["lr"]) * factor)}
                            for e in spec["lr_schedule"]]}


# -- the checks: each measures one quantity for one variant, and grades it --------------------------------------


def check_initial_loss(name: str, spec: dict, v: pd.Series) -> dict:
    gap = _num(v.get("init_loss_mean")) - EXPECTED_INIT_LOSS
    severity = _grade(gap, INIT_LOSS_GAP_WARNING, INIT_LOSS_GAP_SEVERE)
    fix, sentence = {}, ""
    if severity:
        if spec["model"] == "mlp":
            w2 = spec["init"]["W2"]
            fix = {"init": {"W2": min(0.01, float(w2)) if isinstance(w2, (int, float)) else 0.01, "b2": 0}}
            what = "scale W2 to 0.01 and zero b2"
        else:
            fix = {"last_layer_scale": _sig(min(0.1, float(spec["last_layer_scale"]) * 0.1))}
            what = f"scale the last layer by {fix['last_layer_scale']:g}"
        sentence = (f"The initial loss is {gap:.2f} nats above -ln(1/27) = {EXPECTED_INIT_LOSS:.4f}: the output layer "
                    f"is overconfident at init (large logits, confidently wrong); {what} so that the logits start "
                    "near zero.")
    return _check(name, "initial_loss", gap, INIT_LOSS_GAP_WARNING if severity != SEVERE else INIT_LOSS_GAP_SEVERE,
                  severity, "overconfident_output" if severity else "", 0.0, fix, sentence)


def check_saturation(name: str, spec: dict, v: pd.Series, block_size: int) -> dict | None:
    if spec["activation"] != "tanh":
        return None
    measured = _num(v.get("sat97_init_mean"))
    reference = _predicted_saturation(_kaiming_reference(spec), block_size)
    excess = measured - reference if math.isfinite(reference) else math.nan
    severity = _grade(excess, SATURATION_EXCESS_WARNING, SATURATION_EXCESS_SEVERE)
    fix, sentence = {}, ""
    if severity:
        if spec["model"] == "mlp":
            fix, what = _init_fix(spec), "draw W1 with Kaiming's gain (5/3)/sqrt(fan_in) and b1 x 0.01"
        else:
            fix = _gain_fix(spec)
            what = f"use gain {fix['gain']:g} (the theory's for {spec['n_layers']} tanh layers)"
        sentence = (f"{measured:.0f} % of the tanh units are saturated at init, {excess:.0f} points more than the "
                    f"same net initialised the lecture's way ({reference:.0f} % predicted): their gradients are "
                    f"squashed; {what}.")
    threshold = SATURATION_EXCESS_SEVERE if severity == SEVERE else SATURATION_EXCESS_WARNING
    return _check(name, "saturation", measured, reference + threshold if math.isfinite(reference) else math.nan,
                  severity, "saturated_activations" if severity else "", reference, fix, sentence)


def check_dead_units(name: str, spec: dict, stats: pd.DataFrame) -> dict | None:
    dead = stats[(stats.variant == name) & (stats.kind == "activation") & (stats.stat == "dead_units")]
    if dead.empty:
        return None
    steps = [s for s in (0, int(dead.step.max())) if s in set(dead.step)]
    per_layer = dead[dead.step.isin(steps)].groupby(["step", "layer"]).value.mean() / spec["n_hidden"] * 100
    at_init = per_layer[per_layer.index.get_level_values("step") == 0]
    # at init if it is found there (its cause is the init), else at the end
    pick = at_init if len(at_init) and at_init.max() >= DEAD_WARNING else per_layer
    worst = float(pick.max())
    step, layer = pick.idxmax()
    severity = _grade(worst, DEAD_WARNING, DEAD_SEVERE)
    fix, sentence = {}, ""
    if severity and step == 0:
        fix = _init_fix(spec) if spec["model"] == "mlp" else _gain_fix(spec)
        what = "; ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in fix.items())
        sentence = (f"{worst:.0f} % of {layer}'s units are dead at init (inactive for every example of the "
                    f"batch): they never learn; {what}.")
    elif severity:
        sentence = (f"{worst:.0f} % of {layer}'s units died during training (inactive for every example of the "
                    f"batch at step {step}, not at init): a learning rate too high or gradients too large kill "
                    "units; see the other findings.")
    return _check(name, "dead_units", worst, DEAD_SEVERE if severity == SEVERE else DEAD_WARNING, severity,
                  "dead_units" if severity else "", math.nan, fix, sentence)


def check_signal_propagation(name: str, spec: dict, deep_variants: pd.DataFrame) -> dict | None:
    from actgrad.results import theory

    row = deep_variants[deep_variants.variant == name]
    if spec["model"] != "deep" or spec["norm"] != "none" or row.empty:
        return None
    ratio = _num(row.grad_ratio.iloc[0])
    gain, activation, layers = float(spec["gain"]), spec["activation"], spec["n_layers"]
    predicted = theory.propagate(layers, gain, activation)[0].grad_std_rel_last if activation in theory.ACTIVATIONS \
        else math.nan
    code = "vanishing_gradients" if ratio < VANISHING_BELOW else "exploding_gradients" if ratio > EXPLODING_ABOVE \
        else ""
    severity = SEVERE if code and math.isfinite(ratio) else None
    fix, sentence = {}, ""
    if severity:
        fix = _gain_fix(spec)
        chi1 = theory.chi_1(gain, activation)
        # At the critical gain chi_1 is 1 to rounding: what the gradient does there comes from the variance
        # drifting to its fixed point layer by layer, not from the phase.
        phase = ("at the critical point (chi_1 = 1: the gradient changes only as the variance drifts layer by layer)"
                 if math.isclose(chi1, 1.0, abs_tol=1e-3) else
                 "in the ordered phase (chi_1 < 1: gradients shrink)" if chi1 < 1 else
                 "in the chaotic phase (chi_1 > 1: gradients grow)")
        sentence = (f"At init the gradient at the first layer is {ratio:.2g} times that at the last "
                    f"(theory: {predicted:.2g}); at gain {gain:g} the mean-field theory puts this {activation} "
                    f"stack {phase[:-1]}, chi_1 = {chi1:.2f}); use gain {fix['gain']:g}, the theory's gain "
                    f"for {layers} {activation} layers (or BatchNorm).")
    threshold = VANISHING_BELOW if code == "vanishing_gradients" else EXPLODING_ABOVE if code else math.nan
    return _check(name, "signal_propagation", ratio, threshold, severity, code, predicted, fix, sentence)


def first_lr_median(name: str, spec: dict, stats: pd.DataFrame) -> float:
    """The median log10 update:data ratio of the weight matrices over the steps of the first learning rate."""
    sub = stats[stats.variant == name]
    # the weight matrices (embedding, Linear weights), not BatchNorm's gain and shift, which are stored as rows
    matrices = set(sub[sub.kind == "weight_grad"].layer)
    weights = {layer for layer in matrices if str(layer).endswith(".weight")} or matrices
    updates = sub[(sub.kind == "update") & sub.layer.isin(weights)]
    later = [int(e["from_step"]) for e in spec["lr_schedule"][1:]]
    if later:
        updates = updates[updates.step < min(later)]
    values = updates.value.astype(float)
    values = values[np.isfinite(values)]
    return float(values.median()) if len(values) else math.nan


def check_update_ratio(name: str, spec: dict, stats: pd.DataFrame) -> dict | None:
    median = first_lr_median(name, spec, stats)
    if not math.isfinite(median):
        return None
    off = median - UPDATE_RATIO_GUIDE
    severity = _grade(abs(off), UPDATE_RATIO_WARNING, UPDATE_RATIO_SEVERE)
    fix, sentence, code = {}, "", ""
    if severity:
        factor = 10 ** -off
        code = "learning_rate_too_high" if off > 0 else "learning_rate_too_low"
        fix = _scaled_schedule(spec, factor)
        sentence = (f"The weights' median update:data ratio is 10^{median:.1f}, {abs(off):.1f} decades "
                    f"{'above' if off > 0 else 'below'} the lecture's guide of 10^-3: the learning rate is too "
                    f"{'high' if off > 0 else 'low'}; multiply it by {_sig(factor):g} "
                    f"(lr {_sig(float(spec['lr_schedule'][0]['lr']) * factor):g}).")
    width = UPDATE_RATIO_SEVERE if severity == SEVERE else UPDATE_RATIO_WARNING
    return _check(name, "update_ratio", median, UPDATE_RATIO_GUIDE + (width if off > 0 else -width), severity,
                  code, UPDATE_RATIO_GUIDE, fix, sentence)


def check_divergence(name: str, spec: dict, v: pd.Series, stats: pd.DataFrame) -> dict:
    seeds, diverged = int(v.get("seeds", 0) or 0), int(v.get("diverged", 0) or 0)
    share = 100 * diverged / seeds if seeds else math.nan
    fix, sentence, severity = {}, "", None
    if diverged:
        severity = SEVERE
        median = first_lr_median(name, spec, stats)
        factor = 10 ** (UPDATE_RATIO_GUIDE - median) if math.isfinite(median) and median > UPDATE_RATIO_GUIDE else 0.1
        fix = _scaled_schedule(spec, min(factor, 0.1))
        sentence = (f"{diverged} of {seeds} runs diverged; lower the learning rate (x {_sig(min(factor, 0.1)):g}).")
    return _check(name, "divergence", share, 0.0, severity, "diverged" if severity else "", math.nan, fix, sentence)


def doubling_gain(losses, lr_schedule: list[dict]) -> tuple[float, float]:
    """What doubling the steps would still gain (nats) and its standard error, from a least-squares line of the
    minibatch loss against ln(step) over the second half of the run, after its last change of learning rate
    (and a twentieth of the run for the change to settle). NaN for a run too short or not finite there."""
    losses = np.asarray(losses, dtype=float)
    steps = len(losses)
    changes = [int(e["from_step"]) + steps // 20 for e in lr_schedule[1:] if int(e["from_step"]) < steps]
    start = max([steps // 2, *changes])
    y = losses[start:]
    if len(y) < 20 or not np.isfinite(y).all():
        return math.nan, math.nan
    x = np.log(np.arange(start, steps) + 1.0)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    se = residual.std(ddof=2) / math.sqrt(((x - x.mean()) ** 2).sum())
    return float(-slope * math.log(2)), float(se * math.log(2))


def check_still_falling(name: str, spec: dict, gains: list[tuple[float, float]]) -> dict | None:
    gains = [(g, se) for g, se in gains if math.isfinite(g)]
    if not gains:
        return None
    gain = float(np.mean([g for g, _ in gains]))
    se = float(math.sqrt(sum(s ** 2 for _, s in gains)) / len(gains))
    severity = WARNING if gain > STILL_FALLING and gain > STILL_FALLING_NOISE * se else None
    fix, sentence = {}, ""
    if severity:
        factor = int(min(MORE_STEPS_MAX, max(MORE_STEPS_MIN, math.ceil((gain / STILL_FALLING) ** 2))))
        steps = int(spec["max_steps"]) * factor
        schedule = spec["lr_schedule"]
        decayed = [e for e in schedule[1:] if int(e["from_step"]) < int(spec["max_steps"])]
        if decayed:
            schedule = [{"from_step": int(e["from_step"]) * factor, "lr": e["lr"]} for e in schedule]
        else:
            lr = float(schedule[0]["lr"])
            schedule = [{"from_step": 0, "lr": lr}, {"from_step": steps // 2, "lr": _sig(lr / 10)}]
        fix = {"max_steps": steps, "lr_schedule": schedule}
        decay = "" if decayed else ", decaying the learning rate at half"
        sentence = (f"The loss was still falling at the end: doubling the steps would gain about {gain:.2f} nats "
                    f"(+- {se:.2f}); train for {steps:,} steps ({factor}x){decay}.")
    return _check(name, "still_falling", gain, STILL_FALLING, severity, "still_improving" if severity else "",
                  math.nan, fix, sentence)


def check_batchnorm(name: str, spec: dict, runs: pd.DataFrame) -> dict | None:
    if spec["norm"] != "batchnorm":
        return None
    ok = runs[(runs.variant == name) & (runs.status == "ok")]
    gap = (ok.val_loss.astype(float) - ok.val_loss_batch_stats.astype(float)).dropna()
    if gap.empty:
        return None
    measured = float(gap.mean())
    severity = _grade(measured, BATCHNORM_GAP, BATCHNORM_GAP_SEVERE)
    fix, sentence = {}, ""
    if severity:
        if spec["batch_size"] < LECTURE_BATCH_SIZE:
            fix, what = {"batch_size": LECTURE_BATCH_SIZE}, f"train on batches of {LECTURE_BATCH_SIZE}"
        else:
            fix, what = {"norm": "layernorm"}, "use LayerNorm (no running statistics)"
        sentence = (f"With its running statistics the net evaluates {measured:.3f} nats worse than with each batch's "
                    f"own: at batch {spec['batch_size']} the running averages do not describe the batches it was "
                    f"trained on; {what}.")
    return _check(name, "batchnorm_statistics", measured,
                  BATCHNORM_GAP_SEVERE if severity == SEVERE else BATCHNORM_GAP, severity,
                  "batchnorm_running_statistics" if severity else "", math.nan, fix, sentence)


def check_chaos(name: str, chaos: pd.DataFrame, significance: pd.DataFrame) -> dict | None:
    row = chaos[chaos.variant == name]
    if row.empty or str(row.chaotic.iloc[0]) not in ("True", "true", "1", "1.0"):
        return None
    row = row.iloc[0]
    involved = significance[(significance.before == name) | (significance.after == name)] \
        if not significance.empty else significance
    needed = pd.to_numeric(involved.seeds_needed, errors="coerce").dropna() if len(involved) else pd.Series([])
    seeds = f"its comparisons need up to {int(needed.max())} seeds per variant" if len(needed) else \
        "compare it over several seeds, never one run"
    # With one seed there is no seed spread to decorrelate against: the chaos table's basis is the twins' distance.
    evidence = (f"twins decorrelated {float(row.decorrelation):.2f}" if math.isfinite(float(row.decorrelation))
                else str(row.basis))
    sentence = (f"Training is chaotic ({evidence}): a single run's final loss depends on float rounding; {seeds}.")
    return _check(name, "chaos", row.decorrelation, row.threshold, INFO, "chaotic_training", math.nan, {}, sentence)


# -- the tables ---------------------------------------------------------------------------------------------------


def measure(config: dict, tables: dict[str, pd.DataFrame], runs_by_variant: dict | None = None) -> list[dict]:
    """Every check on every variant, passed or not (``severity`` None where it passed)."""
    variants = tables["variants"].set_index("variant") if not tables["variants"].empty else pd.DataFrame()
    stats = tables["stats"]
    if stats.empty:
        stats = pd.DataFrame(columns=["variant", "step", "layer", "kind", "stat", "value"])
    out = []
    for name in config["variants"]:
        if name not in variants.index:
            continue
        spec, v = variant_spec(config, name), variants.loc[name]
        finished = set(tables["summary"][(tables["summary"].variant == name)
                                         & (tables["summary"].status == "ok")].seed.astype(int))
        gains = [doubling_gain(r.losses().loss.to_numpy(), spec["lr_schedule"])
                 for r in (runs_by_variant or {}).get(name, []) if r.seed in finished]
        checks = [check_initial_loss(name, spec, v), check_saturation(name, spec, v, config["block_size"]),
                  check_dead_units(name, spec, stats),
                  check_signal_propagation(name, spec, tables["deep_variants"]),
                  check_update_ratio(name, spec, stats), check_divergence(name, spec, v, stats),
                  check_still_falling(name, spec, gains), check_batchnorm(name, spec, tables["summary"]),
                  check_chaos(name, tables["chaos"], tables["significance"])]
        out += [c for c in checks if c is not None]
    return out


def findings_table(checks: list[dict]) -> pd.DataFrame:
    rows = [dict(c, prescription=json.dumps(c["prescription"], sort_keys=True)) for c in checks if c["severity"]]
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return table.sort_values("severity", key=lambda s: s.map(order), kind="stable").reset_index(drop=True) \
        if len(table) else table


def fixes_table(config: dict, checks: list[dict], significance: pd.DataFrame) -> pd.DataFrame:
    """Each finding of a variant that has a ``__fixed`` partner, against the same check on the partner."""
    by = {(c["variant"], c["check"]): c for c in checks}
    rows = []
    rank = {SEVERE: 2, WARNING: 1, INFO: 0, None: -1}
    for name in config["variants"]:
        fixed = name + FIXED_SUFFIX
        if fixed not in config["variants"]:
            continue
        sig = significance[(significance.before == name) & (significance.after == fixed)] \
            if not significance.empty else significance
        loss = sig.iloc[0] if len(sig) else {}
        after_findings = ";".join(c["code"] for c in checks if c["variant"] == fixed and c["severity"])
        for c in (c for c in checks if c["variant"] == name and c["severity"]):
            partner = by.get((fixed, c["check"]))
            after = partner["severity"] if partner else None
            outcome = GONE if after is None or (c["severity"] == INFO and after is None) else \
                WEAKER if rank[after] < rank[c["severity"]] else STILL
            rows.append({
                "variant": name, "fixed": fixed, "code": c["code"], "check": c["check"], "severity": c["severity"],
                "quantity": c["quantity"], "measured": c["measured"],
                "measured_fixed": partner["measured"] if partner else math.nan, "threshold": c["threshold"],
                "outcome": outcome, "findings_fixed": after_findings,
                **{k: loss.get(k, math.nan) if len(sig) else math.nan
                   for k in ("mean_before", "mean_after", "difference", "ci_low", "ci_high", "p_holm")},
                "verdict": loss.get("verdict", "") if len(sig) else "not compared",
                "metric": loss.get("metric", "") if len(sig) else "",
            })
    return pd.DataFrame(rows, columns=FIX_COLUMNS)


def diagnosis_tables(config: dict, tables: dict[str, pd.DataFrame], runs_by_variant: dict) -> dict[str, pd.DataFrame]:
    """The summary step's call: ``diagnosis`` and ``fixes`` from the tables it has built."""
    checks = measure(config, tables, runs_by_variant)
    return {"diagnosis": findings_table(checks), "fixes": fixes_table(config, checks, tables["significance"])}


# -- prescriptions into a study ------------------------------------------------------------------------------------


def prescription_of(findings: pd.DataFrame, variant: str, include_warnings: bool = True) -> dict:
    """The config change for one variant: the prescriptions of its most severe findings that have one, merged in
    the table's order (a key one finding sets is not overridden by a later one)."""
    rows = findings[findings.variant == variant]
    fixes = {s: {"cause": [], "symptom": []} for s in SEVERITIES}
    for _, row in rows.iterrows():
        fix = json.loads(row.prescription) if isinstance(row.prescription, str) and row.prescription else {}
        if fix:
            fixes[row.severity]["symptom" if row.get("check") in SYMPTOMS else "cause"].append(fix)
    # The most severe findings are treated first: a warning's fix is applied only where nothing severe has one
    # (an overconfident output beside exploding gradients is their consequence, and goes with them); within a
    # severity, a symptom's fix (divergence, a loss still falling) only where no cause has one.
    levels = (SEVERE, WARNING) if include_warnings else (SEVERE,)
    chosen = next((fixes[s]["cause"] or fixes[s]["symptom"] for s in levels
                   if fixes[s]["cause"] or fixes[s]["symptom"]), [])
    change: dict = {}
    for fix in chosen:
        change = merge(fix, change)  # what is set already wins
    return change


def fix_variants(config_as_written: dict, findings: pd.DataFrame, include_warnings: bool = True) -> dict:
    """``<variant>__fixed`` for every variant with a prescription: its definition with the change merged in."""
    out = {}
    for name in dict.fromkeys(findings.variant):
        if name.endswith(FIXED_SUFFIX) or name not in config_as_written["variants"]:
            continue
        change = prescription_of(findings, name, include_warnings)
        if not change:
            continue
        variant = {k: v for k, v in config_as_written["variants"][name].items() if k not in ("references", "sweep")}
        codes = ", ".join(findings[(findings.variant == name) & findings.severity.isin(
            (SEVERE, WARNING) if include_warnings else (SEVERE,))].code)
        fixed = merge(variant, change)
        fixed["description"] = f"{name} with the diagnosis's prescription ({codes}): {json.dumps(change)}"
        out[name + FIXED_SUFFIX] = fixed
    return out


def fix_study(config_as_written: dict, completed: dict, findings: pd.DataFrame, base: str,
              include_warnings: bool = True) -> dict:
    """A study that is ``base`` plus each flagged variant's ``__fixed`` partner, with the comparisons of ``base``
    written out (a config that names families has only those) and a family ``prescriptions`` pairing each variant
    with its fix, so that the significance table tests each before/after with the same Welch / Holm test."""
    from actgrad.study.comparisons import resolve_comparisons, sweep_grids

    variants = fix_variants(config_as_written, findings, include_warnings)
    families: dict[str, dict] = {}
    for c in resolve_comparisons(completed, sweep_grids(completed) or None):
        families.setdefault(c.family, {"pairs": []})["pairs"].append([c.before, c.after])
    if not variants:
        raise ValueError("no finding has a prescription: there is nothing to fix")
    families["prescriptions"] = {"pairs": [[name[: -len(FIXED_SUFFIX)], name] for name in variants]}
    study = {"base": base, "variants": variants, "comparisons": {"families": families}}
    if "title" in completed:
        study["title"] = f"{completed['title']}: the diagnosis's prescriptions tried"
    return study
