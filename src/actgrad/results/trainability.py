"""How deep can it go: the deep tanh net over depth x gain, trained for a fixed budget, against the theory's depth
scales (``results/trainability.csv``).

The question is asked where a sweep varies both ``n_layers`` and ``gain`` of the deep net
(:func:`actgrad.report.contents.trainability_sweeps`). One row per (norm, gain, depth), over the seeds of that cell:

* **Does it train?** A run *trains* within its budget when it finished and its final validation loss is at least
  :data:`~actgrad.results.vocabulary.TRAINS_MARGIN` nats below the *input-blind baseline*: the validation loss of
  predicting every character by its frequency in the training split (:func:`unigram_loss`), the best a net can do
  whose output has forgotten its input. A deep net whose signal does not get through learns exactly that (through
  its last biases) and stops there. A cell trains when more than half of its runs do.
* **The boundary**: per (norm, gain), the deepest depth that trains and the shallowest that does not, against
  Schoenholz et al.'s (2017) trainable depth ``6 xi_c`` (:func:`actgrad.results.theory.spec_depth_scales`; no
  normalisation only) with a verdict (:func:`boundary_verdict`).
* **The gradient at init**: the activation gradient's std at the first tanh layer over the last one's at step 0,
  measured (mean over seeds), against ``chi_1^((L-1)/2)`` (the fixed point's per-layer factor, L-1 layers back) and
  the layer-by-layer mean-field prediction (:func:`actgrad.results.theory.propagate`, which also follows the length's
  approach to its fixed point). With BatchNorm the prediction is propagate's infinite-batch one (Yang et al. 2019:
  the gradient explodes with depth whatever the gain); per (norm, gain) the measured growth per layer (a fit of
  ln ratio against L-1) against the predicted one, and whether the measured ratio grows with every depth step.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from actgrad.report.contents import trainability_sweeps
from actgrad.results.vocabulary import TRAINS_MARGIN
from actgrad.rundir import natural_key
from actgrad.study.settings import variant_spec

NORM_ORDER = ("none", "batchnorm", "layernorm")
# What boundary_verdict says, per (norm, gain).
HOLDS = "holds"  # every depth up to 6 xi_c trains, every deeper one does not
SHALLOWER = "stops shallower"  # some depth at or below 6 xi_c does not train (none above it does)
DEEPER = "trains deeper"  # some depth above 6 xi_c trains (every one at or below it does)
MIXED = "mixed"  # both
NO_THEORY = "no theory"  # with normalisation: 6 xi_c is for a stack without it

TRAINABILITY_COLUMNS = [
    "norm", "gain", "n_layers", "variants", "runs", "finished", "diverged", "trained_runs", "init_loss", "val_loss",
    "loss_fall", "baseline_loss", "threshold", "trains", "grad_ratio", "grad_ratio_chi1", "grad_ratio_predicted",
    "grad_ratio_log10_off", "chi_1", "xi_c", "trainable_depth", "deepest_trained", "shallowest_failed", "boundary",
    "grad_per_layer", "grad_per_layer_predicted", "grad_grows",
]


def unigram_loss(y_train, y_val, vocab_size: int = 27) -> float:
    """The validation cross-entropy of predicting every character by its frequency in the training split: what a
    net that ignores its input can reach at best (a character never seen in training counts as probability 0)."""
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=vocab_size).astype(float)
    p = counts / counts.sum()
    with np.errstate(divide="ignore"):
        return float(-np.log(p[np.asarray(y_val, dtype=np.int64)]).mean())


def baseline_from_splits(path) -> float:
    """:func:`unigram_loss` of the pipeline's splits file (data/splits.pt)."""
    from actgrad.data import load_splits

    splits = load_splits(path)
    return unigram_loss(splits["Ytrain"].numpy(), splits["Ydev"].numpy(), len(splits["itos"]))


def boundary_verdict(depths, trains, trainable_depth: float) -> str:
    """Whether the measured depths that train (``trains``, one bool per depth; None for unknown) fall on the side of
    ``trainable_depth`` (6 xi_c) the theory puts them: :data:`HOLDS`, :data:`SHALLOWER`, :data:`DEEPER`,
    :data:`MIXED`; :data:`NO_THEORY` where ``trainable_depth`` is nan, "" where nothing is known."""
    if trainable_depth is None or math.isnan(trainable_depth):
        return NO_THEORY
    known = [(d, t) for d, t in zip(depths, trains) if t is not None and not pd.isna(t)]
    if not known:
        return ""
    short = any(not t for d, t in known if d <= trainable_depth)
    deep = any(t for d, t in known if d > trainable_depth)
    return MIXED if short and deep else SHALLOWER if short else DEEPER if deep else HOLDS


