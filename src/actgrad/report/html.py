"""The study as one self-contained HTML page: tables from the summary, figures embedded as PNG.

The report only formats: every number on the page comes from a table the summary wrote
(:mod:`actgrad.results.summary`) and every picture from the figure step. :func:`build_context` gathers
what the template shows (numbers formatted, each figure as a ``data:`` URI with its caption);
:func:`render` fills the jinja2 template; :func:`write_report` does both and writes the page
atomically. The page needs no network: no external CSS, scripts, fonts or images.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from actgrad.data import EXPECTED_INIT_LOSS, DataError, atomic_write_bytes
from actgrad.report.contents import (
    GLOBAL_FIGURES,
    SWEEP_CAPTION,
    THEORY_CAPTION,
    VARIANT_FIGURES,
    asks_about_coupling,
    featured_variants,
    figure_path,
    sweep_figure,
    sweep_names,
    sweep_title,
)
from actgrad.report.trainability import trainability_section
from actgrad.results import significance
from actgrad.results.normalisation import BATCHNORM_BREAKDOWN, GAIN_MATTERS, LAYERNORM_VS_BATCHNORM, norm_sweeps
from actgrad.results.summary import lecture_seed_of
from actgrad.results.vocabulary import SWEEP_METRICS, TABLES, THEORY_QUANTITIES
from actgrad.rundir import natural_key
from actgrad.study import comparisons
from actgrad.study.settings import variant_spec
from actgrad.study.sweeps import sweep_groups

# Where each per-variant figure sits on the page: the init figure beside the samples, the
# heat-map last, the diagnostics between them.
DIAGNOSTICS = [name for name in VARIANT_FIGURES if name not in ("init", "heatmap")]
PACKAGES = ("torch", "numpy", "pandas", "seaborn", "matplotlib", "scipy", "jinja2", "snakemake")
CHAOTIC_WHY = ("A saturated, badly initialised net is chaotic: float rounding alone (a different order of "
               "additions, another library version) moves its trajectory, so its printed numbers cannot be "
               "reproduced digit for digit. These rows are shown, marked, and not counted as failures.")


# -- formatting -----------------------------------------------------------------------------------
def finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def num(x, digits: int = 4, signed: bool = False) -> str:
    """A number for a table cell; NaN, None and inf become an em dash."""
    if not finite(x):
        return "—"
    return f"{float(x):+.{digits}f}" if signed else f"{float(x):.{digits}f}"


def mean_std(mean, std, digits: int = 4) -> str:
    if not finite(mean):
        return "—"
    return num(mean, digits) + (f" ± {num(std, digits)}" if finite(std) else "")


def pct(x, digits: int = 1) -> str:
    return "—" if not finite(x) else f"{float(x):.{digits}f}%"


def p_value(p) -> str:
    if not finite(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def as_bool(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() == "true"
    return bool(x) if finite(x) or isinstance(x, (bool, np.bool_)) else False


def data_uri(path: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def read_caption(captions_dir, name: str) -> str:
    """A figure's caption: the text of its Snakemake-report caption ``<name>.rst``."""
    if not captions_dir:
        return ""
    p = Path(captions_dir) / f"{name}.rst"
    if not p.exists():
        return ""
    return " ".join(line.strip() for line in p.read_text().splitlines() if line.strip()).replace("``", "")


def _csv(path, **read_args) -> pd.DataFrame:
    """A table the summary wrote; one with no rows and no columns (a study with no deep variant) is empty."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: missing; the summary step writes it (snakemake results/summary.csv)")
    try:
        return pd.read_csv(p, **read_args)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not a readable CSV table ({e}); delete it and rerun the workflow") from None


# -- the tables ----------------------------------------------------------------------------------
def divergence_notes(summary: pd.DataFrame, variant: str) -> tuple[list[tuple[int, int]], int]:
    """[(seed, step)] of a variant's diverged runs, and its number of runs."""
    sub = summary[summary.variant == variant] if not summary.empty else summary
    if sub.empty:
        return [], 0
    out = []
    for _, r in sub[sub.status == "diverged"].iterrows():
        step = int(r.diverged_at) if finite(r.get("diverged_at")) else None
        out.append((int(r.seed), step))
    return out, len(sub)


def diverged_text(diverged: list[tuple[int, int]], lecture_seed=None) -> str:
    if not diverged:
        return ""
    steps = [s for _, s in diverged if s is not None]
    mine = [s for seed, s in diverged if seed == lecture_seed and s is not None]
    step = mine[0] if mine else (min(steps) if steps else None)
    return f"diverged at step {step:,}" if step is not None else "diverged"


def before_cell(v, metric: str, digits: int = 4) -> dict:
    """A number measured before training: mean ± std over every seed, the lecture seed's below."""
    lecture = v.get(f"{metric}_lecture_seed")
    return {"text": mean_std(v.get(f"{metric}_mean"), v.get(f"{metric}_std"), digits),
            "sub": f"lecture seed: {num(lecture, digits)}" if finite(lecture) else "", "cls": ""}


def final_cell(v, metric: str, all_diverged: bool, dtext: str, lecture_diverged: bool, digits: int = 4) -> dict:
    """A number measured after training: mean ± std over the seeds that finished, the lecture seed's below,
    or where the variant diverged."""
    if all_diverged:
        return {"text": dtext, "sub": "", "cls": "diverged"}
    text = mean_std(v.get(f"{metric}_mean"), v.get(f"{metric}_std"), digits)
    lect = v.get(f"{metric}_lecture_seed")
    if lecture_diverged:
        sub = "lecture seed: " + dtext
    else:
        sub = f"lecture seed: {num(lect, digits)}" if finite(lect) else ""
    return {"text": text, "sub": sub, "cls": ""}


