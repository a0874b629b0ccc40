"""The report's figures, drawn with seaborn/matplotlib from what the runs wrote.

Each ``*_figure`` function takes plain data (frames, arrays, dicts) and returns a
matplotlib ``Figure``; :func:`variant_figures`, :func:`global_figures` and :func:`theory_figures`
read the run files and the summary's tables and write the PNGs; :func:`all_figures` draws a
study's whole set in one step. Nothing here trains or evaluates.

Per variant (the lecture seed's run unless said otherwise):

``init``              tanh / pre-activation histograms and the |h| > 0.99 saturation map at step 0
``activations``       activation distribution per tanh layer, at step 0 and a later snapshot
``activation_grads``  gradient distribution per tanh layer, at the same steps
``weight_grads``      weight-gradient distribution per 2-D parameter, grad:data ratio in the legend
``updates``           log10 update:data ratio of each 2-D parameter over the steps (guide at -3)
``heatmap``           activation histogram over training time, per layer ("colorful dimension")

Each draws every layer of the lecture's nets; a deeper net's draw :data:`MAX_LAYERS_SHOWN` of them
(:func:`shown_layers`: the first, the last and evenly spaced ones between), and say so in the title.

Across variants: ``loss_curves``, ``final_losses``, ``deep_layers``, ``sensitivity`` and ``lyapunov``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from actgrad.report.canvas import save, style  # noqa: E402
from actgrad.report.contents import GLOBAL_FIGURES, VARIANT_FIGURES, sweep_figure  # noqa: E402
from actgrad.results.significance import CHAOS_SEPARATION  # noqa: E402
from actgrad.results.summary import curve_label, lecture_run, sweep_axes, sweep_keys  # noqa: E402
from actgrad.results.vocabulary import (  # noqa: E402
    LAYER_QUANTITIES,
    SWEEP_METRICS,
    THEORY_QUANTITIES,
    averaging_window,
)
from actgrad.rundir import Run, natural_key, read_runs  # noqa: E402
from actgrad.training.cpus import usable_cpus  # noqa: E402

UPDATE_GUIDE = -3.0  # the lecture's rule of thumb: updates about 1/1000 of the data
HEATMAP_VMIN = -4.0  # log10 fraction: the heat-map's colour scale runs from 1/10,000 to everything
# A per-layer figure (a line, a legend entry, a panel or a saturation map per layer) draws every layer up to
# this many; a deeper net's figures draw this many: the first, the last and evenly spaced ones between, each
# in the colour of its depth. The lecture's deep net (5 tanh layers, 7 weight matrices) is drawn whole.
MAX_LAYERS_SHOWN = 8


def _step_axis(ax) -> None:
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))


def _finish_grid(axes, used: int, ylabel: str) -> None:
    """Blank the panels of a grid that hold nothing, and label the first column's y axes."""
    for ax in axes.flat[used:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)


# -- small helpers --------------------------------------------------------------------------
def param_label(name: str) -> str:
    """'layers.linear2.weight' -> 'W2', 'layers.embedding.weight' -> 'C' (the lecture's names)."""
    m = re.search(r"linear(\d+)\.weight$", name)
    if m:
        return f"W{m.group(1)}"
    if name.endswith("embedding.weight"):
        return "C"
    m = re.search(r"linear(\d+)\.bias$", name)
    if m:
        return f"b{m.group(1)}"
    return name.removeprefix("layers.")


