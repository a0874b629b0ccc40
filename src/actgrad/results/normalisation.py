"""What BatchNorm's coupling costs: the deep nets' final validation loss by normalisation x batch size, and the
three questions a normalisation sweep asks, each answered with the same tests as every other comparison.

``results/normalisation.csv`` holds a cell per norm x batch size (over every gain and seed of it);
``results/normalisation_tests.csv`` holds the comparisons behind the questions, with Welch's test, Holm's correction
within each question's family, the 95 % interval and Hedges' g
(:func:`actgrad.results.significance.significance_table`), and how many runs of each side diverged: a diverged run
is counted, never read as a tie, and a comparison with fewer than two finished runs a side is untestable, not
"no difference".
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from actgrad.results.significance import SIGNIFICANCE_COLUMNS, significance_table
from actgrad.study.comparisons import Comparison, comparison_settings
from actgrad.study.settings import variant_spec
from actgrad.study.sweeps import sweep_groups

NORM_ORDER = ("batchnorm", "layernorm", "none")
# The questions, each a family of comparisons (Holm's correction runs within one).
LAYERNORM_VS_BATCHNORM = "Does LayerNorm match BatchNorm here?"
BATCHNORM_BREAKDOWN = "At which batch size does BatchNorm break down?"
GAIN_MATTERS = "Is the gain irrelevant under both?"
QUESTIONS = (LAYERNORM_VS_BATCHNORM, BATCHNORM_BREAKDOWN, GAIN_MATTERS)
TESTS_COLUMNS = ["question", "norm", "batch_size", *SIGNIFICANCE_COLUMNS]


NORMALISATION_COLUMNS = [
    "norm", "batch_size", "steps", "examples", "gains", "variants", "runs", "finished", "val_loss_mean",
    "val_loss_sd", "val_loss_batch_stats_mean", "val_loss_batch_stats_sd", "gap_mean", "gap_sd", "gap_max",
    "gain_spread", "seed_sd", "by_gain",
]


def norm_sweeps(config: dict) -> list[str]:
    """The sweeps that vary the normalisation (``norm`` or ``batchnorm``, directly or in a bundle)."""
    return [sweep for sweep, names in sweep_groups(config).items()
            if sweep is not None and len({variant_spec(config, name)["norm"] for name in names}) > 1]


def _cells(config: dict) -> tuple[dict[str, dict], dict[tuple[str, int], list[str]]]:
    """The deep variants' complete settings and their cells, (norm, batch size) -> variant names, in the table's
    order: over the variants of the sweeps that vary the normalisation (:func:`norm_sweeps`), else every deep one."""
    sweeps = norm_sweeps(config)
    specs = {name: variant_spec(config, name) for name, v in config["variants"].items()
             if not sweeps or v.get("sweep", {}).get("name") in sweeps}
    specs = {name: spec for name, spec in specs.items() if spec["model"] == "deep"}
    cells: dict[tuple[str, int], list[str]] = {}
    for name, spec in specs.items():
        cells.setdefault((spec["norm"], spec["batch_size"]), []).append(name)
    order = {norm: i for i, norm in enumerate(NORM_ORDER)}
    return specs, dict(sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1])))


def cell_label(norm: str, batch_size: int, gain: float | None = None) -> str:
    """How a cell (or one gain of it) is named in the tests table's before/after columns."""
    return f"{norm}@batch{batch_size}" + (f"@gain{gain:.4g}" if gain is not None else "")