def divergence_state(summary: pd.DataFrame, name: str) -> dict:
    """How a variant's runs diverged, as the final cells and the status pill say it."""
    diverged, n = divergence_notes(summary, name)
    seeds = summary[summary.variant == name].seed.tolist() if not summary.empty else []
    lecture = lecture_seed_of(seeds) if seeds else None
    return {"diverged": diverged, "n": n, "all_diverged": bool(diverged) and len(diverged) == n,
            "dtext": diverged_text(diverged, lecture), "lecture_diverged": any(seed == lecture for seed, _ in diverged)}


def _final_state(state: dict) -> dict:
    return {k: state[k] for k in ("all_diverged", "dtext", "lecture_diverged")}


# The share of activation values that do not respond, per activation: (variants.csv metric, what it is called).
# Saturation is a tanh notion; a ReLU or GELU unit at or below zero passes (almost) no gradient.
ACTIVATION_SHARES = {"tanh": ("sat97", "saturated"), "relu": ("nonpositive", "≤ 0"), "gelu": ("nonpositive", "≤ 0")}


def share_cells(activation: str, v, all_diverged: bool) -> dict:
    """The comparison table's "saturated" cells for a variant's activation: tanh's |t| > 0.97, else at or below 0."""
    metric, label = ACTIVATION_SHARES.get(activation, ACTIVATION_SHARES["tanh"])
    sub = "" if activation == "tanh" else label
    final = {"text": "diverged", "sub": "", "cls": "diverged"} if all_diverged else \
        {"text": pct(v.get(f"{metric}_final_mean")), "sub": sub, "cls": ""}
    return {"sat_init": {"text": pct(v.get(f"{metric}_init_mean")), "sub": sub, "cls": ""}, "sat_final": final,
            "share_label": "saturated" if activation == "tanh" else f"{activation} {label}"}


def share_heading(config: dict) -> str:
    """The heading of the comparison table's share columns: tanh's saturation, or both kinds when the study mixes."""
    activations = {variant_spec(config, name)["activation"] for name in config["variants"]}
    if activations <= {"tanh"}:
        return "saturated"
    return "≤ 0" if "tanh" not in activations else "saturated<br>or ≤ 0"


# How the comparison table marks a lecture value: (mark, the tooltip's words, the footnote's sentence).
REFERENCE_MARKS = {
    "shorter": ("*", "run shorter than the lecture's, so not comparable yet",
                "greyed and marked *: this run is shorter than the lecture's 200,000 steps, so its final losses are "
                "not comparable yet."),
    "calibrated": ("†", "compared with calibrated BatchNorm statistics",
                   "marked †: compared with the BatchNorm statistics calibrated over the training split, as the "
                   "lecture did for these rows."),
}


def reference_footnotes(comparison: list[dict]) -> list[str]:
    """The footnote's sentences for the marks the comparison table shows, in the order of REFERENCE_MARKS."""
    shown = {c for row in comparison for ref in (row.get("train_ref"), row.get("val_ref")) if ref
             for c in ref["mark"]}
    return [sentence for mark, _, sentence in REFERENCE_MARKS.values() if mark in shown]


def comparison_rows(config: dict, variants: pd.DataFrame, summary: pd.DataFrame, refs: pd.DataFrame) -> list[dict]:
    rows = []
    for name in config["variants"]:
        v = variants[variants.variant == name] if not variants.empty else variants
        if v.empty:
            continue
        v = v.iloc[0]
        state = divergence_state(summary, name)
        diverged, n = state["diverged"], state["n"]
        row = {
            "variant": name, "description": config["variants"][name].get("description", ""),
            "model": v.get("model", ""), "seeds": int(v.get("seeds", n) or 0),
            "status": f"{state['dtext']} ({len(diverged)} of {n} seeds)" if diverged else "ok",
            "status_cls": "diverged" if diverged else "ok",
            "init_loss": before_cell(v, "init_loss"),
            "init_gap": num(v.get("init_loss_gap"), 3, signed=True),
            "step0_loss": before_cell(v, "step0_loss"),
            "train_loss": final_cell(v, "train_loss", **_final_state(state)),
            "val_loss": final_cell(v, "val_loss", **_final_state(state)),
            **share_cells(variant_spec(config, name)["activation"], v, state["all_diverged"]),
        }
        for quantity in ("train", "val"):
            ref = refs[(refs.variant == name) & refs.quantity.str.startswith(f"{quantity} loss")] \
                if not refs.empty else refs
            if ref.empty:
                row[f"{quantity}_ref"] = None
                continue
            r = ref.iloc[0]
            compared = as_bool(r.compared)
            marks = [REFERENCE_MARKS[m] for m, on in (("shorter", not compared),
                                                      ("calibrated", "calibrated" in str(r.quantity))) if on]
            row[f"{quantity}_ref"] = {
                "reference": num(r.reference, int(r.precision) if finite(r.precision) else 4),
                "difference": num(r.difference, 4, signed=True),
                "note": "; ".join(note for _, note, _ in marks),
                "mark": "".join(mark for mark, _, _ in marks),
                "cls": "" if compared else "muted",
            }
        rows.append(row)
    return rows


VERDICT_CLASS = {significance.IMPROVES: "real", significance.WORSENS: "worse", significance.NOT_DETECTED: "noise"}


def _interval(low, high, digits: int = 4) -> str:
    return f"[{num(low, digits, signed=True)}, {num(high, digits, signed=True)}]" if finite(low) and finite(high) \
        else "—"


def seeds_needed_text(r) -> str:
    """The seeds per variant that would detect the observed difference; only where nothing was detected."""
    if r.get("verdict") != significance.NOT_DETECTED:
        return ""
    if finite(r.get("seeds_needed")):
        return f"{int(r.seeds_needed):,}"
    # seeds_needed is empty under this verdict for a zero difference or beyond the search's limit
    return "—" if r.get("difference") == 0 else f"> {significance.MAX_SEEDS:,}"


