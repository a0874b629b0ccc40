"""Significance over seeds: what the seeds let us claim about a comparison.

A variant is trained once per seed; its final losses over seeds are a small sample. For each
chosen comparison this module gives Welch's t-test with Holm's correction across the comparison's
family, the difference in means with its 95 % interval and Hedges' g, a verdict in words the test
supports, and, where nothing was detected, how many seeds per variant would detect the observed
difference. It also places a printed reference (the lecture's number) inside our seeds' spread, and
turns the sensitivity twins into a rate (a finite-time Lyapunov estimate) and a chaos verdict.

Which comparisons a study makes is :mod:`actgrad.study.comparisons`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from actgrad.study.comparisons import DEFAULT_ALPHA, DEFAULT_METRIC, DEFAULT_POWER, Comparison

CONFIDENCE = 0.95
# Seeds per variant beyond which the power search stops; more seeds than this is "not feasible" in any study.
MAX_SEEDS = 100_000
# A variant is chaotic when its twins' final losses are at least this far decorrelated (see chaos_verdict).
CHAOS_DECORRELATION = 0.5
# With one seed: the twins' parameter distance must reach this fraction of the perturbed weights' own size.
CHAOS_SEPARATION = 0.1

IMPROVES = "improves"
WORSENS = "worsens"
NOT_DETECTED = "no difference detected at this number of seeds"
TOO_FEW_SEEDS = "needs at least 2 seeds per variant"
NO_SPREAD = "no spread across seeds: the test is undefined"

LYAPUNOV_UNIT = "per step"


def _scipy_stats():
    # Imported on use: scipy.stats costs half a second of CPU, and the report imports this module
    # for its method text only.
    from scipy import stats

    return stats


# ---- Tests and effect sizes -----------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, in the input order; NaN stays NaN and is not counted in m.

    Sorted ascending, the k-th smallest of m p-values is multiplied by (m - k + 1); each adjusted value
    is the running maximum of those products, capped at 1. Rejecting where the adjusted p < alpha keeps
    the family-wise error rate at alpha.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def welch_test(before: Sequence[float], after: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Welch's (1947) t-test of mean(after) - mean(before), with its interval at ``confidence``.

    The degrees of freedom are Welch-Satterthwaite's. Returns difference, se, df, t, p (two-sided),
    ci_low, ci_high; NaN where a variant has fewer than 2 values or neither varies.
    """
    stats = _scipy_stats()
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    out = {"difference": b.mean() - a.mean() if len(a) and len(b) else np.nan, "se": np.nan, "df": np.nan,
           "t": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = out["difference"] / se
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    out.update(se=se, df=df, t=t, p=float(2 * stats.t.sf(abs(t), df)), ci_low=out["difference"] - half,
               ci_high=out["difference"] + half)
    return out


def hedges_g(before: Sequence[float], after: Sequence[float]) -> float:
    """Hedges' (1981) g of after - before: the difference over the pooled sd, times the exact bias correction.

    J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)), df = n_before + n_after - 2; J is about
    1 - 3/(4 df - 1), which matters at a handful of seeds (J = 0.90 at 5 + 5).
    """
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    df = len(a) + len(b) - 2
    if len(a) < 2 or len(b) < 2:
        return np.nan
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / df)
    if pooled == 0:
        return np.nan
    correction = math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)
    return correction * (b.mean() - a.mean()) / pooled


def verdict(difference: float, p_holm: float, alpha: float) -> str:
    """Lower loss is better. A test that detects nothing shows no equality, so nothing is called equal."""
    if math.isnan(p_holm):
        return TOO_FEW_SEEDS
    if p_holm < alpha:
        return IMPROVES if difference < 0 else WORSENS
    return NOT_DETECTED


# ---- Power: how many seeds would it take -----------------------------------------------------------------------