def shown_layers(n: int, limit: int = MAX_LAYERS_SHOWN) -> list[int]:
    """Which of ``n`` layers (by index, in order) a per-layer figure draws: all of them up to ``limit``, else the
    first, the last and evenly spaced ones between, ``limit`` in all."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, limit))})


def _subset_note(shown: int, n: int, what: str = "layers") -> str:
    return "" if shown == n else f" ({shown} of {n} {what} shown)"


def layer_colors(n: int) -> list:
    if n <= 1:
        return [sns.color_palette("deep")[0]]
    return sns.color_palette("viridis", n_colors=n) if n > 2 else sns.color_palette("deep")[:n]


def variant_palette(variants: list[str]) -> dict[str, tuple]:
    pal = sns.color_palette("tab10") + sns.color_palette("Set2") + sns.color_palette("Dark2")
    return {v: pal[i % len(pal)] for i, v in enumerate(variants)}


_GROUPS: dict[tuple, tuple[pd.DataFrame, dict]] = {}  # (id(frame), keys) -> (frame, its rows by keys)


def groups_of(frame: pd.DataFrame, keys: tuple[str, ...]) -> dict:
    """``frame``'s rows grouped by the columns ``keys``, made once per frame: a figure looks up dozens of groups in
    the same statistics, and each lookup by mask read the whole frame."""
    hit = _GROUPS.get((id(frame), keys))
    if hit is None or hit[0] is not frame:
        if len(_GROUPS) > 16:  # a variant's figures use two frames; keep the last few
            _GROUPS.clear()
        hit = _GROUPS[(id(frame), keys)] = (frame, dict(iter(frame.groupby(list(keys), sort=False))))
    return hit[1]


def stat_at(stats: pd.DataFrame, kind: str, layer: str, stat: str, step: int) -> float:
    if stats.empty:
        return float("nan")
    sel = groups_of(stats, ("kind", "layer", "stat", "step")).get((kind, layer, stat, step))
    return float(sel.value.iloc[0]) if sel is not None and len(sel) else float("nan")


def fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def windowed_log10(loss: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Window-mean of log10(loss) (the lecture's ``view(-1, 1000).mean(1)``) and each window's centre step.

    A run that stopped early (diverged) keeps its last, partial window; non-finite losses are
    left out of a window's mean, and a window with none finite is NaN.
    """
    loss = np.asarray(loss, dtype=float)
    if len(loss) == 0:
        return np.array([]), np.array([])
    window = max(1, int(window))
    n_windows = math.ceil(len(loss) / window)
    padded = np.full(n_windows * window, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        padded[:len(loss)] = np.log10(loss)
    padded[~np.isfinite(padded)] = np.nan
    blocks = padded.reshape(n_windows, window)
    counts = np.isfinite(blocks).sum(axis=1)
    sums = np.nansum(blocks, axis=1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    starts = np.arange(n_windows) * window
    ends = np.minimum(starts + window, len(loss)) - 1
    return (starts + ends) / 2, means


def no_data(ax, text="not recorded"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


# -- per-variant figures ------------------------------------------------------------------------
def _hist(hists: pd.DataFrame, kind: str, layer: str, step: int) -> pd.DataFrame:
    if hists.empty:
        return hists
    h = groups_of(hists, ("kind", "layer", "step")).get((kind, layer, step))
    if h is None:
        return hists.iloc[:0]
    h = h.sort_values("bin_left")
    return h[np.isfinite(h.fraction)]


def _layers(frame: pd.DataFrame, kind: str) -> list[str]:
    if frame.empty:
        return []
    return sorted(frame[frame.kind == kind].layer.unique(), key=natural_key)


def activation_words(stats: pd.DataFrame) -> dict:
    """How a run's figures name its activation and the share of it that does not respond: tanh's saturation
    (|h| > 0.97, the map at 0.99), or for ReLU and GELU the share at or below zero (the runs record
    ``nonpositive_pct`` instead of ``saturated_pct`` for them, and their map is h <= 0)."""
    if "nonpositive_pct" in set(stats.stat):
        names = stats[stats.kind == "activation"].layer.str.rstrip("0123456789")
        name = names.iloc[0] if len(names) else "relu"
        return {"name": name, "share": "nonpositive_pct", "legend": "≤0", "note": "h≤0", "map": "h ≤ 0",
                "white": "at or below 0"}
    return {"name": "tanh", "share": "saturated_pct", "legend": "saturated", "note": "|h|>0.97", "map": "|h| > 0.99",
            "white": "saturated"}


def init_figure(hists: pd.DataFrame, saturation: dict[str, np.ndarray], stats: pd.DataFrame, title: str = ""):
    """Step 0: the first tanh layer's activation and pre-activation histograms, and the saturation maps (ReLU and
    GELU: the share and the map of outputs at or below zero, :func:`activation_words`)."""
    words = activation_words(stats)
    layers = list(saturation) or _layers(hists, "activation")
    all_maps = list(saturation)
    saturation = {all_maps[i]: saturation[all_maps[i]] for i in shown_layers(len(all_maps))}
    n_maps = max(1, len(saturation))
    fig = plt.figure(figsize=(10, 5.6 if n_maps == 1 else 5.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 0.9 if n_maps == 1 else 0.8], hspace=0.04)
    ax_act, ax_pre = top.subplots(1, 2)
    first = layers[0] if layers else None
    deep = len(layers) > 1
    for ax, kind, label in ((ax_act, "activation", f"{words['name']} output h"),
                            (ax_pre, "preactivation", "pre-activation")):
        h = _hist(hists, kind, first, 0) if first else pd.DataFrame()
        if h.empty:
            no_data(ax)
            continue
        edges = np.append(h.bin_left.to_numpy(), h.bin_right.iloc[-1])
        color = sns.color_palette("deep")[0 if kind == "activation" else 1]
        ax.stairs(h.fraction.to_numpy(), edges, fill=True, color=color, alpha=0.85)
        mean, std = stat_at(stats, kind, first, "mean", 0), stat_at(stats, kind, first, "std", 0)
        ax.set_title(f"{label} of {first}" + (f" (1st of {len(layers)})" if deep else "") + ", step 0")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of values")
        note = f"mean {fmt(mean, '+.2f')}\nstd {fmt(std, '.2f')}"
        if kind == "activation":
            note += f"\n{words['note']}: {fmt(stat_at(stats, kind, first, words['share'], 0), '.1f')}%"
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.text(0.5 if kind == "activation" else 0.98, 0.95, note, transform=ax.transAxes, va="top",
                ha="center" if kind == "activation" else "right", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8"))
    if not saturation:
        no_data(bottom.subplots(), "no saturation map recorded")
        return fig
    axes = np.atleast_1d(bottom.subplots(1, n_maps, sharey=True))
    for i, (ax, (layer, m)) in enumerate(zip(axes, saturation.items())):
        ax.imshow(m, cmap="gray", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
        ax.grid(False)
        dead = int(m.all(axis=0).sum())
        if n_maps == 1:
            ax.set_title(f"{layer}: {words['map']} over the first batch - {100 * m.mean():.1f}% white "
                         f"({words['white']}), {dead} dead unit(s) (all-white columns)")
        elif n_maps <= 5:
            ax.set_title(f"{layer}: {100 * m.mean():.0f}% white" + (f", {dead} dead" if dead else ""), fontsize=9)
        else:  # narrower panels: the numbers on a line of their own
            ax.set_title(f"{layer}\n{100 * m.mean():.0f}% white" + (f", {dead} dead" if dead else ""), fontsize=8)
        ax.set_xlabel("hidden unit")
        if i == 0:
            ax.set_ylabel("example in batch")
    if n_maps > 1:
        which = ("every layer" if len(saturation) == len(all_maps)
                 else f"{len(saturation)} of {len(all_maps)} layers (first, last, evenly between)")
        bottom.suptitle(f"{words['map']} over the first batch, {which} (white = {words['white']})", fontsize=9.5)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    return fig


def distribution_figure(hists: pd.DataFrame, stats: pd.DataFrame, kind: str, steps: list[int], title: str = ""):
    """Histogram lines per layer (density), one panel per step, with the lecture's legend."""
    every = _layers(hists, kind)
    shown = shown_layers(len(every))
    layers = [every[i] for i in shown]
    steps = [s for s in steps if s is not None]
    # Two columns keep a long legend short, but the activation labels (mean, std, saturation) are
    # too wide for two under half the figure: side by side they ran into each other and off the page.
    ncol = 2 if len(layers) > 4 and kind != "activation" else 1
    legend_rows = max(1, math.ceil(len(layers) / ncol))
    # The legends look up a few numbers per layer: among these steps' rows, not among every step's.
    stats = stats[stats.step.isin(steps)] if not stats.empty else stats
    fig, axes = plt.subplots(1, max(1, len(steps)), figsize=(10, 2.9 + 0.16 * legend_rows), layout="constrained",
                             squeeze=False)
    colors = [layer_colors(len(every))[i] for i in shown]
    for ax, step in zip(axes[0], steps or [None]):
        drawn = False
        for layer, color in zip(layers, colors):
            h = _hist(hists, kind, layer, step)
            if h.empty:
                continue
            width = (h.bin_right - h.bin_left).to_numpy()
            centres = ((h.bin_left + h.bin_right) / 2).to_numpy()
            density = h.fraction.to_numpy() / np.where(width > 0, width, 1)
            ax.plot(centres, density, color=color, lw=1.6, label=_legend(kind, layer, stats, step))
            drawn = True
        if not drawn:
            no_data(ax, f"no {kind.replace('_', ' ')} histogram at step {step}")
            continue
        ax.set_title(f"step {step:,}")
        ax.set_ylabel("density")
        act = activation_words(stats)["name"]
        ax.set_xlabel({"activation": f"{act} output", "activation_grad": f"gradient of the loss w.r.t. {act} output",
                       "weight_grad": "gradient of the loss w.r.t. the weight"}[kind])
        if kind != "activation":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        # below the panel, so that it never hides a curve
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), handlelength=1.5, frameon=False,
                  ncol=ncol, columnspacing=1.0)
    if title:
        what = "weight matrices" if kind == "weight_grad" else "layers"
        fig.suptitle(title + _subset_note(len(layers), len(every), what), fontsize=11, x=0.01, ha="left")
    return fig


def _legend(kind: str, layer: str, stats: pd.DataFrame, step: int) -> str:
    if kind == "activation":
        words = activation_words(stats)
        return (f"{layer}: mean {fmt(stat_at(stats, kind, layer, 'mean', step), '+.2f')}, "
                f"std {fmt(stat_at(stats, kind, layer, 'std', step), '.2f')}, "
                f"{words['legend']} {fmt(stat_at(stats, kind, layer, words['share'], step), '.1f')}%")
    if kind == "activation_grad":
        return (f"{layer}: mean {fmt(stat_at(stats, kind, layer, 'mean', step), '+.1e')}, "
                f"std {fmt(stat_at(stats, kind, layer, 'std', step), '.1e')}")
    return (f"{param_label(layer)}: std {fmt(stat_at(stats, kind, layer, 'std', step), '.1e')}, "
            f"grad:data {fmt(stat_at(stats, kind, layer, 'grad_data_ratio', step), '.1e')}")


def updates_figure(stats: pd.DataFrame, title: str = ""):
    """log10(lr * grad.std / data.std) per 2-D weight over the steps, with the lecture's guide at -3."""
    fig, ax = plt.subplots(figsize=(10, 3.0), layout="constrained")
    every = _layers(stats, "weight_grad")
    shown = shown_layers(len(every))
    weights = [every[i] for i in shown]
    up = stats[(stats.kind == "update") & stats.layer.isin(weights)] if not stats.empty else stats
    if up.empty:
        no_data(ax)
        return fig
    colors = layer_colors(len(every))
    for layer, color in zip(weights, [colors[i] for i in shown]):
        s = up[up.layer == layer].sort_values("step")
        v = s.value.to_numpy(dtype=float, copy=True)
        v[~np.isfinite(v)] = np.nan
        ax.plot(s.step, v, color=color, lw=1.1, label=param_label(layer))
    ax.axhline(UPDATE_GUIDE, color="k", ls="--", lw=1.2, label="1e-3 (guide)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(update std / data std)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title + _subset_note(len(weights), len(every), "weight matrices"), fontsize=11, x=0.01, ha="left")
    return fig


def heatmap_figure(hists: pd.DataFrame, title: str = ""):
    """fastai's 'colorful dimension': each column is one step's activation histogram, log-coloured."""
    every = _layers(hists, "activation")
    layers = [every[i] for i in shown_layers(len(every))]
    n = max(1, len(layers))
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows if n > 1 else 2.8), layout="constrained",
                             squeeze=False, sharey=True)
    if not layers:
        no_data(axes[0, 0])
        return fig
    frames = {layer: hists[(hists.kind == "activation") & (hists.layer == layer)] for layer in layers}
    norm = Normalize(vmin=HEATMAP_VMIN, vmax=0.0)  # fixed, so that the variants' heat-maps compare
    mesh = None
    for ax, layer in zip(axes.flat, layers):
        f = frames[layer]
        grid = f.pivot_table(index="bin_left", columns="step", values="fraction", aggfunc="first").sort_index()
        steps = grid.columns.to_numpy(dtype=float)
        bins = np.append(grid.index.to_numpy(dtype=float),
                         f.bin_right.max())
        if len(steps) == 1:
            xedges = np.array([steps[0] - 0.5, steps[0] + 0.5])
        else:
            mids = (steps[:-1] + steps[1:]) / 2
            xedges = np.concatenate([[steps[0]], mids, [steps[-1]]])
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log10(grid.to_numpy(dtype=float))
        values = np.ma.masked_invalid(values)
        mesh = ax.pcolormesh(xedges, bins, values, cmap="magma", norm=norm, shading="flat")
        ax.set_facecolor("black")
        ax.grid(False)
        ax.set_title(layer)
        _step_axis(ax)
    _finish_grid(axes, len(layers), "tanh output")
    fig.colorbar(mesh, ax=axes, label="log10 fraction", shrink=0.9, pad=0.01, extend="min")
    if title:
        fig.suptitle(title + _subset_note(len(layers), len(every)), fontsize=11, x=0.01, ha="left")
    return fig


def variant_figures(run_paths, outputs: dict[str, str | os.PathLike], log=print) -> None:
    """Write the requested per-variant figures (``outputs``: name -> PNG path) from a variant's runs."""
    unknown = set(outputs) - set(VARIANT_FIGURES)
    if unknown:
        raise ValueError(f"unknown per-variant figure(s): {sorted(unknown)}; known: {list(VARIANT_FIGURES)}")
    style()
    run = lecture_run(read_runs(run_paths))
    name = run.variant
    stats, hists = run.stats(), run.histograms()
    later = run.snapshot_step  # recorded once by the training job, so that the report shows the same step
    steps = [0] + ([later] if later is not None else [])
    suffix = f" - {name}, seed {run.seed}"
    act = activation_words(stats)["name"]
    if run.diverged_at is not None:
        suffix += f" (diverged at step {run.diverged_at})"
    makers = {
        "init": lambda: init_figure(hists, run.saturation(), stats),
        "activations": lambda: distribution_figure(hists, stats, "activation", steps,
                                                   f"activation distribution per {act} layer" + suffix),
        "activation_grads": lambda: distribution_figure(hists, stats, "activation_grad", steps,
                                                        f"gradient distribution per {act} layer" + suffix),
        "weight_grads": lambda: distribution_figure(hists, stats, "weight_grad", steps,
                                                    "weight-gradient distribution per 2-D parameter" + suffix),
        "updates": lambda: updates_figure(stats, "update:data ratio per weight matrix" + suffix),
        "heatmap": lambda: heatmap_figure(hists, "activation histogram over training" + suffix),
    }
    for key, path in outputs.items():
        save(makers[key](), path)
        log(f"[{name}] figure {key} -> {path}")


# -- figures across variants ------------------------------------------------------------------------
def loss_curves_figure(curves: dict[str, list[np.ndarray]], models: dict[str, str],
                       diverged: dict[str, list] | None = None, steps: dict[str, int] | None = None):
    """log10 loss, window-averaged, mean over seeds with a band of one standard deviation; mlp and deep apart.

    A diverged variant's curve runs off the top of the panel (the y-range follows the others) and
    ends in a cross where it was last finite.
    """
    diverged, steps = diverged or {}, steps or {}
    groups = [(m, [v for v in curves if models.get(v) == m]) for m in ("mlp", "deep")]
    groups = [(m, vs) for m, vs in groups if vs] or [("mlp", [])]
    fig, axes = plt.subplots(1, len(groups), figsize=(10 if len(groups) > 1 else 8, 4.0), layout="constrained",
                             squeeze=False)
    palette = variant_palette(list(curves))
    windows = set()
    for ax, (model, variants) in zip(axes[0], groups):
        calm_lo, calm_hi = [], []
        drawn = []
        for v in variants:
            seeds = [np.asarray(x, dtype=float) for x in curves[v] if len(x)]
            if not seeds:
                continue
            window = averaging_window(steps.get(v) or max(len(x) for x in seeds))
            windows.add(window)
            per_seed = [windowed_log10(x, window) for x in seeds]
            n = max(len(m) for _, m in per_seed)
            mat = np.full((len(per_seed), n), np.nan)
            centres = np.full(n, np.nan)
            for i, (c, m) in enumerate(per_seed):
                mat[i, :len(m)] = m
                centres[:len(c)] = np.where(np.isnan(centres[:len(c)]), c, centres[:len(c)])
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(mat, axis=0)
                std = np.nanstd(mat, axis=0)
            label = v + (" (diverged)" if diverged.get(v) else "")
            ax.plot(centres, mean, color=palette[v], lw=1.6, label=label)
            if len(seeds) > 1:
                ax.fill_between(centres, mean - std, mean + std, color=palette[v], alpha=0.18, lw=0)
            ok = np.isfinite(mean)
            drawn.append((v, centres[ok], mean[ok]))
            if not diverged.get(v) and ok.any():
                calm_lo.append(np.nanmin(mean - np.nan_to_num(std)))
                calm_hi.append(np.nanmax(mean + np.nan_to_num(std)))
        if calm_hi:
            lo, hi = min(calm_lo), max(calm_hi)
            pad = 0.06 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        top = ax.get_ylim()[1]
        for v, c, m in drawn:
            if diverged.get(v) and len(c):
                ax.plot([c[-1]], [min(m[-1], top)], marker="X", ms=9, color=palette[v], clip_on=False, zorder=5)
        ax.set_title({"mlp": "one hidden layer (mlp)", "deep": "deep tanh network"}[model])
        _step_axis(ax)
        ax.set_ylabel("log10 loss (window mean)")
        if drawn:
            ax.legend(loc="upper right", ncol=1 if len(variants) < 5 else 2)
        else:
            no_data(ax, "no runs")
    if windows:
        fig.suptitle(f"training loss, averaged over windows of {', '.join(f'{w:,}' for w in sorted(windows))} "
                     "step(s); band: ±1 std over seeds; X: diverged", fontsize=10, x=0.01, ha="left")
    return fig


def final_losses_figure(summary: pd.DataFrame, references: pd.DataFrame, order: list[str]):
    """Every seed's final val loss (dots), the mean (bar) and the lecture's printed value (diamond)."""
    fig, ax = plt.subplots(figsize=(10, 0.32 * max(3, len(order)) + 1.1), layout="constrained")
    palette = variant_palette(order)
    ys = {v: i for i, v in enumerate(order)}
    for v in order:
        sub = summary[summary.variant == v]
        vals = pd.to_numeric(sub.val_loss, errors="coerce").to_numpy(dtype=float)
        ok = vals[np.isfinite(vals)]
        y = ys[v]
        if len(ok):
            ax.scatter(ok, np.full(len(ok), y), color=palette[v], s=28, alpha=0.75, zorder=3, edgecolor="white",
                       lw=0.5)
            ax.plot([ok.mean()] * 2, [y - 0.32, y + 0.32], color=palette[v], lw=2.5, zorder=2)
        n_div = int((sub.status == "diverged").sum()) if "status" in sub else 0
        if n_div:
            ax.annotate(f"{n_div} seed(s) diverged", (0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8, color="firebrick")
    if not references.empty:
        val = references[references.quantity.str.startswith("val loss")]
        for _, r in val.iterrows():
            if r.variant in ys:
                ax.scatter([r.reference], [ys[r.variant]], marker="D", s=40, color="black", zorder=4,
                           label="lecture's value")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="lower right")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("validation loss at the end of training (dots: seeds, bar: mean)")
    ax.set_title("final validation loss per variant")
    return fig


def _layer_number(layer: str) -> int:
    parts = natural_key(layer)
    return parts[-2] if len(parts) > 1 and isinstance(parts[-2], int) else 0


def deep_layers_figure(layer_stats: pd.DataFrame, order: list[str], batchnorm: set | None = None,
                       predicted: pd.DataFrame | None = None):
    """Per layer, at step 0: activation std, saturation % and activation-gradient std, one line per deep variant.

    ``predicted`` (variant, layer, kind, stat, value): the mean-field theory's values, drawn as a wide pale
    line of the variant's colour behind its measured one.
    """
    panels = [("activation", "std", "activation std"), ("activation", "saturated_pct", "saturated % (|h|>0.97)"),
              ("activation_grad", "std", "activation gradient std")]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5), layout="constrained")
    palette = variant_palette(order)
    for ax, (kind, stat, label) in zip(axes, panels):
        sel = layer_stats[(layer_stats.kind == kind) & (layer_stats.stat == stat)] if not layer_stats.empty else \
            layer_stats
        if sel.empty:
            no_data(ax)
            continue
        for v in order:
            s = sel[sel.variant == v].copy()
            if s.empty:
                continue
            s["n"] = s.layer.map(_layer_number)
            s = s.groupby("n").value.mean()
            dashed = v in (batchnorm or set())
            ax.plot(s.index, s.to_numpy(), marker="s" if dashed else "o", ms=4, color=palette[v], label=v,
                    ls="--" if dashed else "-")
            _theory_line(ax, predicted, v, kind, stat, palette[v])
        ax.set_xlabel("tanh layer")
        ax.set_title(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if kind == "activation_grad":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    if predicted is not None and not predicted.empty:
        handles.append(matplotlib.lines.Line2D([], [], **THEORY_STYLE, color="0.45"))
        labels.append("theory (mean field)")
    if handles:
        fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=8)
    fig.suptitle("deep networks at step 0, layer by layer (mean over seeds)"
                 + ("; pale wide lines: mean-field theory" if predicted is not None and not predicted.empty else ""),
                 fontsize=10, x=0.01, ha="left")
    return fig