def significance_rows(sig: pd.DataFrame) -> list[dict]:
    """The summary's significance table, one row per comparison, with its family's header first."""
    rows = []
    if sig.empty:
        return rows
    for family, members in sig.groupby("family", sort=False):
        m = members.m_family.iloc[0]
        rows.append({"family": family, "m": int(m) if finite(m) else 0})
        for _, r in members.iterrows():
            rows.append({
                "before": r.before, "after": r.after, "n": f"{int(r.n_before)} / {int(r.n_after)}",
                "diverged": int(r.diverged_before) + int(r.diverged_after),
                "mean_before": mean_std(r.mean_before, r.sd_before), "mean_after": mean_std(r.mean_after, r.sd_after),
                "difference": num(r.difference, 4, signed=True), "ci": _interval(r.ci_low, r.ci_high),
                "g": num(r.hedges_g, 2, signed=True), "p": p_value(r.p), "p_holm": p_value(r.p_holm),
                "verdict": str(r.verdict), "seeds_needed": seeds_needed_text(r),
                "cls": VERDICT_CLASS.get(r.verdict, "muted"),
            })
    return rows


def significance_method(sig: pd.DataFrame, config: dict) -> str:
    """The method paragraph, at the alpha, power and metric the summary's table was computed with."""
    settings = comparisons.comparison_settings(config)
    if not sig.empty:
        settings = {"alpha": float(sig.alpha.iloc[0]), "power": float(sig.power.iloc[0]),
                    "metric": str(sig.metric.iloc[0])}
    return significance.method_text(**settings)


def reference_rows(refs: pd.DataFrame) -> tuple[list[dict], dict]:
    rows = []
    counted = matched = chaotic_n = not_reached = 0
    if refs.empty:
        return rows, {"matched": 0, "counted": 0, "chaotic": 0, "not_reached": 0}
    for _, r in refs.iterrows():
        compared, chaotic, match = as_bool(r.compared), as_bool(r.chaotic), as_bool(r.match)
        precision = int(r.precision) if finite(r.precision) else 4
        if not compared:
            state, cls = "not reached", "muted"
            not_reached += 1
        elif chaotic:
            state, cls = "chaotic" + (" ✓" if match else ""), "chaotic"
            chaotic_n += 1
        else:
            counted += 1
            matched += int(match)
            state, cls = ("✓" if match else "✗"), ("match" if match else "miss")
        rows.append({
            "variant": r.variant, "quantity": r.quantity, "step": f"{int(r.step):,}" if finite(r.step) else "—",
            "ours": num(r.ours, precision + 2), "reference": num(r.reference, precision),
            "difference": num(r.difference, precision + 2, signed=True), "state": state, "cls": cls,
            "source": r.source, "spread": spread_text(r),
        })
    return rows, {"matched": matched, "counted": counted, "chaotic": chaotic_n, "not_reached": not_reached}


def spread_text(r) -> str:
    """Where the lecture's final loss lies among our seeds (the summary's sentence), or nothing."""
    sentence = r.get("spread_sentence")
    return sentence if isinstance(sentence, str) else ""


def _rate(x) -> str:
    return f"{float(x):+.2e}" if finite(x) else "—"


def _flag(x):
    """True, False or None (not measured) from a CSV cell."""
    if isinstance(x, str):
        return {"true": True, "false": False}.get(x.strip().lower())
    return bool(x) if isinstance(x, (bool, np.bool_)) or finite(x) else None


def chaos_rows(chaos: pd.DataFrame) -> list[dict]:
    """The summary's chaos table: the Lyapunov estimates, the twins' gap against the seed spread, and the
    measured verdict beside the config's flag."""
    rows = []
    for _, r in chaos.iterrows():
        measured, flagged = _flag(r.get("chaotic")), _flag(r.get("config_chaotic"))
        lecture = r.get("lyapunov_last_lecture_seed")
        rows.append({
            "variant": r.variant, "seeds": int(r.seeds) if finite(r.seeds) else 0,
            "last_step": _step(r.last_step),
            "lyapunov_last": _rate(r.lyapunov_last_mean) + (f" ± {float(r.lyapunov_last_sd):.1e}"
                                                           if finite(r.lyapunov_last_sd) else ""),
            "lyapunov_last_lecture": f"lecture seed: {_rate(lecture)}" if finite(lecture) else "",
            "lyapunov_10k": _rate(r.lyapunov_10k_mean),
            "lyapunov_10k_lecture": (f"lecture seed: {_rate(r.lyapunov_10k_lecture_seed)}"
                                     if finite(r.lyapunov_10k_lecture_seed) else ""),
            "growth": _sci(r.growth), "window": _step(r.window),
            "gap": num(r.twin_gap_mean), "seed_sd": num(r.seed_sd), "decorrelation": num(r.decorrelation, 2),
            "measured": {True: "chaotic", False: "not chaotic", None: "not measured"}[measured],
            "basis": r.basis if isinstance(r.basis, str) else "",
            "flagged": {True: "flagged chaotic", False: "not flagged", None: "—"}[flagged],
            "disagrees": measured is not None and flagged is not None and measured != flagged,
            "cls": {True: "chaotic", False: "", None: "muted"}[measured],
        })
    return rows


def _shade(value, vmax=100.0) -> str:
    """A background for a percentage cell: white to orange as it grows."""
    if not finite(value):
        return ""
    a = max(0.0, min(1.0, float(value) / vmax))
    return f"background: rgba(230, 120, 30, {0.08 + 0.6 * a:.2f})"


def _layer_cells(layers: pd.DataFrame, step) -> list[dict]:
    """One shaded cell per layer: the saturated share at ``step`` (ReLU, GELU: at or below zero), in the summary's
    layer order."""
    if not finite(step) or layers.empty:
        return []
    sel = layers[layers.stat.isin(("saturated_pct", "nonpositive_pct")) & (layers.step == int(step))]
    return [{"layer": r.layer, "text": f"{r.value:.0f}", "style": _shade(r.value)} for r in sel.itertuples()]


