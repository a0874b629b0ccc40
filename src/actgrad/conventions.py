"""What the figures, the report and the runs agree on: which figures there are, which snapshot they show,
the order of the layers, the loss a network should start at.

It lives apart from :mod:`actgrad.figures` so that the report can use it without importing
matplotlib and seaborn, which it never draws with (a second of CPU time).
"""

from __future__ import annotations

import math
import re

LECTURE_SNAPSHOT = 1000  # the step the lecture's diagnostic plots show
EXPECTED_INIT_LOSS = -math.log(1 / 27)

VARIANT_FIGURES = ("init", "activations", "activation_grads", "weight_grads", "updates", "heatmap")
GLOBAL_FIGURES = ("loss_curves", "final_losses", "deep_layers", "sensitivity")


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def pick_snapshot(steps, last_step=None, target: int = LECTURE_SNAPSHOT):
    """The lecture's step 1,000 if recorded, else the configured snapshot nearest to it, else the last."""
    steps = sorted({int(s) for s in steps if int(s) > 0})
    if not steps:
        return None
    if target in steps:
        return target
    middle = [s for s in steps if s != last_step] or steps
    return min(middle, key=lambda s: abs(s - target))
