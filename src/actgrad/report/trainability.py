"""The report's section "How deep can it go": its figure (:func:`trainability_figure`, drawn by the figure step) and
its context (:func:`trainability_section`, for the template), both read from ``results/trainability.csv``
(:mod:`actgrad.results.trainability`) and ``results/trainability_curve.csv`` (the 6 xi_c curve); they compute
nothing (the chi_1^((L-1)/2) line through the gradient panel is the table's chi_1 raised to each depth).
"""

from __future__ import annotations

import math

import pandas as pd

from actgrad.report.contents import trainability_sweeps
from actgrad.results.vocabulary import TRAINS_MARGIN
from actgrad.study.settings import variant_spec

NORM_NAMES = {"none": "no normalisation", "batchnorm": "BatchNorm", "layernorm": "LayerNorm"}
LECTURE_DEPTH, LECTURE_GAIN = 5, 5 / 3  # the lecture's deep net
FIGURE = "trainability"


def _is(x, value) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and str(x).lower() == str(value).lower()


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _g(x, spec=".3g") -> str:
    if _finite(x):
        return format(float(x), spec)
    return "∞" if x is not None and not isinstance(x, str) and math.isinf(float(x)) and float(x) > 0 else "—"


def _depth(x) -> str:
    return str(int(float(x))) if _finite(x) else "—"


def _gain(x) -> str:
    return "5/3" if math.isclose(float(x), 5 / 3, rel_tol=1e-6) else f"{float(x):.4g}"


def _ratio(x) -> str:
    return f"{float(x):.2g}" if _finite(x) else "—"


def _read(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:  # a table with no rows and no columns
        return pd.DataFrame()


# -- the figure -------------------------------------------------------------------------------------------
def _edges(values):
    import numpy as np

    v = np.log(np.asarray(sorted(values), dtype=float))
    if len(v) == 1:
        return np.exp([v[0] - 0.2, v[0] + 0.2])
    mid = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]]))