def _step(x) -> str:
    return f"{int(x):,}" if finite(x) else "—"


def _sci(x) -> str:
    return f"{float(x):.1e}" if finite(x) else "—"


def deep_rows(config: dict, summary: pd.DataFrame, variants: pd.DataFrame, deep_layers: pd.DataFrame,
              deep_variants: pd.DataFrame) -> list[dict]:
    """Per deep variant, as the summary computed it: per-layer saturation, first vs last layer gradient,
    update ratios, dead units, and the final losses."""
    rows = []
    if deep_variants.empty:
        return rows
    for name in config["variants"]:
        d = deep_variants[deep_variants.variant == name]
        if d.empty:
            continue
        d = d.iloc[0]
        layers = deep_layers[deep_layers.variant == name] if not deep_layers.empty else deep_layers
        v = variants[variants.variant == name].iloc[0] if not variants.empty and (variants.variant == name).any() \
            else {}
        state = divergence_state(summary, name)
        dead_init, dead_last = d.get("dead_units_init"), d.get("dead_units_last")
        rows.append({
            "variant": name, "description": config["variants"][name].get("description", ""),
            "early_step": _step(d.snapshot_step), "last_step": _step(d.last_step),
            "sat_early": _layer_cells(layers, d.snapshot_step), "sat_last": _layer_cells(layers, d.last_step),
            "share": share_cells(variant_spec(config, name)["activation"], v, False)["share_label"],
            "grad_first": _sci(d.grad_std_first), "grad_last": _sci(d.grad_std_last),
            "grad_ratio": num(d.grad_ratio, 2),
            "grad_verdict": d.grad_verdict if isinstance(d.grad_verdict, str) else "",
            "update_median": num(d.update_log10_median, 2),
            "dead": f"{dead_init:.0f} → {dead_last:.0f}" if finite(dead_init) and finite(dead_last) else "—",
            "train_loss": final_cell(v, "train_loss", **_final_state(state)),
            "val_loss": final_cell(v, "val_loss", **_final_state(state)),
            "diverged": bool(state["diverged"]),
        })
    return rows


# -- the rest ------------------------------------------------------------------------------------
def package_versions() -> list[tuple[str, str]]:
    out = [("python", platform.python_version())]
    for pkg in PACKAGES:
        try:
            out.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            continue
    from actgrad import __version__

    out.append(("actgrad", __version__))
    return out


def git_commit(repo) -> str:
    """``git rev-parse HEAD`` of the workflow's repository (marked when it has uncommitted changes)."""
    if not repo:
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def figure(figures_dir, captions_dir, name: str, variant: str | None = None) -> dict | None:
    path = Path(figure_path(figures_dir, name, variant))
    if not path.exists():
        return None
    titles = VARIANT_FIGURES if variant else GLOBAL_FIGURES
    return {"name": name, "title": titles[name], "src": data_uri(path), "caption": read_caption(captions_dir, name),
            "id": f"fig-{variant}-{name}" if variant else f"fig-{name}"}


def runtime_of(summary: pd.DataFrame) -> list[str]:
    """The distinct engine / device / threads / torch of the runs, as each run recorded them."""
    seen = []
    for _, r in summary.iterrows():
        threads = r.get("threads")
        text = (f"engine {r.get('engine', '?')} on {r.get('device', '?')}, "
                f"{int(threads) if finite(threads) else '?'} thread(s), torch {r.get('torch', '?')}")
        if text not in seen:
            seen.append(text)
    return seen


# -- theory next to measurement, and the sweeps ------------------------------------------------
# theory.csv's quantities as the report's columns: (quantity, heading, format)
THEORY_COLUMNS = [(q, *THEORY_QUANTITIES[q][1:])
                  for q in ("activation_std", "preactivation_std", "saturated_pct", "grad_std", "grad_std_rel_last")]
# A relative difference past this is marked: beyond what 100-unit layers make of the wide-layer limit.
RELATIVE_OFF = 0.10
# sweeps.csv's metrics as the sweep table's columns: (metric, heading, format)
SWEEP_COLUMNS = [(metric, heading, spec) for metric, (heading, spec, *_) in SWEEP_METRICS.items()]


def _fmt(x, spec: str) -> str:
    return format(float(x), spec) if finite(x) else "—"


def _relative_text(x) -> str:
    return f"{100 * float(x):+.1f}%" if finite(x) else "—"


def theory_cell(row, spec: str) -> dict:
    """One quantity of one layer: measured mean ± sd over seeds, the prediction and the relative difference below."""
    if row is None:
        return {"text": "—", "sub": "", "cls": "muted", "title": ""}
    text = _fmt(row.measured_mean, spec) + (f" ± {_fmt(row.measured_sd, spec)}" if finite(row.measured_sd) else "")
    rel = row.relative_difference
    sub = f"theory {_fmt(row.predicted, spec)} · Δ {_relative_text(rel)}" if finite(row.predicted) else "no theory"
    title = (f"seed {int(row.lecture_seed)}: {_fmt(row.measured_lecture_seed, spec)} "
             f"(Δ {_relative_text(row.relative_difference_lecture_seed)})") if finite(row.lecture_seed) else ""
    return {"text": text, "sub": sub, "cls": "off" if finite(rel) and abs(float(rel)) > RELATIVE_OFF else "",
            "title": title}


