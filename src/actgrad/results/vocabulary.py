"""The results' vocabulary: what the summary's tables are called, which quantities and metrics they hold (with the
label and the format every reader shows them in), and the rules and thresholds behind them.

The summary writes with these names; the figures, the report and the command line read with them. Nothing here
imports torch, matplotlib or scipy: every step can read it for free.
"""

from __future__ import annotations

# The summary's tables: name -> file under results/.
TABLES = {
    "summary": "summary.csv", "variants": "variants.csv", "significance": "significance.csv",
    "references": "reference_check.csv", "deep_layers": "deep_layers.csv", "deep_variants": "deep_variants.csv",
    "samples": "samples.csv", "stats": "stats.parquet", "histograms": "histograms.parquet", "chaos": "chaos.csv",
    "twin_traces": "twin_traces.csv", "theory": "theory.csv", "sweeps": "sweeps.csv",
    "theory_curves": "theory_curves.csv", "jacobian": "jacobian.csv", "normalisation": "normalisation.csv",
    "normalisation_tests": "normalisation_tests.csv", "diagnosis": "diagnosis.csv", "fixes": "fixes.csv",
    "trainability": "trainability.csv", "trainability_curve": "trainability_curve.csv",
}

# The lecture's thresholds for a tanh unit: "saturated" in its statistics printouts (|t| > 0.97), and dead in its
# saturation map (|t| > 0.99 for every example of the batch).
SATURATION = 0.97
DEAD = 0.99

# The lecture's seed: the run the per-variant figures show and the reference check reads.
LECTURE_SEED = 2147483647


def averaging_window(steps: int) -> int:
    """How many steps a loss is averaged over: the lecture's 1,000 (its ``view(-1, 1000).mean(1)``), or steps/20 in a
    short run. The loss curves are drawn in these windows, and a run's final loss against its twin's is the last
    window's mean: one minibatch's loss differs between two seeds by the batch drawn as much as by the parameters,
    while a twin draws the same batches as its run."""
    return 1000 if steps >= 20_000 else max(1, steps // 20)


# The rows of a run's stats.parquet that trace its sensitivity twin: the parameters' distance to the twin's.
TWIN_DISTANCE = {"kind": "twin", "layer": "parameters", "stat": "distance"}

# What results/theory.csv compares per layer at step 0: quantity -> (kind, stat) in the statistics' own names, the
# report's heading and format. actgrad.results.theory.predict_network writes its predictions in the same names.
THEORY_QUANTITIES = {
    "activation_std": (("activation", "std"), "activation std", ".3f"),
    "saturated_pct": (("activation", "saturated_pct"), "saturated %", ".1f"),
    "preactivation_std": (("preactivation", "std"), "pre-activation std", ".3f"),
    "grad_std": (("activation_grad", "std"), "gradient std", ".2e"),
    "grad_std_rel_last": (("activation_grad", "std_rel_last"), "gradient std / last layer's", ".3f"),
}
# The ones the deep-layers figure draws beside its measured curves.
LAYER_QUANTITIES = ("activation_std", "saturated_pct", "grad_std")

# What results/sweeps.csv holds per sweep point (the phase diagrams' panels and the sweep tables' columns):
# metric -> the report's heading, its format, the figure's panel title, whether that panel is log-scaled, and the
# column of theory.phase_curves that predicts it (None: no prediction).
SWEEP_METRICS = {
    "last_activation_std": ("last layer<br>activation std", ".3f", "last layer: activation std at init", False,
                            "last_activation_std"),
    "last_saturated_pct": ("last layer<br>saturated %", ".1f", "last layer: saturated % (|h|>0.97) at init", False,
                           "last_saturation_pct"),
    "grad_ratio_first_last": ("gradient std<br>first / last", ".3f", "gradient std, first / last layer, at init", True,
                              "grad_ratio_first_last"),
    "val_loss": ("final val loss", ".4f", "final validation loss", False, None),
    "twin_final_abs_delta": ("|loss − twin|<br>at the end", ".1e", "sensitivity twins: final |loss − twin loss|", True,
                             None),
}

# A deep net's gradient at the first tanh layer against the last one's, at step 0: outside these it vanishes or
# explodes through the stack.
VANISHING_BELOW, EXPLODING_ABOVE = 0.5, 2.0

# How deep can it go (results/trainability.py): a run trains within its budget when its final validation loss ends at
# least this many nats below the input-blind baseline (every character predicted by its training-split frequency).
TRAINS_MARGIN = 0.1