def normalisation_tests(config: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The comparisons behind the three questions (``results/normalisation_tests.csv``), the runs of a cell pooled
    over its gains and seeds (by gain, for the gain question):

    - LayerNorm against BatchNorm at each batch size that has both (one family);
    - BatchNorm at each batch size against a reference: LayerNorm at the same batch size where the study has it
      (the rows of the first question, so not tested twice), else BatchNorm at the study's largest batch size,
      chosen before looking at any loss (one family);
    - per normalisation, every pair of gains at each batch size (one family per normalisation).
    """
    specs, cells = _cells(config)
    pooled, planned = [], []

    def pool(label: str, names: list[str]) -> str:
        sub = runs[runs.variant.isin(names)].copy()
        sub["variant"] = label
        pooled.append(sub)
        return label

    sizes = {norm: [b for n, b in cells if n == norm] for norm, _ in cells}
    for b in sizes.get("batchnorm", []):
        if ("layernorm", b) in cells:
            planned.append((LAYERNORM_VS_BATCHNORM, "layernorm", b, Comparison(
                "layernorm_vs_batchnorm", pool(cell_label("batchnorm", b), cells[("batchnorm", b)]),
                pool(cell_label("layernorm", b), cells[("layernorm", b)]))))
    bn_sizes = [b for b in sizes.get("batchnorm", []) if ("layernorm", b) not in cells]
    if len(bn_sizes) > 1:
        largest = max(bn_sizes)
        reference = pool(cell_label("batchnorm", largest), cells[("batchnorm", largest)])
        for b in bn_sizes:
            if b != largest:
                after = pool(cell_label("batchnorm", b), cells[("batchnorm", b)])
                planned.append((BATCHNORM_BREAKDOWN, "batchnorm", b,
                                Comparison("batchnorm_vs_largest_batch", reference, after)))
    for (norm, b), names in cells.items():
        gains = sorted({float(specs[n]["gain"]) for n in names})
        labels = [pool(cell_label(norm, b, g), [n for n in names if float(specs[n]["gain"]) == g]) for g in gains]
        for before, after in itertools.combinations(labels, 2):
            planned.append((GAIN_MATTERS, norm, b, Comparison(f"gain_{norm}", before, after)))
    if not planned:
        return pd.DataFrame(columns=TESTS_COLUMNS)
    settings = comparison_settings(config)
    table = significance_table(pd.concat(pooled, ignore_index=True), [c for *_, c in planned],
                               metric="val_loss", alpha=settings["alpha"], power=settings["power"])
    table.insert(0, "batch_size", [b for _, _, b, _ in planned])
    table.insert(0, "norm", [n for _, n, _, _ in planned])
    table.insert(0, "question", [q for q, *_ in planned])
    return table[TESTS_COLUMNS]


def normalisation_table(config: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """The deep nets' final validation loss by norm x batch size (``results/normalisation.csv``), each cell over
    every gain and seed of it: mean and sd over the finished runs; for BatchNorm the loss with each minibatch's own
    statistics and its gap to the running statistics' (``gap``: batch minus running, per run); the spread over
    gains (largest minus smallest of the gains' means) against the seeds' (pooled sd within a gain); and each
    gain's mean (``by_gain``: ``gain:mean`` joined by ``;``). Over the variants of the sweeps that vary the
    normalisation (:func:`norm_sweeps`), else over every deep variant; empty without deep variants."""
    rows = []
    specs, cells = _cells(config)
    for (norm, batch_size), names in cells.items():
        sub = runs[runs.variant.isin(names)]
        ok = sub[sub.status == "ok"]
        val = ok.val_loss.astype(float)
        batch = ok.val_loss_batch_stats.astype(float) if "val_loss_batch_stats" in ok else pd.Series(dtype=float)
        gap = (batch - val).dropna()
        gains = sorted({float(specs[n]["gain"]) for n in names})
        by_gain = {g: ok[ok.variant.isin([n for n in names if float(specs[n]["gain"]) == g])].val_loss.astype(float)
                   for g in gains}
        means = [v.mean() for v in by_gain.values() if len(v)]
        variances = [v.var(ddof=1) for v in by_gain.values() if len(v) > 1]
        steps = sorted({specs[n]["max_steps"] for n in names})
        rows.append({
            "norm": norm, "batch_size": batch_size, "steps": ";".join(map(str, steps)),
            "examples": ";".join(str(s * batch_size) for s in steps), "gains": ";".join(f"{g:.4g}" for g in gains),
            "variants": ";".join(names), "runs": len(sub), "finished": len(ok),
            "val_loss_mean": val.mean() if len(val) else np.nan, "val_loss_sd": val.std(ddof=1) if len(val) > 1
            else np.nan,
            "val_loss_batch_stats_mean": batch.mean() if batch.notna().any() else np.nan,
            "val_loss_batch_stats_sd": batch.std(ddof=1) if batch.notna().sum() > 1 else np.nan,
            "gap_mean": gap.mean() if len(gap) else np.nan, "gap_sd": gap.std(ddof=1) if len(gap) > 1 else np.nan,
            "gap_max": gap.max() if len(gap) else np.nan,
            "gain_spread": max(means) - min(means) if len(means) > 1 else np.nan,
            "seed_sd": math.sqrt(sum(variances) / len(variances)) if variances else np.nan,
            "by_gain": ";".join(f"{g:.4g}:{v.mean()!r}" for g, v in by_gain.items() if len(v)),
        })
    return pd.DataFrame(rows, columns=NORMALISATION_COLUMNS)