def theory_groups(config: dict, theory: pd.DataFrame) -> list[dict]:
    """The table "predicted vs measured at initialisation", per variant and layer: the listed variants first
    (shown), then one group per sweep (folded), each with its largest relative difference."""
    groups = []
    if theory.empty:
        return groups
    for sweep, names in sweep_groups(config).items():
        variants, largest = [], None
        for name in names:
            t = theory[theory.variant == name]
            if t.empty:
                continue
            rows = []
            for layer in sorted(t.layer.unique(), key=natural_key):
                by_quantity = {r.quantity: r for r in t[t.layer == layer].itertuples()}
                rows.append({"layer": layer, "cells": [theory_cell(by_quantity.get(q), spec)
                                                       for q, _, spec in THEORY_COLUMNS]})
            rel = t.relative_difference.abs().dropna()
            if len(rel) and (largest is None or rel.max() > largest[0]):
                worst = t.loc[rel.idxmax()]
                largest = (float(rel.max()), f"{_relative_text(worst.relative_difference)} ({name}, {worst.layer}, "
                                             f"{worst.quantity.replace('_', ' ')})")
            description = config["variants"][name].get("description", "")
            variants.append({"name": name, "rows": rows, "description": description})
        if variants:
            groups.append({"title": "listed variants" if sweep is None else f"sweep {sweep}",
                           "folded": sweep is not None, "variants": variants,
                           "largest": largest[1] if largest else "—"})
    return groups


def sweep_cell(rows: pd.DataFrame, metric: str, spec: str) -> dict:
    r = rows[rows.metric == metric]
    if r.empty or not finite(r["mean"].iloc[0]):
        return {"text": "—", "sub": ""}
    r = r.iloc[0]
    text = _fmt(r["mean"], spec) + (f" ± {_fmt(r.sd, spec)}" if finite(r.sd) else "")
    return {"text": text, "sub": f"theory {_fmt(r.predicted, spec)}" if finite(r.predicted) else ""}


def sweep_sections(config: dict, sweeps: pd.DataFrame, figures_dir, captions_dir, featured: set) -> list[dict]:
    """One section per sweep: its phase diagram and a row per point (mean ± sd over seeds, the theory below);
    a point without a section of its own is anchored on its row, so every link to a variant lands."""
    from actgrad.study.sweeps import format_value

    sections = []
    for sweep in sweep_names(config):
        names = [n for n, v in config["variants"].items() if v.get("sweep", {}).get("name") == sweep]
        keys = list(config["variants"][names[0]]["sweep"]["point"])
        rows = sweeps[sweeps.sweep == sweep] if not sweeps.empty else sweeps
        points = []
        for name in names:
            mine = rows[rows.variant == name] if not rows.empty else rows
            point = config["variants"][name]["sweep"]["point"]
            points.append({"name": name, "featured": name in featured,
                           "point_values": [format_value(point[k]) if not isinstance(point[k], (list, dict)) else "…"
                                      for k in keys],
                           "cells": [sweep_cell(mine, metric, spec) for metric, _, spec in SWEEP_COLUMNS]})
        path = Path(figure_path(figures_dir, sweep_figure(sweep)))
        fig = {"name": sweep_figure(sweep), "title": sweep_title(sweep), "src": data_uri(path),
               "caption": read_caption(captions_dir, SWEEP_CAPTION), "id": f"fig-{sweep_figure(sweep)}"} \
            if path.exists() else None
        sweep_config = (config.get("sweeps") or {}).get(sweep, {})
        sections.append({"name": sweep, "id": f"sweep-{sweep}", "description": sweep_config.get("description", ""),
                         "axes": keys, "columns": [heading for _, heading, _ in SWEEP_COLUMNS], "points": points,
                         "figure": fig, "n_featured": sum(p["featured"] for p in points)})
    return sections


def nav_groups(config: dict, shown: list[str]) -> list[dict]:
    """The navigation's variant groups: the listed variants, then each sweep (its section and its points shown
    in full)."""
    groups = []
    for sweep, names in sweep_groups(config).items():
        links = [n for n in names if n in shown]
        if sweep is None:
            if links:
                groups.append({"title": "Variants", "anchor": None, "variants": links})
        else:
            groups.append({"title": f"Sweep {sweep}", "anchor": f"sweep-{sweep}", "variants": links,
                           "n": len(names)})
    return groups