SENSITIVITY_FLOOR = 1e-9


def sensitivity_figure(deltas: dict[str, list[tuple[int, np.ndarray]]]):
    """|loss - twin loss| per step (rolling max), log scale, one panel per variant; equal losses at the floor."""
    variants = [v for v in deltas if deltas[v]]
    n = max(1, len(variants))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.2 * rows + 0.7), layout="constrained", squeeze=False,
                             sharey=True)
    if not variants:
        no_data(axes[0, 0], "no sensitivity twins")
    seed_colors = sns.color_palette("deep")
    for ax, v in zip(axes.flat, variants):
        for i, (seed, d) in enumerate(deltas[v]):
            d = pd.Series(np.asarray(d, dtype=float)).replace([np.inf, -np.inf], np.nan)
            if d.empty:
                continue
            window = max(10, len(d) // 100)
            env = d.rolling(window, min_periods=1, center=True).max().clip(lower=SENSITIVITY_FLOOR)
            step = max(1, len(env) // 1000)
            ax.plot(env.index[::step], env.to_numpy()[::step], lw=1.1, color=seed_colors[i % 10], label=f"seed {seed}")
        ax.axhline(SENSITIVITY_FLOOR, color="0.6", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(v, fontsize=9.5)
        _step_axis(ax)
    _finish_grid(axes, len(variants), "|Δ loss| vs twin")
    if variants:
        axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("how far each run drifts from its twin (W1 x (1 + 1e-7)); rolling max; dotted floor: identical",
                 fontsize=10, x=0.01, ha="left")
    return fig


def lyapunov_figure(traces: pd.DataFrame, order: list[str] | None = None):
    """The twins as a rate: lambda(t) = ln(d(t)/d(0)) / t per variant (left) and the growth d(t)/d(0) (right).

    ``traces``: the summary's twin_traces table (variant, seed, step, growth, lyapunov, perturbation). Thin lines
    are seeds, the thick line their mean; the right panel's dashed line is 0.1/perturbation, where the twins are a
    tenth of W1 itself apart (the one-seed chaos rule of :func:`actgrad.results.significance.chaos_verdict`).
    """
    present = list(dict.fromkeys(traces.variant)) if len(traces) else []
    variants = [v for v in (order or present) if v in present]
    fig, (ax_rate, ax_growth) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    if not variants:
        for ax in (ax_rate, ax_growth):
            no_data(ax, "no twin parameter distance recorded")
        return fig
    palette = variant_palette(variants)
    for v in variants:
        mine = traces[(traces.variant == v) & (traces.step > 0)]
        for column, ax in (("lyapunov", ax_rate), ("growth", ax_growth)):
            frame = mine.pivot(index="step", columns="seed", values=column).astype(float)
            frame = frame.replace([np.inf, -np.inf], np.nan)
            if len(frame.columns) > 1:
                for seed in frame:
                    ax.plot(frame.index, frame[seed], color=palette[v], lw=0.6, alpha=0.45)
            ax.plot(frame.index, frame.mean(axis=1), color=palette[v], lw=1.8, label=v)
        eps = float(mine.perturbation.iloc[0]) if len(mine) else None
        if eps:
            ax_growth.axhline(CHAOS_SEPARATION / eps, color=palette[v], ls="--", lw=0.9)
    ax_rate.axhline(0, color="0.4", lw=0.8)
    ax_rate.set_ylabel("λ(t) = ln(d(t) / d(0)) / t  [per step]")
    ax_rate.set_title("Lyapunov estimate: growth rate of the twins' distance")
    ax_growth.set_yscale("log")
    ax_growth.set_ylabel("d(t) / d(0)")
    ax_growth.set_title("twins' parameter distance, relative to the nudge")
    for ax in (ax_rate, ax_growth):
        ax.set_xscale("log")
        ax.set_xlabel("step")
    ax_rate.legend(loc="best", ncol=1 if len(variants) < 6 else 2)
    fig.suptitle("sensitivity twins (W1 x (1 + ε)): thin lines seeds, thick line their mean; dashed: 1/ε",
                 fontsize=10, x=0.01, ha="left")
    return fig


def global_figures(order: list[str], run_paths, summary_csv, references_csv, twin_traces_csv, outputs: dict,
                   log=print) -> None:
    """Write the requested cross-variant figures (``outputs``: name -> PNG path)."""
    unknown = set(outputs) - set(GLOBAL_FIGURES) | ({"deep_layers"} & set(outputs))
    if unknown:
        raise ValueError(f"unknown global figure(s): {sorted(unknown)}; known: {list(GLOBAL_FIGURES)}")
    style()
    runs: dict[str, list[Run]] = {}
    for r in read_runs(run_paths):
        runs.setdefault(r.variant, []).append(r)
    order = [v for v in order if v in runs]
    models = {v: runs[v][0].metrics.get("model", "mlp") for v in order}
    if "loss_curves" in outputs:
        curves = {v: [lf.loss.to_numpy() if "loss" in lf else np.array([]) for lf in map(Run.losses, runs[v])]
                  for v in order}  # each file read once: a full run's losses are 200,000 rows
        diverged = {v: [r.diverged_at for r in runs[v] if r.diverged_at is not None] for v in order}
        steps = {v: max(int(r.metrics.get("steps") or 0) for r in runs[v]) for v in order}
        save(loss_curves_figure(curves, models, diverged, steps), outputs["loss_curves"])
    if "final_losses" in outputs:
        summary = pd.read_csv(summary_csv)
        refs = pd.read_csv(references_csv) if references_csv and Path(references_csv).exists() else pd.DataFrame()
        save(final_losses_figure(summary, refs, order), outputs["final_losses"])
    if "sensitivity" in outputs:
        deltas = {}
        for v in order:
            for r in runs[v]:
                lf = r.losses()
                if "twin_loss" in lf:
                    deltas.setdefault(v, []).append((r.seed, np.abs(lf.loss.to_numpy(float) -
                                                                    lf.twin_loss.to_numpy(float))))
        save(sensitivity_figure(deltas), outputs["sensitivity"])
    if "lyapunov" in outputs:
        save(lyapunov_figure(pd.read_csv(twin_traces_csv), order), outputs["lyapunov"])
    for key, path in outputs.items():
        log(f"figure {key} -> {path}")


# -- theory next to measurement: the deep layers' overlay and the sweeps' phase diagrams -----------------
THEORY_STYLE = {"lw": 5, "alpha": 0.28, "solid_capstyle": "round"}  # wide and pale: behind the measured line


def _theory_line(ax, predicted: pd.DataFrame | None, variant: str, kind: str, stat: str, color) -> None:
    if predicted is None or predicted.empty:
        return
    p = predicted[(predicted.variant == variant) & (predicted.kind == kind) & (predicted.stat == stat)]
    p = p[np.isfinite(p.value.astype(float))]
    if p.empty:
        return
    p = p.assign(n=p.layer.map(_layer_number)).groupby("n").value.mean()
    ax.plot(p.index, p.to_numpy(), color=color, **THEORY_STYLE, zorder=1)


def theory_layer_frames(theory: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary's theory table as the deep-layers figure's measured and predicted frames
    (variant, layer, kind, stat, value): the mean over seeds, and the prediction."""
    columns = ["variant", "layer", "kind", "stat", "value"]
    if theory.empty:
        return pd.DataFrame(columns=columns), pd.DataFrame(columns=columns)
    sel = theory[theory.quantity.isin(LAYER_QUANTITIES)]
    kind_stat = [THEORY_QUANTITIES[q][0] for q in sel.quantity]
    base = sel.assign(kind=[k for k, _ in kind_stat], stat=[s for _, s in kind_stat])
    return (base.rename(columns={"measured_mean": "value"})[columns],
            base.rename(columns={"predicted": "value"})[columns])


# The phase diagrams' panels: sweeps.csv metric, title, log-scaled y; and the theory curve's column for each.
SWEEP_PANELS = [(metric, title, log) for metric, (_, _, title, log, _) in SWEEP_METRICS.items()]
_CURVE_COLUMNS = {metric: column for metric, (*_, column) in SWEEP_METRICS.items() if column}
GAIN_TICKS = (0.1, 0.25, 0.5, 1, 5 / 3, 3, 5, 10)
_BN_COLORS = {"no BatchNorm": sns.color_palette("deep")[0], "BatchNorm": sns.color_palette("deep")[3]}


def sweep_phase_figure(rows: pd.DataFrame, keys: list[str], curves: dict[str, pd.DataFrame] | None = None,
                       critical_gain: float | None = None, title: str = ""):
    """One sweep's phase diagram: each metric of :data:`SWEEP_PANELS` over the swept value.

    ``rows``: the sweep's rows of sweeps.csv (``keys``: its swept columns); points are the mean ± sd over
    seeds, lines the theory: ``curves`` (label -> a frame of x and the metrics, dense, from
    theory.phase_curves) where given, else the per-point predictions joined. The gain axis is
    log-scaled, with the critical gain (chi_1 = 1) and the lecture's 5/3 marked.
    """
    x_key, others = sweep_axes(rows, keys)
    categorical = not pd.api.types.is_numeric_dtype(rows[x_key]) or pd.api.types.is_bool_dtype(rows[x_key])
    positions = {v: i for i, v in enumerate(dict.fromkeys(rows[x_key]))} if categorical else None
    labels = rows[others].apply(lambda r: curve_label(r.to_dict()), axis=1) if others else \
        pd.Series("measured", index=rows.index)
    rows = rows.assign(_label=labels)
    groups = list(dict.fromkeys(rows._label))
    fallback = variant_palette(groups)
    colors = {g: _BN_COLORS.get(g, fallback[g]) for g in groups}
    panels = [p for p in SWEEP_PANELS if p[0] != "twin_final_abs_delta" or
              rows[(rows.metric == p[0])]["mean"].notna().any()]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.2), layout="constrained", squeeze=False)
    for ax, (metric, label, log_y) in zip(axes.flat, panels):
        sel = rows[rows.metric == metric]
        drawn = False
        # A log axis starts a little below the lowest mean (a spread larger than its mean would pull it down to
        # the floor); a bar's lower end stops there: mean - sd is not a log value when the sd exceeds the mean.
        positive = sel["mean"].to_numpy(float)
        positive = positive[np.isfinite(positive) & (positive > 0)]
        bottom = 0.3 * positive.min() if log_y and len(positive) else None
        for group in groups:
            g = sel[sel._label == group]
            xs = g[x_key].map(positions).to_numpy(float) if categorical else g[x_key].to_numpy(float)
            order = np.argsort(xs)
            mean, sd = g["mean"].to_numpy(float)[order], g["sd"].to_numpy(float)[order]
            xs = xs[order]
            if log_y:  # equal twins (|delta| = 0) sit on the floor, as in the sensitivity figure
                mean = np.where(mean > 0, mean, SENSITIVITY_FLOOR)
            if np.isfinite(mean).any():
                yerr = np.nan_to_num(sd)
                if log_y:  # down to the axis' bottom at most (to the floor where the mean sits on it)
                    limit = bottom if bottom is not None else SENSITIVITY_FLOOR
                    lower = np.where(np.isfinite(mean), np.clip(np.minimum(yerr, mean - limit), 0, None), 0.0)
                    yerr = np.array([lower, yerr])
                ax.errorbar(xs, mean, yerr=yerr, fmt="o", ms=4.5, capsize=2.5, color=colors[group],
                            label=f"{group} (measured)", zorder=3)
                drawn = True
            curve = (curves or {}).get(group)
            if curve is not None and metric in _CURVE_COLUMNS:
                ax.plot(curve["x"], curve[_CURVE_COLUMNS[metric]], color=colors[group], lw=1.4,
                        label=f"{group} (theory)", zorder=2)
            elif np.isfinite(g["predicted"].to_numpy(float)).any():
                ax.plot(xs, g["predicted"].to_numpy(float)[order], color=colors[group], lw=1.4,
                        label=f"{group} (theory)", zorder=2)
        if not drawn:
            no_data(ax)
            ax.set_title(label, fontsize=9.5)
            continue
        if x_key == "gain" and not categorical:
            ax.set_xscale("log")
            if critical_gain is not None and math.isfinite(critical_gain):
                ax.axvline(critical_gain, color="0.3", ls="--", lw=1, zorder=1)
            ax.axvline(5 / 3, color="0.6", ls=":", lw=1, zorder=1)
            lo, hi = ax.get_xlim()
            swept = sorted(set(rows[x_key].astype(float)))
            ticks = [t for t in (swept if len(swept) <= 6 else GAIN_TICKS) if lo <= t <= hi]
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if categorical:
            ax.set_xticks(list(positions.values()), [str(v) for v in positions])
        if log_y:
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            # 1-2-5 ticks over a decade or two; over more, decades only, or the labels run into each other
            subs = (1.0, 2.0, 5.0) if hi / lo < 1e3 else (1.0,)
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            # a spread larger than its mean would pull the axis down to the floor: cut it a little below the
            # lowest mean instead (the bars stop there, above)
            if bottom is not None:
                ax.set_ylim(bottom=max(lo, bottom))
        ax.set_xlabel(x_key)
        ax.set_title(label, fontsize=9.5)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if x_key == "gain" and critical_gain is not None:
        handles.append(matplotlib.lines.Line2D([], [], color="0.3", ls="--", lw=1))
        names.append(f"critical gain {critical_gain:.3g} (χ₁ = 1, no BatchNorm)")
        handles.append(matplotlib.lines.Line2D([], [], color="0.6", ls=":", lw=1))
        names.append("the lecture's 5/3")
    if handles:
        spare = axes.flat[len(panels)] if len(panels) < axes.size else None
        if spare is not None:
            spare.legend(handles, names, loc="center", frameon=False, fontsize=8.5)
        else:
            fig.legend(handles, names, loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    fig.suptitle(title or "phase diagram: points = mean ± sd over seeds, lines = mean-field theory",
                 fontsize=10, x=0.01, ha="left")
    return fig


def curves_of(theory_curves: pd.DataFrame, sweep: str) -> tuple[dict[str, pd.DataFrame], float | None]:
    """One sweep's rows of the summary's theory_curves table as the phase diagram's curves (label -> frame with x
    and the curve columns) and the critical gain (None where the sweep has no curves)."""
    rows = theory_curves[theory_curves.sweep == sweep] if len(theory_curves) else theory_curves
    if rows.empty:
        return {}, None
    curves = {label: group.drop(columns=["sweep", "curve", "critical_gain"]).reset_index(drop=True)
              for label, group in rows.groupby("curve", sort=False)}
    return curves, float(rows.critical_gain.iloc[0])


def theory_figures(config: dict, theory_csv, sweeps_csv, theory_curves_csv, outputs: dict, log=print) -> None:
    """Write the deep-layers figure with its theory overlay and each sweep's phase diagram
    (``outputs``: "deep_layers" and/or sweep_figure(name) -> PNG path) from the summary's tables."""
    from actgrad.report.contents import featured_variants, sweep_names, sweep_title
    from actgrad.study.settings import variant_spec

    style()
    if "deep_layers" in outputs:
        theory = pd.read_csv(theory_csv)
        order = [v for v in featured_variants(config) if variant_spec(config, v)["model"] == "deep"]
        measured, predicted = theory_layer_frames(theory)
        bn = {v for v in order if variant_spec(config, v)["batchnorm"]}
        save(deep_layers_figure(measured, order, bn, predicted), outputs["deep_layers"])
    drawn = any(k != "deep_layers" for k in outputs)
    table = pd.read_csv(sweeps_csv) if drawn else pd.DataFrame()
    theory_curves = pd.read_csv(theory_curves_csv) if drawn else pd.DataFrame()
    for sweep in sweep_names(config):
        key = sweep_figure(sweep)
        if key not in outputs:
            continue
        rows = table[table.sweep == sweep]
        keys = sweep_keys(config, rows)
        if not keys:
            fig, ax = plt.subplots(figsize=(10, 2))
            no_data(ax, f"sweep {sweep}: no runs")
            save(fig, outputs[key])
            continue
        curves, critical = curves_of(theory_curves, sweep)
        save(sweep_phase_figure(rows, keys, curves, critical, f"{sweep_title(sweep)}: points = mean ± sd over "
                                "seeds, lines = mean-field theory"), outputs[key])
    for key, path in outputs.items():
        log(f"figure {key} -> {path}")


# -- a study's figures, in one step ----------------------------------------------------------------------
def is_theory_figure(name: str) -> bool:
    """Whether :func:`theory_figures` draws ``name`` (from the summary's tables), not :func:`global_figures`."""
    return name == "deep_layers" or name.startswith(sweep_figure(""))


def all_figures(config: dict, order: list[str], run_paths, tables: dict, outputs: dict,
                variant_outputs: dict[str, tuple[list, dict]], workers: int = 1, log=print) -> None:
    """Every figure of a study's report: ``outputs`` (the cross-variant and theory figures, name -> PNG),
    read from the runs ``run_paths`` and the summary's ``tables`` (summary, references, theory, sweeps:
    paths), and ``variant_outputs`` (variant -> (its run files, figure name -> PNG)).

    One step draws them all: its imports (matplotlib, seaborn, pandas: two seconds) cost more than a
    variant's six figures, and were paid once per figure job before. With ``workers`` > 1 the step forks
    that many processes on Linux once the imports are done (no more than the CPUs it may use), and they share
    the figures.
    """
    trainability = {k: p for k, p in outputs.items() if k == "trainability"}  # actgrad.report.trainability's
    cross = {k: p for k, p in outputs.items() if not is_theory_figure(k) and k not in trainability}
    theory = {k: p for k, p in outputs.items() if is_theory_figure(k)}
    # The variants first: the first task is drawn before the workers fork (see draw_in_processes), and a variant's
    # figures use most of what the others do.
    tasks = [lambda log, runs=runs, figures=figures: variant_figures(runs, figures, log=log)
             for runs, figures in variant_outputs.values()]
    if cross:
        tasks.append(lambda log: global_figures(order, run_paths, tables["summary"], tables["references"],
                                                tables["twin_traces"], cross,
                                                log=log))
    if theory:
        tasks.append(lambda log: theory_figures(config, tables["theory"], tables["sweeps"], tables["theory_curves"],
                                                theory, log=log))
    if trainability:
        from actgrad.report.trainability import trainability_figures

        tasks.append(lambda log: trainability_figures(tables["trainability"], tables["trainability_curve"],
                                                      trainability, log=log))
    for line in draw_in_processes(tasks, min(workers, len(usable_cpus()))):
        log(line)


_TASKS: list = []  # what the forked workers of draw_in_processes run, by index


def _lines_of(task) -> list[str]:
    lines: list[str] = []
    task(lines.append)
    return lines


def _run_task(index: int) -> list[str]:
    return _lines_of(_TASKS[index])


def draw_in_processes(tasks: list, workers: int):
    """Run ``tasks`` (functions of a ``log``), in ``workers`` processes forked from this one on Linux (they
    inherit its imports; nothing is pickled but an index and the log lines), else one after another; yields
    each task's log lines, in the tasks' order. Not on macOS: its system libraries are not safe to use in a
    forked child, which is why Python spawns there by default (and spawning would import everything again)."""
    if not tasks:
        return
    # The first task runs here, before any fork: what matplotlib sets up on first use (fonts, caches) is then
    # inherited by every worker instead of being done again in each.
    yield from _lines_of(tasks[0])
    rest = range(1, len(tasks))
    workers = min(workers, len(rest))
    if workers <= 1 or not sys.platform.startswith("linux"):
        for i in rest:
            yield from _lines_of(tasks[i])
        return
    global _TASKS
    _TASKS = tasks
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_as_worker)
    try:
        for lines in pool.imap(_run_task, rest):
            yield from lines
        pool.close()  # the workers end when the queue is empty
    except BaseException:
        pool.terminate()  # a failed or stopped step does not wait for the other figures
        raise
    finally:
        pool.join()
        _TASKS = []


def _as_worker() -> None:
    # A worker inherits the step's handlers (workflow_step.as_step), which turn SIGTERM into an exception: a
    # worker stopped by the pool then ran its exit handlers and could hang in them. The step itself handles
    # Ctrl-C and stops its workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
