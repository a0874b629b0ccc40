"""What the report contains: which figures there are (each with its caption), which variants are shown in
full, and each sweep's figure.

It lives apart from :mod:`actgrad.report.figures` so that the report can use it without importing
matplotlib and seaborn, which it never draws with (a second of CPU time).
"""

from __future__ import annotations

import math

# Every figure the pipeline draws, by file name, with its title in the report; each has a caption
# workflow/report/<name>.rst. The rules, the figures and the report all read these two tables.
GLOBAL_FIGURES = {
    "loss_curves": "Loss curves",
    "final_losses": "Final validation loss",
    "deep_layers": "Deep networks, layer by layer",
    "sensitivity": "Sensitivity to a 1e-7 nudge",
    "lyapunov": "Chaos as a rate: the Lyapunov estimate",
    "trainability": "How deep can it go: trainability over depth × gain",
}
VARIANT_FIGURES = {
    "init": "At initialisation",
    "activations": "Activation distribution",
    "activation_grads": "Gradient distribution",
    "weight_grads": "Weight-gradient distribution",
    "updates": "Update:data ratio",
    "heatmap": "Activations over training",
}


def asks_about_coupling(config: dict) -> bool:
    """Whether the study asks what BatchNorm's coupling of examples costs (the report's section of that name):
    deep BatchNorm variants at two batch sizes or more, or beside LayerNorm ones at the same batch size. A study
    that only switches BatchNorm on and off at one batch size (the signal-propagation study) does not."""
    from actgrad.study.settings import variant_spec

    cells = {(spec["norm"], spec["batch_size"]) for spec in (variant_spec(config, name) for name in config["variants"])
             if spec["model"] == "deep"}
    batchnorm = {b for norm, b in cells if norm == "batchnorm"}
    return len(batchnorm) > 1 or any(("layernorm", b) in cells for b in batchnorm)


def study_figures(specs, config: dict | None = None) -> list[str]:
    """The cross-variant figures a study has, from its variants' complete settings: the deep comparison
    only with a deep variant, the sensitivity and Lyapunov figures only when some run has a twin, the
    trainability figure only where a sweep asks the question (:func:`trainability_sweeps` of ``config``)."""
    specs = list(specs)
    return [name for name in GLOBAL_FIGURES
            if (name != "deep_layers" or any(s["model"] == "deep" for s in specs))
            and (name not in ("sensitivity", "lyapunov") or any(s["sensitivity_twin"] for s in specs))
            and (name != "trainability" or (config is not None and bool(trainability_sweeps(config))))]


def trainability_sweeps(config: dict) -> list[str]:
    """The sweeps that ask "how deep can it go" (actgrad.results.trainability): deep-net sweeps whose points vary
    both the depth and the gain."""
    from actgrad.study.settings import variant_spec

    out = []
    for sweep in sweep_names(config):
        specs = [variant_spec(config, n) for n, v in config["variants"].items()
                 if v.get("sweep", {}).get("name") == sweep]
        if (all(s["model"] == "deep" for s in specs) and len({s["n_layers"] for s in specs}) > 1
                and len({float(s["gain"]) for s in specs}) > 1):
            out.append(sweep)
    return out


def figure_path(figures_dir, name: str, variant: str | None = None) -> str:
    """Where a figure's PNG is: ``figures_dir/name.png``, or ``figures_dir/variant/name.png``."""
    return f"{figures_dir}/{variant}/{name}.png" if variant else f"{figures_dir}/{name}.png"


# -- sweeps ---------------------------------------------------------------------------------------
# Each sweep gets one phase-diagram figure, drawn with the deep networks' theory overlay by the
# theory figure step; every sweep figure shares the caption workflow/report/sweep.rst.
SWEEP_CAPTION = "sweep"
THEORY_CAPTION = "theory"  # the caption of the report's table "predicted vs measured at initialisation"
# A sweep point with one of the lecture's gains gets the full per-variant section (and its figures);
# the others are a row of their sweep's table.
LECTURE_GAINS = (0.5, 1.0, 5 / 3, 3.0)
LECTURE_DEPTH = 5  # the lecture's deep net: hidden blocks


def sweep_figure(sweep: str) -> str:
    """The file name (without .png) of a sweep's phase diagram."""
    return f"sweep_{sweep}"


def sweep_title(sweep: str) -> str:
    return f"Sweep {sweep}: phase diagram"


def _chosen_points(names: list[str], points: dict[str, dict]) -> list[str]:
    """The points of one sweep shown in full: those at a lecture gain when the sweep varies the gain (at the
    lecture's depth when it varies the depth too and has that depth), else those at the first, middle and last
    value of its first swept key."""
    first_key = next(iter(points[names[0]]))
    if "gain" in points[names[0]]:
        chosen = [n for n in names if any(math.isclose(float(points[n]["gain"]), g, rel_tol=1e-3)
                                          for g in LECTURE_GAINS)]
        # A sweep over depth too (the trainability study) shows its lecture gains at the lecture's depth only: the
        # section "How deep can it go" shows every depth, and a figure set per depth is minutes and megabytes.
        at_depth = [n for n in chosen if points[n].get("n_layers") == LECTURE_DEPTH]
        if at_depth:
            return at_depth
        if chosen:
            return chosen
        first_key = "gain"
    values = []
    for n in names:
        if points[n][first_key] not in values:
            values.append(points[n][first_key])
    picked = [values[i] for i in sorted({0, len(values) // 2, len(values) - 1})]
    return [n for n in names if points[n][first_key] in picked]


def featured_variants(config: dict) -> list[str]:
    """The variants the report shows in full, with per-variant figures, in config order: every listed
    variant and a few chosen points of each sweep (:data:`LECTURE_GAINS`)."""
    variants = config["variants"]
    by_sweep: dict[str, list[str]] = {}
    for name, v in variants.items():
        if "sweep" in v:
            by_sweep.setdefault(v["sweep"]["name"], []).append(name)
    chosen = set()
    for names in by_sweep.values():
        chosen.update(_chosen_points(names, {n: variants[n]["sweep"]["point"] for n in names}))
    return [name for name, v in variants.items() if "sweep" not in v or name in chosen]


def sweep_names(config: dict) -> list[str]:
    """The study's sweeps that generated at least one variant, in config order."""
    return list(dict.fromkeys(v["sweep"]["name"] for v in config["variants"].values() if "sweep" in v))