def build_context(config: dict, results, figures_dir, captions_dir=None, splits_json=None, repo=None) -> dict:
    """Everything the template shows, formatted."""
    results = Path(results)
    summary, variants, sig, refs, deep_layers, deep_variants = (
        _csv(results / TABLES[name]) for name in ("summary", "variants", "significance", "references",
                                                   "deep_layers", "deep_variants"))
    samples = _csv(results / TABLES["samples"], keep_default_na=False)  # "nan" is a name here, not a number
    if not summary.empty:
        summary["status"] = summary.status.fillna("ok")
    ref_rows, headline = reference_rows(refs)
    comparison = comparison_rows(config, variants, summary, refs)
    comparison_footnotes = reference_footnotes(comparison)

    featured = featured_variants(config)  # the rest of a sweep's points are rows of its table
    per_variant = []
    for name in featured:
        sub = summary[summary.variant == name] if not summary.empty else summary
        if sub.empty:
            continue
        seeds = sub.seed.astype(int).tolist()
        lecture = lecture_seed_of(seeds)
        row = next((c for c in comparison if c["variant"] == name), None)
        per_variant.append({
            "name": name, "description": config["variants"][name].get("description", ""),
            "model": str(sub.model.iloc[0]), "lecture_seed": lecture, "seeds": seeds,
            "status": row["status"] if row else "",
            "status_cls": row["status_cls"] if row else "",
            "facts": [("init loss", row["init_loss"]["text"] if row else "—"),
                      ("final val loss", row["val_loss"]["text"] if row else "—"),
                      (f"{row['share_label'] if row else 'saturated'} at init",
                       row["sat_init"]["text"] if row else "—")],
            "samples": samples[samples.variant == name]["name"].tolist() if not samples.empty else [],
            "init": figure(figures_dir, captions_dir, "init", name),
            "diagnostics": [f for f in (figure(figures_dir, captions_dir, k, name) for k in DIAGNOSTICS) if f],
            "heatmap": figure(figures_dir, captions_dir, "heatmap", name),
        })

    steps = sorted({int(s) for s in summary.steps.dropna()}) if not summary.empty else []
    seeds = sorted({int(s) for s in summary.seed}) if not summary.empty else []
    best = None
    if not variants.empty and variants.val_loss_mean.notna().any():
        b = variants.loc[variants.val_loss_mean.idxmin()]
        best = {"variant": b.variant, "value": num(b.val_loss_mean)}
    data_sha = "unknown"
    if splits_json and Path(splits_json).exists():
        data_sha = json.loads(Path(splits_json).read_text()).get("data_sha256", "unknown")
    n_diverged = int((summary.status == "diverged").sum()) if not summary.empty else 0
    return {
        "title": config.get("title", "makemore part 3, reproduced"),
        "expected_init_loss": f"{EXPECTED_INIT_LOSS:.4f}",
        "n_variants": summary.variant.nunique() if not summary.empty else 0, "n_runs": len(summary), "seeds": seeds,
        "lecture_seed": lecture_seed_of(seeds) if seeds else None,
        "steps": ", ".join(f"{s:,}" for s in steps) or "—",
        "n_diverged": n_diverged,
        # the rule of actgrad.training.divergence, in the headline's words
        "divergence_limit": f"{config['divergence']['loss_multiple'] * EXPECTED_INIT_LOSS:.2f}",
        "divergence_window": f"{config['divergence']['window']:,}",
        "best": best,
        "comparison": comparison, "comparison_footnotes": comparison_footnotes,
        "significance": significance_rows(sig), "significance_method": significance_method(sig, config),
        "chaos": chaos_rows(_csv(results / TABLES["chaos"])),
        "references": ref_rows, "headline": headline, "chaotic_why": CHAOTIC_WHY,
        "global": {k: figure(figures_dir, captions_dir, k) for k in GLOBAL_FIGURES},
        "deep": deep_rows(config, summary, variants, deep_layers, deep_variants),
        "variants": per_variant,
        "nav": nav_groups(config, [v["name"] for v in per_variant]),
        "theory": theory_groups(config, _csv(results / TABLES["theory"])),
        "theory_caption": read_caption(captions_dir, THEORY_CAPTION),
        "sweeps": sweep_sections(config, _csv(results / TABLES["sweeps"]), figures_dir, captions_dir, set(featured)),
        "share_heading": share_heading(config),
        "jacobian": jacobian_rows(_csv(results / TABLES["jacobian"])),
        # only where the study asks what BatchNorm's coupling costs (else every answer would be "not asked here")
        "normalisation": (normalisation_section(config, _csv(results / TABLES["normalisation"]),
                                                _csv(results / TABLES["normalisation_tests"]))
                          if asks_about_coupling(config) else None),
        "diagnosis": diagnosis_section(config, results, figures_dir),
        "trainability": trainability_section(config, _csv(results / TABLES["trainability"])),
        "config_yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
        "versions": package_versions(),
        "data_sha256": data_sha,
        "git_commit": git_commit(repo),
        "runtime": runtime_of(summary),
    }


# -- the Jacobian at init, and what BatchNorm's coupling costs ----------------------------------------
NORM_NAMES = {"batchnorm": "BatchNorm", "layernorm": "LayerNorm", "none": "no normalisation"}


def jacobian_rows(jacobian: pd.DataFrame) -> list[dict]:
    """results/jacobian.csv as the report's table: singular values' mean and spread (mean ± sd over seeds), and
    the relative spread of the squares beside the theory for Gaussian and orthogonal weights."""
    rows = []
    for r in jacobian.itertuples():
        rows.append({
            "variant": r.variant, "norm": NORM_NAMES.get(r.norm, r.norm), "activation": r.activation,
            "weights": r.weight_init, "gain": f"{float(r.gain):.4g}", "seeds": int(r.seeds),
            "sv_mean": mean_std(r.sv_mean_mean, r.sv_mean_sd, 3), "sv_std": mean_std(r.sv_std_mean, r.sv_std_sd, 3),
            "sv_range": f"{_fmt(r.sv_min_mean, '.2g')} – {_fmt(r.sv_max_mean, '.3g')}",
            "rel_spread": mean_std(r.rel_spread_sq_mean, r.rel_spread_sq_sd, 2),
            "gaussian": _fmt(r.predicted_rel_spread_sq_gaussian, ".2f"),
            "orthogonal": _fmt(r.predicted_rel_spread_sq_orthogonal, ".2f"),
            "theory": r.theory if isinstance(r.theory, str) else "",
        })
    return rows


def _cell_runs(row) -> int:
    return int(row.finished) if finite(row.finished) else 0


def _runs_text(n_finished, n_diverged) -> str:
    n = int(n_finished) + int(n_diverged)
    return f"{int(n_diverged)} of {n} diverged" if n_diverged else f"{n} finished"


def _tested(r) -> bool:
    return r.verdict in (significance.IMPROVES, significance.WORSENS, significance.NOT_DETECTED)


def _untested_text(r, before: str, after: str) -> str:
    """Why a comparison has no verdict: too few finished runs a side (diverged ones counted), or no spread."""
    if r.verdict == significance.NO_SPREAD:
        return "no spread across runs: untestable"
    return (f"untestable: {before} {_runs_text(r.n_before, r.diverged_before)}, "
            f"{after} {_runs_text(r.n_after, r.diverged_after)}; a test needs 2 finished runs a side")