def _phase_panel(ax, rows: pd.DataFrame, title: str, vmin: float, vmax: float, cmap, curve: pd.DataFrame):
    import numpy as np

    gains, depths = sorted(rows.gain.unique()), sorted(rows.n_layers.unique())
    grid = np.full((len(depths), len(gains)), np.nan)
    for r in rows.itertuples():
        grid[depths.index(r.n_layers), gains.index(r.gain)] = r.val_loss
    xe, ye = _edges(gains), _edges(depths)
    mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, shading="flat")
    for r in rows.itertuples():
        trains = _is(r.trains, True)
        text = ("diverged" if r.finished == 0 and r.diverged else _g(r.val_loss, ".2f")) + (" ✓" if trains else "")
        dark = _finite(r.val_loss) and float(r.val_loss) < (vmin + vmax) / 2  # white on the dark end of viridis
        ax.text(r.gain, r.n_layers, text, ha="center", va="center", fontsize=8,
                color="white" if dark or not _finite(r.val_loss) else "black",
                fontweight="bold" if trains else "normal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xticks(gains, [_gain(g) for g in gains])
    ax.set_yticks(depths, [str(int(d)) for d in depths])
    ax.minorticks_off()
    ax.grid(False)
    ax.set_xlabel("gain")
    ax.set_ylabel("depth (tanh layers)")
    if (rows.norm == "none").all() and len(curve):
        six = curve.trainable_depth.to_numpy(float)
        six = np.where(np.isfinite(six), six, ye[-1] * 10)  # infinite at the critical gain: off the top
        ax.plot(curve.gain, np.clip(six, ye[0] / 10, ye[-1] * 10), color="black", lw=2, ls="--",
                label="6 ξ_c (theory)")
        ax.axvline(1.0, color="0.3", lw=0.8, ls=":")
        ax.legend(loc="lower left", fontsize=7.5)
    lecture = rows[(rows.n_layers == LECTURE_DEPTH) & ((rows.gain - LECTURE_GAIN).abs() < 1e-6)]
    if len(lecture):
        ax.scatter([LECTURE_GAIN], [LECTURE_DEPTH], s=900, marker="s", facecolors="none", edgecolors="magenta", lw=2,
                   zorder=5)
    ax.set_title(title)
    return mesh


def _gradient_panel(ax, rows: pd.DataFrame, title: str, predicted_column: str, palette):
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    groups = list(rows.groupby("gain"))
    for i, (gain, g) in enumerate(groups):
        color = palette[i % len(palette)]
        g = g.sort_values("n_layers")
        # shrinking hollow markers: with BatchNorm the gains' points lie on top of each other
        ax.plot(g.n_layers, g.grad_ratio, "o", mfc="none", mew=2, color=color, ms=max(4, 12 - 2 * i),
                label=f"gain {_gain(gain)}")
        if predicted_column == "grad_ratio_chi1" and _finite(g.chi_1.iloc[0]):
            dense = np.geomspace(g.n_layers.min(), g.n_layers.max(), 100)
            ax.plot(dense, float(g.chi_1.iloc[0]) ** ((dense - 1) / 2), color=color, lw=1.5, alpha=0.7)
        ax.plot(g.n_layers, g[predicted_column if predicted_column != "grad_ratio_chi1" else "grad_ratio_predicted"],
                ls="--" if predicted_column == "grad_ratio_chi1" else "-", color=color, lw=1, alpha=0.7)
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    depths = sorted(rows.n_layers.unique())
    ax.set_xticks(depths, [str(int(d)) for d in depths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("depth (tanh layers)")
    ax.set_ylabel("gradient std, first / last layer, at init")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if predicted_column == "grad_ratio_chi1":
        extra = [(Line2D([], [], color="0.3", lw=1.5), "χ₁^((L−1)/2)"),
                 (Line2D([], [], color="0.3", lw=1, ls="--"), "mean field, layer by layer")]
    else:
        extra = [(Line2D([], [], color="0.3", lw=1), "mean field (infinite batch)")]
    ax.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], fontsize=7.5, ncol=2,
              loc="upper left", title="points measured, lines predicted", title_fontsize=7.5)



def trainability_figure(table: pd.DataFrame, curve: pd.DataFrame | None = None):
    """The section's figure from ``results/trainability.csv``: the phase diagram (final validation loss over depth x
    gain, ✓ where the net trains, 6 xi_c dashed, the lecture's net boxed) per normalisation, and the gradient ratio
    at init over depth against its prediction (no normalisation: chi_1^((L-1)/2) solid, layer by layer dashed;
    BatchNorm: the infinite-batch mean-field prediction). ``curve``: results/trainability_curve.csv."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    norms = [n for n in ("none", "batchnorm", "layernorm") if (table.norm == n).any()]
    if table.empty or not norms:
        fig, ax = plt.subplots(figsize=(10, 2))
        ax.text(0.5, 0.5, "no trainability runs", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(2, len(norms), figsize=(6.5 * len(norms), 10), layout="constrained", squeeze=False)
    baseline = float(table.baseline_loss.iloc[0]) if _finite(table.baseline_loss.iloc[0]) else None
    finite = table.val_loss[table.val_loss.notna()]
    vmin = float(finite.min()) if len(finite) else 2.0
    vmax = max(baseline + 0.05 if baseline else float(finite.max()) if len(finite) else 3.3, vmin + 0.1)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("0.2")
    palette = sns.color_palette("deep")
    mesh = None
    for j, norm in enumerate(norms):
        rows = table[table.norm == norm]
        mesh = _phase_panel(axes[0, j], rows, f"{NORM_NAMES.get(norm, norm)}: final val loss (✓ trains)", vmin, vmax,
                            cmap, curve if curve is not None else pd.DataFrame(columns=["gain", "trainable_depth"]))
        predicted = "grad_ratio_chi1" if norm == "none" else "grad_ratio_predicted"
        _gradient_panel(axes[1, j], rows, f"{NORM_NAMES.get(norm, norm)}: gradient ratio at init", predicted,
                        palette)
    bar = fig.colorbar(mesh, ax=axes[0, :].tolist(), shrink=0.9, label="final validation loss")
    if baseline:
        bar.ax.axhline(baseline, color="red", lw=2)
        bar.ax.axhline(float(table.threshold.iloc[0]), color="white", lw=1.5, ls="--")
    fig.suptitle("How deep can it go: red line on the colour bar = input-blind baseline, dashed = the 'trains' "
                 "threshold; magenta box = the lecture's net (5 layers, gain 5/3)", fontsize=9.5, x=0.01, ha="left")
    return fig


def trainability_figures(table_csv, curve_csv, outputs: dict, log=print) -> None:
    """Draw the section's figure (``outputs``: {"trainability": PNG path}) from results/trainability.csv and
    results/trainability_curve.csv."""
    from actgrad.report.canvas import save, style

    style()
    save(trainability_figure(_read(table_csv), _read(curve_csv)), outputs[FIGURE])
    log(f"figure {FIGURE} -> {outputs[FIGURE]}")


# -- the section ------------------------------------------------------------------------------------------
def _groups(table: pd.DataFrame):
    return [(norm, gain, g.sort_values("n_layers")) for (norm, gain), g in table.groupby(["norm", "gain"], sort=False)]


def _boundary_sentence(table: pd.DataFrame) -> str:
    parts, verdicts = [], []
    for _, gain, g in _groups(table[table.norm == "none"]):
        r = g.iloc[0]
        verdicts.append(str(r.boundary))
        reach = (f"trains up to {_depth(r.deepest_trained)} layers" if _finite(r.deepest_trained)
                 else "trains at no depth here")
        fails = f", not from {_depth(r.shallowest_failed)}" if _finite(r.shallowest_failed) else ", at every depth"
        six = f"{_g(r.trainable_depth)} (the critical gain)" if math.isinf(float(r.trainable_depth)) else \
            _g(r.trainable_depth)
        parts.append(f"gain {_gain(gain)}: {reach}{fails if _finite(r.deepest_trained) else ''} against 6ξ_c = {six} "
                     f"({r.boundary})")
    if not parts:
        return ""
    holds = verdicts.count("holds")
    shallower = verdicts.count("stops shallower")
    lead = (f"The 6ξ_c boundary holds at {holds} of {len(verdicts)} gains without normalisation"
            + (f"; at {shallower} the net stops training shallower than 6ξ_c within this budget" if shallower else "")
            + (f"; at {verdicts.count('trains deeper')} it trains deeper" if "trains deeper" in verdicts else "")
            + (f"; at {verdicts.count('mixed')} the depths that train and fail straddle it" if "mixed" in verdicts
               else ""))
    return f"{lead}: " + "; ".join(parts) + "."


def _lecture_sentence(table: pd.DataFrame) -> str:
    rows = table[(table.norm == "none") & ((table.gain - LECTURE_GAIN).abs() < 1e-6)].sort_values("n_layers")
    if rows.empty:
        return "The study has no gain 5/3 without normalisation: the lecture's net is not in the diagram."
    lecture = rows[rows.n_layers == LECTURE_DEPTH]
    r0 = rows.iloc[0]
    six = _g(r0.trainable_depth)
    if len(lecture):
        r = lecture.iloc[0]
        where = (f"The lecture's net (5 layers, gain 5/3) {'trains' if _is(r.trains, True) else 'does not train'} "
                 f"within the budget (final val loss {_g(r.val_loss, '.4f')}, {_g(r.loss_fall, '.3f')} below its "
                 f"initial loss) and sits far inside the trainable region: 5 layers against 6ξ_c = {six}")
    else:
        where = f"The study has no 5-layer net; 6ξ_c at gain 5/3 is {six} layers"
    if _finite(r0.shallowest_failed):
        stop = (f"At gain 5/3 the net stops training within the budget at {_depth(r0.shallowest_failed)} layers "
                f"(deepest that trains: {_depth(r0.deepest_trained)})")
    else:
        stop = f"At gain 5/3 every depth here trains, up to {_depth(rows.n_layers.max())} layers"
    return f"{where}. {stop}."


def _batchnorm_sentence(table: pd.DataFrame) -> str:
    bn = table[table.norm == "batchnorm"]
    if bn.empty:
        return "The study has no BatchNorm variants: Yang et al.'s prediction is not tested here."
    parts, grows = [], []
    for _, gain, g in _groups(bn):
        r = g.iloc[0]
        grows.append(_is(r.grad_grows, True))
        parts.append(f"gain {_gain(gain)}: {_ratio(g.grad_ratio.iloc[0])} at {_depth(g.n_layers.iloc[0])} layers to "
                     f"{_ratio(g.grad_ratio.iloc[-1])} at {_depth(g.n_layers.iloc[-1])} "
                     f"(×{_g(r.grad_per_layer, '.3f')} per layer, predicted ×{_g(r.grad_per_layer_predicted, '.3f')})")
    if all(grows):
        lead = "With BatchNorm the gradient at init grows with every depth step at every gain, as Yang et al. predict"
    elif any(grows):
        lead = f"With BatchNorm the gradient at init grows with every depth step at {sum(grows)} of {len(grows)} gains"
    else:
        lead = ("With BatchNorm the gradient at init does not grow with every depth step at any gain, against the "
                "prediction")
    deepest = bn[bn.n_layers == bn.n_layers.max()]
    trains = int(sum(_is(t, True) for t in deepest.trains))
    return (f"{lead}: {'; '.join(parts)}. At {_depth(bn.n_layers.max())} layers {trains} of {len(deepest)} BatchNorm "
            "nets train within the budget.")


def trainability_section(config: dict, table: pd.DataFrame) -> dict | None:
    """The section "How deep can it go" where a sweep varies depth x gain (results/trainability.csv): the rule, the
    boundary table, the gradient ratios at init, and the generated answer (the figure is the report's global one)."""
    if table.empty or not trainability_sweeps(config):
        return None
    first = table.iloc[0]
    steps = sorted({variant_spec(config, v)["max_steps"] for vs in table.variants for v in str(vs).split(";")})
    rule = (f"A run trains within its budget ({', '.join(f'{s:,}' for s in steps)} steps) when it finishes with a "
            f"final validation loss at most {_g(first.threshold, '.4f')}: {TRAINS_MARGIN:g} nats "
            f"below the input-blind baseline {_g(first.baseline_loss, '.4f')} (every character predicted by its "
            "frequency in the training split, what a net reaches whose output has forgotten its input); a cell trains "
            "when more than half of its runs do.")
    boundary = []
    for norm, gain, g in _groups(table):
        r = g.iloc[0]
        boundary.append({
            "norm": NORM_NAMES.get(norm, norm), "gain": _gain(gain), "chi_1": _g(r.chi_1, ".4f"),
            "xi_c": _g(r.xi_c), "six_xi_c": _g(r.trainable_depth), "deepest": _depth(r.deepest_trained),
            "failed": _depth(r.shallowest_failed), "verdict": r.boundary if isinstance(r.boundary, str) else "",
            "per_layer": f"{_g(r.grad_per_layer, '.3f')} (predicted {_g(r.grad_per_layer_predicted, '.3f')})",
            "grows": "yes" if _is(r.grad_grows, True) else "no" if _is(r.grad_grows, False) else "—",
        })
    depths = sorted(int(d) for d in table.n_layers.unique())
    gradients = []
    for norm, gain, g in _groups(table):
        cells = {int(r.n_layers): r for r in g.itertuples()}
        against = "grad_ratio_chi1" if norm == "none" else "grad_ratio_predicted"
        gradients.append({"norm": NORM_NAMES.get(norm, norm), "gain": _gain(gain),
                          "cells": [{"text": _ratio(cells[d].grad_ratio),
                                     "sub": f"predicted {_ratio(getattr(cells[d], against))}" + (
                                         f" (layer by layer {_ratio(cells[d].grad_ratio_predicted)})"
                                         if norm == "none" else ""),
                                     "val": ("diverged" if cells[d].finished == 0 and cells[d].diverged
                                             else f"val {_g(cells[d].val_loss, '.3f')}"
                                             + (" ✓" if _is(cells[d].trains, True) else ""))}
                                    if d in cells else None for d in depths]})
    answer = " ".join(s for s in (_boundary_sentence(table), _lecture_sentence(table), _batchnorm_sentence(table)) if s)
    return {"rule": rule, "boundary": boundary, "depths": depths, "gradients": gradients, "answer": answer}