def _per_layer(depths, ratios) -> float:
    """The gradient std's factor per layer: exp of the least-squares slope of ln(ratio) on L-1 through the origin
    (a one-layer net has ratio 1)."""
    pairs = [(d - 1, math.log(r)) for d, r in zip(depths, ratios) if d > 1 and np.isfinite(r) and r > 0]
    if not pairs:
        return np.nan
    x, y = np.array(pairs).T
    return float(math.exp((x @ y) / (x @ x)))


def _grows(depths, ratios) -> object:
    finite = [r for _, r in sorted(zip(depths, ratios)) if np.isfinite(r)]
    if len(finite) < 2:
        return None
    return bool(all(b > a for a, b in zip(finite, finite[1:])))


def _theory(spec: dict) -> dict:
    from actgrad.results import theory  # scipy: imported only by the step that predicts

    n_layers, gain, norm = int(spec["n_layers"]), float(spec["gain"]), theory.spec_norm(spec)
    activation = spec["activation"]
    if activation not in theory.ACTIVATIONS:
        return {}
    layers = theory.propagate(n_layers, gain, activation, 1.0, 0.0, norm)  # the deep net's C is randn: E[x^2] = 1
    out = {"grad_ratio_predicted": layers[0].grad_std_rel_last,
           "grad_per_layer_predicted": math.sqrt(layers[-1].grad_gain)}
    if norm == "none":
        scales = theory.spec_depth_scales(spec)
        out.update(chi_1=scales.chi_1, xi_c=scales.xi_c, trainable_depth=scales.trainable_depth,
                   grad_ratio_chi1=scales.chi_1 ** ((n_layers - 1) / 2),
                   grad_per_layer_predicted=math.sqrt(scales.chi_1))
    return out


def trainability_table(config: dict, runs: pd.DataFrame, init: pd.DataFrame, baseline: float) -> pd.DataFrame:
    """``results/trainability.csv``: one row per (norm, gain, depth) of the :func:`trainability_sweeps`' variants.

    ``runs`` is the summary's run table, ``init`` the per-layer statistics at step 0
    (:func:`actgrad.results.summary.init_layer_stats`), ``baseline`` the input-blind validation loss
    (:func:`unigram_loss`; nan: unknown, and then no cell is said to train or not). The module's docstring states
    the rules; per (norm, gain) the boundary and gradient-growth columns repeat on each of its rows.
    """
    sweeps = trainability_sweeps(config)
    names = [n for n, v in config["variants"].items() if v.get("sweep", {}).get("name") in sweeps]
    threshold = baseline - TRAINS_MARGIN if np.isfinite(baseline) else np.nan
    cells: dict[tuple, list[str]] = {}
    specs = {}
    for name in names:
        spec = specs[name] = variant_spec(config, name)
        cells.setdefault((spec["norm"], float(spec["gain"]), int(spec["n_layers"])), []).append(name)
    rows = []
    for (norm, gain, depth), members in cells.items():
        sub = runs[runs.variant.isin(members)]
        ok = sub[sub.status == "ok"]
        val = ok.val_loss.astype(float)
        trained = int((val <= threshold).sum()) if np.isfinite(threshold) else 0
        ratios = []
        for r in sub.itertuples():
            mine = init[(init.variant == r.variant) & (init.seed == r.seed) & (init.quantity == "grad_std_rel_last")]
            if len(mine):
                first = min(mine.layer, key=natural_key)
                ratios.append(float(mine[mine.layer == first].value.iloc[0]))
        ratio = float(np.mean(ratios)) if ratios else np.nan
        predicted = _theory(specs[members[0]])
        chi1_ratio = predicted.get("grad_ratio_chi1", np.nan)
        against = chi1_ratio if norm == "none" else predicted.get("grad_ratio_predicted", np.nan)
        rows.append({
            "norm": norm, "gain": gain, "n_layers": depth, "variants": ";".join(members), "runs": len(sub),
            "finished": len(ok), "diverged": int((sub.status == "diverged").sum()), "trained_runs": trained,
            "init_loss": sub.init_loss.astype(float).mean() if len(sub) else np.nan,
            "val_loss": val.mean() if len(val) else np.nan,
            "loss_fall": (ok.init_loss.astype(float) - val).mean() if len(val) else np.nan,
            "baseline_loss": baseline, "threshold": threshold,
            "trains": (trained > len(sub) / 2) if np.isfinite(threshold) and len(sub) else None,
            "grad_ratio": ratio, "grad_ratio_chi1": chi1_ratio,
            "grad_ratio_predicted": predicted.get("grad_ratio_predicted", np.nan),
            "grad_ratio_log10_off": (math.log10(ratio / against) if np.isfinite(ratio) and ratio > 0
                                     and np.isfinite(against) and against > 0 else np.nan),
            "chi_1": predicted.get("chi_1", np.nan), "xi_c": predicted.get("xi_c", np.nan),
            "trainable_depth": predicted.get("trainable_depth", np.nan),
            "grad_per_layer_predicted": predicted.get("grad_per_layer_predicted", np.nan),
        })
    table = pd.DataFrame(rows, columns=[c for c in TRAINABILITY_COLUMNS if c not in (
        "deepest_trained", "shallowest_failed", "boundary", "grad_per_layer", "grad_grows")])
    if table.empty:
        return pd.DataFrame(columns=TRAINABILITY_COLUMNS)
    order = {n: i for i, n in enumerate(NORM_ORDER)}
    table = table.sort_values(["norm", "gain", "n_layers"], key=lambda s: s.map(order) if s.name == "norm" else s,
                              kind="stable").reset_index(drop=True)
    for column in ("deepest_trained", "shallowest_failed", "boundary", "grad_per_layer", "grad_grows"):
        table[column] = pd.Series([None] * len(table), dtype=object)
    for _, group in table.groupby(["norm", "gain"], sort=False):
        depths, trains = group.n_layers.tolist(), group.trains.tolist()
        yes = [d for d, t in zip(depths, trains) if t is True]
        no = [d for d, t in zip(depths, trains) if t is False]
        table.loc[group.index, "deepest_trained"] = max(yes) if yes else np.nan
        table.loc[group.index, "shallowest_failed"] = min(no) if no else np.nan
        table.loc[group.index, "boundary"] = boundary_verdict(depths, trains, float(group.trainable_depth.iloc[0]))
        table.loc[group.index, "grad_per_layer"] = _per_layer(depths, group.grad_ratio.tolist())
        table.loc[group.index, "grad_grows"] = _grows(depths, group.grad_ratio.tolist())
    return table[TRAINABILITY_COLUMNS]