def _layernorm_answer(tests: pd.DataFrame) -> str:
    rows = tests[tests.question == LAYERNORM_VS_BATCHNORM]
    if rows.empty:
        return "The study has no batch size with both BatchNorm and LayerNorm variants: not asked here."
    parts = []
    for r in rows.itertuples():
        if not _tested(r):
            parts.append(f"batch {r.batch_size}: {_untested_text(r, 'BatchNorm', 'LayerNorm')}")
            continue
        what = {significance.IMPROVES: "LayerNorm is better", significance.WORSENS: "LayerNorm is worse",
                significance.NOT_DETECTED: "no difference detected"}[r.verdict]
        parts.append(f"batch {r.batch_size}: {what} (LayerNorm {mean_std(r.mean_after, r.sd_after)} against "
                     f"BatchNorm {mean_std(r.mean_before, r.sd_before)}, difference {num(r.difference, 4, signed=True)}"
                     f", 95 % CI {_interval(r.ci_low, r.ci_high)}, Holm p {p_value(r.p_holm)})")
    return ("Final validation loss, every gain and seed of a cell pooled; Welch's test with Holm's correction over "
            "the batch sizes. " + "; ".join(parts) + ".")


def _batchnorm_answer(tests: pd.DataFrame, cells: dict) -> str:
    bn = {b: r for (n, b), r in cells.items() if n == "batchnorm"}
    if not bn:
        return "The study has no BatchNorm variants: not asked here."
    sizes = sorted(bn, reverse=True)
    gaps = "; ".join(f"batch {b}: {num(bn[b].val_loss_mean)} with the running statistics, "
                     f"{num(bn[b].val_loss_batch_stats_mean)} with each minibatch's own "
                     f"(gap {num(bn[b].gap_mean, 4, signed=True)})" for b in sizes)
    if len(sizes) < 2:
        return f"One batch size only, so no trend to read: {gaps}."
    against_ln = tests[tests.question == LAYERNORM_VS_BATCHNORM]
    rows = against_ln if not against_ln.empty else tests[tests.question == BATCHNORM_BREAKDOWN]
    against = "LayerNorm at the same batch size" if not against_ln.empty else f"BatchNorm at batch {max(sizes)}"
    behind, failing, parts = [], [], []
    for r in rows.itertuples():
        # Against LayerNorm, BatchNorm is "before"; against its largest batch, it is "after".
        bn_side = "before" if not against_ln.empty else "after"
        bn_diverged = int(getattr(r, f"diverged_{bn_side}"))
        bn_runs = bn_diverged + int(getattr(r, f"n_{bn_side}"))
        bn_worse = (r.verdict == significance.IMPROVES) if bn_side == "before" else (r.verdict == significance.WORSENS)
        other_diverged = int(r.diverged_after if bn_side == "before" else r.diverged_before)
        if bn_worse:
            behind.append(r.batch_size)
        if bn_diverged > other_diverged:
            failing.append(r.batch_size)
            parts.append(f"at batch {r.batch_size} {bn_diverged} of {bn_runs} BatchNorm runs diverged "
                         f"({other_diverged} against {against})")
        elif not _tested(r):
            sides = ("BatchNorm", "LayerNorm") if bn_side == "before" else \
                (f"BatchNorm at batch {max(sizes)}", f"BatchNorm at batch {r.batch_size}")
            parts.append(f"batch {r.batch_size}: {_untested_text(r, *sides)}")
    broken = sorted(set(behind) | set(failing), reverse=True)
    if broken:
        lead = (f"BatchNorm falls behind {against} at batch size{'s' if len(broken) > 1 else ''} "
                f"{', '.join(map(str, broken))} (worse after Holm's correction, or more runs diverged): here it "
                f"breaks down at batch {max(broken)}" + (" and below" if min(sizes) < max(broken) else ""))
    else:
        lead = f"At no batch size here is BatchNorm detectably worse than {against}, nor do more of its runs diverge"
    detail = f" ({'; '.join(parts)})" if parts else ""
    return (f"{lead}{detail}. Evaluated with each minibatch's own statistics instead of the running ones (the "
            f"coupling of examples at evaluation), the validation loss moves by: {gaps}.")


def _gain_answer(tests: pd.DataFrame) -> str:
    rows = tests[tests.question == GAIN_MATTERS]
    if rows.empty:
        return "No deep variants with more than one gain: not asked here."
    parts = []
    for norm in dict.fromkeys(rows.norm):
        sub = rows[rows.norm == norm]
        tested = sub[[_tested(r) for r in sub.itertuples()]]
        differ = tested[tested.verdict != significance.NOT_DETECTED]
        name = NORM_NAMES.get(norm, norm)
        untested = f"; {len(sub) - len(tested)} untestable (too few finished runs)" if len(tested) < len(sub) else ""
        if differ.empty:
            verdict = (f"no pair of gains differs detectably ({len(tested)} pairs tested{untested})" if len(tested)
                       else f"nothing testable ({len(sub)} pairs{untested})")
        else:
            largest = differ.loc[differ.difference.abs().idxmax()]
            verdict = (f"the gain matters: {len(differ)} of {len(tested)} pairs of gains differ{untested}; the "
                       f"largest, {largest.before} against {largest.after}, by "
                       f"{num(largest.difference, 4, signed=True)}")
        parts.append(f"{name}: {verdict}")
    return ("Every pair of gains at each batch size, Welch's test with Holm's correction within each normalisation "
            "(a gain whose effect is not detected is not shown irrelevant, only not detected at this number of "
            "seeds): " + "; ".join(parts) + ".")