def welch_power(difference: float, sd_before: float, sd_after: float, n: int, alpha: float) -> float:
    """Power of the two-sided Welch test at level ``alpha`` with ``n`` seeds per variant.

    Under a true difference ``difference`` and these sds the statistic is taken as noncentral t with
    the Welch-Satterthwaite df of n per variant and noncentrality difference / sqrt((sd_b^2 + sd_a^2) / n)
    (exact for equal sds, the usual approximation otherwise).
    """
    stats = _scipy_stats()
    va, vb = sd_before**2, sd_after**2
    se = math.sqrt((va + vb) / n)
    df = (n - 1) * (va + vb) ** 2 / (va**2 + vb**2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(difference) / se
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(difference: float, sd_before: float, sd_after: float, alpha: float,
                 power: float = DEFAULT_POWER, max_seeds: int = MAX_SEEDS) -> float:
    """The fewest seeds per variant (at least 2) whose Welch test detects ``difference`` with ``power``.

    Power grows with n, so n is doubled until it is enough and then bisected. NaN when the difference
    is zero, the sds are both zero or undefined, or more than ``max_seeds`` would be needed.
    """
    if not all(math.isfinite(x) for x in (difference, sd_before, sd_after)) or difference == 0 \
            or sd_before == 0 and sd_after == 0:
        return np.nan
    enough = lambda n: welch_power(difference, sd_before, sd_after, n, alpha) >= power
    low, high = 1, 2
    while not enough(high):
        if high >= max_seeds:
            return np.nan
        low, high = high, min(2 * high, max_seeds)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


# ---- The significance table ------------------------------------------------------------------------------------

SIGNIFICANCE_COLUMNS = [
    "family", "before", "after", "metric", "n_before", "n_after", "diverged_before", "diverged_after",
    "mean_before", "mean_after", "sd_before", "sd_after", "difference", "ci_low", "ci_high", "confidence", "df",
    "t", "p", "m_family", "p_holm", "alpha", "hedges_g", "verdict", "power", "power_alpha", "seeds_needed",
    "values_before", "values_after",
]


def _finished(runs: pd.DataFrame, variant: str, metric: str) -> tuple[np.ndarray, int]:
    sub = runs[runs.variant == variant]
    values = sub[sub.status == "ok"][metric].astype(float).to_numpy()
    return values[np.isfinite(values)], int((sub.status == "diverged").sum())


def significance_table(runs: pd.DataFrame, comparisons: Sequence[Comparison], metric: str = DEFAULT_METRIC,
                       alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER) -> pd.DataFrame:
    """One row per comparison: every statistic beside the inputs it came from (for significance.csv).

    ``runs`` has a row per run with columns variant, seed, status ("ok" or "diverged") and ``metric``;
    only finished runs count. Within each family, Holm's correction runs over the comparisons that
    could be tested (``m_family``). Where nothing was detected, ``seeds_needed`` is the seeds per
    variant giving ``power`` at ``power_alpha`` = alpha / m_family, the level at which Holm rejects a
    comparison whatever the family's other p-values.
    """
    rows = []
    for c in comparisons:
        a, diverged_a = _finished(runs, c.before, metric)
        b, diverged_b = _finished(runs, c.after, metric)
        row = {"family": c.family, "before": c.before, "after": c.after, "metric": metric,
               "n_before": len(a), "n_after": len(b), "diverged_before": diverged_a, "diverged_after": diverged_b,
               "mean_before": a.mean() if len(a) else np.nan, "mean_after": b.mean() if len(b) else np.nan,
               "sd_before": a.std(ddof=1) if len(a) > 1 else np.nan,
               "sd_after": b.std(ddof=1) if len(b) > 1 else np.nan, "confidence": CONFIDENCE}
        test = welch_test(a, b)
        row.update({k: test[k] for k in ("difference", "ci_low", "ci_high", "df", "t", "p")})
        row["hedges_g"] = hedges_g(a, b)
        row["values_before"] = ";".join(repr(float(v)) for v in a)
        row["values_after"] = ";".join(repr(float(v)) for v in b)
        rows.append(row)
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for members in families.values():
        p_holm = holm([row["p"] for row in members])
        m = sum(math.isfinite(row["p"]) for row in members)
        for row, adjusted in zip(members, p_holm):
            row.update(p_holm=adjusted, m_family=m, alpha=alpha, power=power,
                       power_alpha=alpha / m if m else np.nan, seeds_needed=np.nan)
            untestable = row["n_before"] >= 2 and row["n_after"] >= 2 and math.isnan(row["p"])
            row["verdict"] = NO_SPREAD if untestable else verdict(row["difference"], adjusted, alpha)
            if row["verdict"] == NOT_DETECTED:
                row["seeds_needed"] = seeds_needed(row["difference"], row["sd_before"], row["sd_after"],
                                                   row["power_alpha"], power)
    table = pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
    # Counts stay integers in the CSV; a comparison without a count leaves the cell empty.
    table["seeds_needed"] = table["seeds_needed"].astype("Int64")
    return table


def method_text(alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER, metric: str = DEFAULT_METRIC) -> str:
    """One paragraph for the report: what each column of the significance table is, with references."""
    return (
        f"Each comparison tests the difference in mean {metric.replace('_', ' ')} over seeds (after minus "
        "before; runs that diverged are left out and counted) with Welch's t-test (Welch 1947), which does not "
        "assume equal variances; its degrees of freedom are Welch-Satterthwaite's, and the difference is given "
        f"with its {CONFIDENCE * 100:g} % confidence interval (per comparison, not adjusted). The comparisons of "
        "one family - one question, such as the lecture's consecutive steps or each gain against 5/3 - are "
        "corrected together with Holm's step-down method (Holm 1979), which keeps the chance of any false "
        f"detection in the family at most {alpha:g}. A comparison is called an improvement (lower loss) or a "
        "worsening only where its Holm-adjusted p-value is below that level; otherwise no difference was "
        "detected at this number of seeds, which does not show the variants are equal. The effect size is "
        "Hedges' g (Hedges 1981): the difference over the pooled standard deviation, corrected for its "
        "small-sample bias. Where nothing was detected, the seeds needed are the fewest seeds per variant for "
        f"which Welch's test would detect the observed difference with {power * 100:g} % power (noncentral t, "
        f"from the observed standard deviations) at the level {alpha:g}/m for a family of m tested comparisons, "
        "at which Holm's method rejects a comparison whatever the others' p-values. References: B. L. Welch, "
        "Biometrika 34 (1947) 28-35; S. Holm, Scand. J. Statist. 6 (1979) 65-70; L. V. Hedges, J. Educ. "
        "Statist. 6 (1981) 107-128."
    )


# ---- The lecture's number inside our spread --------------------------------------------------------------------


def _significant(x: float, figures: int) -> str:
    """``x`` to ``figures`` significant figures, in fixed notation (0.00079, not 7.9e-04)."""
    decimals = max(0, figures - 1 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:.{decimals}f}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def reference_in_spread(reference: float, values: Sequence[float], precision: int = 4,
                        label: str = "the lecture's") -> dict:
    """Where a printed value lies among our seeds' values: z-score against their mean and sd, and its rank.

    ``rank`` is the reference's place among the seeds' values and itself, lowest first (1 = below every
    seed). Returns reference, n, mean, sd, z, n_below (seeds lower than the reference), n_above, rank
    and a sentence such as "the lecture's 2.1682 is 1.3 sd above our mean of 5 seeds (...)".
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    fmt = lambda x: f"{x:.{precision}f}"
    out = {"reference": float(reference), "n": n, "mean": v.mean() if n else np.nan,
           "sd": v.std(ddof=1) if n > 1 else np.nan, "z": np.nan, "n_below": int((v < reference).sum()),
           "n_above": int((v > reference).sum())}
    out["rank"] = out["n_below"] + 1
    if n == 0:
        out["sentence"] = f"no finished seed to compare {label} {fmt(reference)} with"
        return out
    if n == 1 or out["sd"] == 0:
        gap = reference - out["mean"]
        # Equal at the printed precision is all a printed number can be.
        where = "equal to" if float(fmt(gap)) == 0 else f"{fmt(abs(gap))} {'above' if gap > 0 else 'below'}"
        whose = "our single seed's" if n == 1 else f"all {n} of our seeds'"
        out["sentence"] = f"{label} {fmt(reference)} is {where} {whose} {fmt(out['mean'])} (no spread to measure)"
        return out
    out["z"] = (reference - out["mean"]) / out["sd"]
    z = f"{abs(out['z']):.1f}"
    where = "at our mean" if z == "0.0" else f"{z} sd {'above' if out['z'] > 0 else 'below'} our mean"
    # The mean and sd to the digits their spread has (the sd to 2 significant figures, the mean to the sd's first
    # one), never fewer than the printed value's: at the printed precision alone, a mean 1.3 sd away reads
    # "2.07, sd 0.00".
    digits = max(precision, -math.floor(math.log10(out["sd"]))) if out["sd"] > 0 else precision
    out["sentence"] = (f"{label} {fmt(reference)} is {where} of {n} seeds ({out['mean']:.{digits}f}, sd "
                       f"{_significant(out['sd'], 2) if out['sd'] < 10 ** -precision else fmt(out['sd'])}); "
                       f"it would rank {_ordinal(out['rank'])} of {n + 1}, lowest first")
    return out


# ---- Chaos as a rate -------------------------------------------------------------------------------------------


def lyapunov_exponents(steps: Sequence[int], distances: Sequence[float]) -> np.ndarray:
    """The finite-time Lyapunov estimate lambda(t) = (1/t) ln(d(t) / d(0)) at every logged step, per step.

    ``distances`` are the twins' parameter distances ||theta_A(t) - theta_B(t)|| at ``steps``; the first
    step must be 0 (d(0), the perturbation itself, must be > 0). NaN at step 0; -inf where the twins
    coincide again (d = 0). Positive: the perturbation grows exponentially at that average rate.
    """
    t = np.asarray(steps, dtype=float)
    d = np.asarray(distances, dtype=float)
    if t.shape != d.shape or t.ndim != 1 or len(t) == 0:
        raise ValueError(f"steps and distances must be 1-d and of equal length, got {t.shape} and {d.shape}")
    if t[0] != 0 or not (np.isfinite(d[0]) and d[0] > 0):
        raise ValueError(f"the trace must start at step 0 with a positive distance, got step {t[0]:g}, "
                         f"distance {d[0]:g}")
    if np.any(np.diff(t) <= 0):
        raise ValueError("steps must increase")
    out = np.full(len(t), np.nan)
    with np.errstate(divide="ignore"):
        out[1:] = np.log(d[1:] / d[0]) / t[1:]
    return out


def lyapunov_at(steps: Sequence[int], distances: Sequence[float], step: int | None = None) -> float:
    """lambda at ``step`` (the last logged step by default); NaN if that step was not logged."""
    lam = lyapunov_exponents(steps, distances)
    if step is None:
        return float(lam[-1])
    hit = np.flatnonzero(np.asarray(steps) == step)
    return float(lam[hit[0]]) if len(hit) else np.nan


def twin_decorrelation(twin_gaps: Sequence[float], seed_values: Sequence[float]) -> float:
    """How far the twins' final losses are apart, relative to two different seeds: 0 identical, 1 unrelated.

    Two independent draws from a normal distribution with sd s differ by 2 s / sqrt(pi) on average, so
    mean |gap| / (2 s / sqrt(pi)) is 1 when a float-rounding-sized change gives seed-sized differences.
    ``twin_gaps``: |loss - twin loss| per seed; ``seed_values``: the same loss over the variant's seeds.
    NaN with fewer than 2 seeds, no twin or no spread.
    """
    gaps = np.abs(np.asarray(twin_gaps, dtype=float))
    gaps = gaps[np.isfinite(gaps)]
    v = np.asarray(seed_values, dtype=float)
    v = v[np.isfinite(v)]
    if len(gaps) == 0 or len(v) < 2 or v.std(ddof=1) == 0:
        return np.nan
    return float(gaps.mean() / (2 * v.std(ddof=1) / math.sqrt(math.pi)))


def chaos_verdict(twin_gaps: Sequence[float] = (), seed_values: Sequence[float] = (),
                  steps: Sequence[int] | None = None, distances: Sequence[float] | None = None,
                  perturbation: float | None = None, threshold: float = CHAOS_DECORRELATION) -> dict:
    """Is a variant chaotic, measured rather than declared? Returns decorrelation, lyapunov_end, growth,
    chaotic (True, False or None when neither measure is available) and basis (which rule decided).

    The rule answers the question the twins exist for: does a float-rounding-sized change already give
    seed-sized differences? With 2 or more seeds and twins, the variant is chaotic when the twins'
    final-loss decorrelation (:func:`twin_decorrelation`) is at least ``threshold`` = 0.5, i.e. the twins
    end at least half as far apart as two different seeds typically do: at that point a run's final loss
    is set as much by rounding as by its seed. With one seed there is no seed spread, and the parameter
    trace decides: chaotic when the distance grew by at least ``CHAOS_SEPARATION / perturbation``. A
    relative change of W1 by ``perturbation`` starts the twins ``perturbation * ||W1||`` apart, so this is a
    separation of a tenth of the perturbed weights themselves: the twins no longer share their initial W1
    in any useful sense. Measured on the lecture notes' three runs (config/seed-notes.yaml, 200,000
    steps, perturbation 1e-7): the badly initialised original's distance grew 4.7e6-fold (0.47 /
    perturbation), the fixed ones' 161- and 327-fold (3e-5 / perturbation), so the threshold sits orders of
    magnitude from both.
    """
    out = {"decorrelation": twin_decorrelation(twin_gaps, seed_values), "lyapunov_end": np.nan,
           "growth": np.nan, "chaotic": None, "basis": "no twins"}
    if steps is not None and distances is not None and len(steps) > 1:
        out["lyapunov_end"] = lyapunov_at(steps, distances)
        out["growth"] = float(distances[-1]) / float(distances[0])
    if not math.isnan(out["decorrelation"]):
        out["chaotic"] = bool(out["decorrelation"] >= threshold)
        out["basis"] = f"twins' final-loss gap vs seed spread (decorrelation >= {threshold:g})"
    elif perturbation and not math.isnan(out["growth"]):
        out["chaotic"] = bool(out["growth"] >= CHAOS_SEPARATION / perturbation)
        out["basis"] = f"twins' parameter distance grew by >= {CHAOS_SEPARATION:g}/{perturbation:g}"
    return out