CURVE_COLUMNS = ["sweep", "activation", "gain", "chi_1", "xi_c", "trainable_depth"]
CURVE_POINTS = 200  # dense gains, from half the sweep's smallest to twice its largest


def trainability_curve(config: dict) -> pd.DataFrame:
    """``results/trainability_curve.csv``: the theory's trainable depth 6 xi_c (with chi_1 and xi_c) over a dense grid
    of gains, per trainability sweep without normalisation (the curve the section's phase diagram draws); the stack
    starts from q_1 = gain^2, as the deep net's (:func:`actgrad.results.theory.spec_depth_scales`)."""
    from actgrad.results import theory  # scipy: imported only by the step that predicts

    rows = []
    for sweep in trainability_sweeps(config):
        specs = [variant_spec(config, n) for n, v in config["variants"].items()
                 if v.get("sweep", {}).get("name") == sweep]
        activations = {s["activation"] for s in specs}
        if any(theory.spec_norm(s) != "none" for s in specs) or len(activations) != 1 \
                or not activations <= set(theory.ACTIVATIONS):
            continue
        gains = [float(s["gain"]) for s in specs]
        for gain in np.geomspace(min(gains) / 2, max(gains) * 2, CURVE_POINTS):
            spec = dict(specs[0], gain=float(gain))
            d = theory.spec_depth_scales(spec)
            rows.append({"sweep": sweep, "activation": spec["activation"], "gain": float(gain), "chi_1": d.chi_1,
                         "xi_c": d.xi_c, "trainable_depth": d.trainable_depth})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def trainability_tables(config: dict, runs: pd.DataFrame, init: pd.DataFrame, splits=None) -> dict[str, pd.DataFrame]:
    """Both tables of the question (``trainability`` and ``trainability_curve``), empty where no sweep asks it;
    ``splits`` (data/splits.pt) gives the input-blind baseline."""
    asked = bool(trainability_sweeps(config))
    baseline = baseline_from_splits(splits) if splits and asked else np.nan
    return {"trainability": trainability_table(config, runs, init, baseline),
            "trainability_curve": trainability_curve(config)}