def normalisation_section(config: dict, table: pd.DataFrame, tests: pd.DataFrame) -> dict | None:
    """The section "What BatchNorm's coupling costs" where a sweep varies the normalisation: the final validation
    loss by norm x batch size (results/normalisation.csv) and one paragraph per question, from those numbers."""
    if table.empty or not norm_sweeps(config):
        return None
    cells = {(str(r.norm), int(r.batch_size)): r for r in table.itertuples()}
    sizes = sorted({b for _, b in cells})
    rows = []
    for norm in dict.fromkeys(n for n, _ in cells):
        row_cells = []
        for b in sizes:
            r = cells.get((norm, b))
            if r is None:
                row_cells.append({"text": "—", "sub": ""})
                continue
            sub = f"{_cell_runs(r)} of {int(r.runs)} runs"
            if finite(r.gap_mean):
                sub += f" · batch statistics {num(r.val_loss_batch_stats_mean)} (gap {num(r.gap_mean, 4, signed=True)})"
            elif norm == "layernorm":
                sub += " · batch statistics: the same (no running statistics)"
            row_cells.append({"text": mean_std(r.val_loss_mean, r.val_loss_sd), "sub": sub})
        rows.append({"norm": NORM_NAMES.get(norm, norm), "cells": row_cells})
    examples = sorted({e for r in cells.values() for e in str(r.examples).split(";")})
    return {"sizes": sizes, "rows": rows, "examples": ", ".join(f"{int(e):,}" for e in examples),
            "answers": [(LAYERNORM_VS_BATCHNORM, _layernorm_answer(tests)),
                        (BATCHNORM_BREAKDOWN, _batchnorm_answer(tests, cells)),
                        (GAIN_MATTERS, _gain_answer(tests))]}


def render(template_path, context: dict) -> str:
    import jinja2

    template_path = Path(template_path)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_path.parent)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template_path.name).render(**context)


def write_report(config: dict, results, figures_dir, template, out, captions_dir=None, splits_json=None,
                 repo=None, log=print) -> Path:
    """Render the report and write it atomically (temporary file, then rename)."""
    context = build_context(config, results, figures_dir, captions_dir, splits_json, repo)
    html = render(template, context)
    out = Path(out)
    atomic_write_bytes(out, html.encode("utf-8"))
    log(f"report: {context['n_variants']} variant(s), {context['n_runs']} run(s), "
        f"{context['headline']['matched']} of {context['headline']['counted']} reference numbers reproduced "
        f"-> {out} ({len(html) / 1e6:.1f} MB)")
    return out


# -- the diagnosis: what is wrong with each network, and the prescriptions tried ---------------------------------
SEVERITY_CLASS = {"severe": "worse", "warning": "warn", "info": "noise"}
OUTCOME_CLASS = {"gone": "real", "weaker": "noise", "still there": "worse"}


def _evidence_link(figures_dir, finding, featured: set) -> tuple[str, str]:
    """The anchor of the figure that shows a finding's evidence, and its title; the variant's section, or the
    comparison table, where that figure was not drawn."""
    name, variant = finding["figure"], finding["variant"]
    if figures_dir is not None and name in GLOBAL_FIGURES and Path(figure_path(figures_dir, name)).exists():
        return f"#fig-{name}", GLOBAL_FIGURES[name]
    if figures_dir is not None and name in VARIANT_FIGURES and Path(figure_path(figures_dir, name, variant)).exists():
        return f"#fig-{variant}-{name}", f"{variant}: {VARIANT_FIGURES[name]}"
    if variant in featured:
        return f"#v-{variant}", variant
    return "#comparison", "Comparison across variants"


def _measure_text(x, check: str) -> str:
    if not finite(x):
        return "—"
    return f"10^{x:.1f}" if check == "update_ratio" else f"{x:.3g}"


def diagnosis_section(config: dict, results, figures_dir=None) -> dict:
    """The findings of results/diagnosis.csv, each with the link to its evidence, by variant, and the before/after
    of each prescription tried (results/fixes.csv), formatted."""
    results = Path(results)
    findings = _csv(results / TABLES["diagnosis"], keep_default_na=False)
    fixes = _csv(results / TABLES["fixes"], keep_default_na=False)
    featured = set(featured_variants(config))
    rows, by_variant = [], {}
    for f in findings.to_dict("records"):
        href, title = _evidence_link(figures_dir, f, featured)
        row = {"variant": f["variant"], "code": f["code"].replace("_", " "), "severity": f["severity"],
               "cls": SEVERITY_CLASS.get(f["severity"], ""), "sentence": f["sentence"], "href": href,
               "link": title, "measured": _measure_text(pd.to_numeric(f["measured"], errors="coerce"), f["check"]),
               "threshold": _measure_text(pd.to_numeric(f["threshold"], errors="coerce"), f["check"]),
               "quantity": f["quantity"],
               "prescription": "" if f["prescription"] in ("", "{}") else f["prescription"]}
        rows.append(row)
        by_variant.setdefault(f["variant"], []).append(row)
    pairs = []
    for (variant, fixed), sub in (fixes.groupby(["variant", "fixed"], sort=False) if not fixes.empty else []):
        first = sub.iloc[0]
        diff = pd.to_numeric(first["difference"], errors="coerce")
        pairs.append({
            "variant": variant, "fixed": fixed,
            "findings": [{"code": r["code"].replace("_", " "), "severity": r["severity"],
                          "before": _measure_text(pd.to_numeric(r["measured"], errors="coerce"), r["check"]),
                          "after": _measure_text(pd.to_numeric(r["measured_fixed"], errors="coerce"), r["check"]),
                          "outcome": r["outcome"], "cls": OUTCOME_CLASS.get(r["outcome"], "")}
                         for r in sub.to_dict("records")],
            "new": [c.replace("_", " ") for c in str(first["findings_fixed"]).split(";")
                    if c and c not in set(sub.code)],
            "loss_before": num(pd.to_numeric(first["mean_before"], errors="coerce")),
            "loss_after": num(pd.to_numeric(first["mean_after"], errors="coerce")),
            "difference": num(diff, signed=True) if finite(diff) else "—",
            "interval": _interval(pd.to_numeric(first["ci_low"], errors="coerce"),
                                  pd.to_numeric(first["ci_high"], errors="coerce")),
            "p_holm": p_value(pd.to_numeric(first["p_holm"], errors="coerce")),
            "verdict": first["verdict"], "verdict_cls": VERDICT_CLASS.get(first["verdict"], ""),
        })
    counts = {s: sum(r["severity"] == s for r in rows) for s in ("severe", "warning", "info")}
    return {"findings": rows, "by_variant": by_variant, "counts": counts, "fixes": pairs,
            "n_variants": len(by_variant)}
