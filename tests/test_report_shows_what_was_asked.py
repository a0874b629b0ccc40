"""The report shows what the study asked, as it was measured: a section only where its question is asked, the
reference check at the precision that shows the difference, no error bar below a log axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import REPO

from actgrad.results.significance import reference_in_spread
from actgrad.study.load import load


def test_the_coupling_section_is_only_where_a_study_asks_its_question():
    from actgrad.report.contents import asks_about_coupling

    asked = {name: asks_about_coupling(load(REPO / "config" / f"{name}.yaml"))
             for name in ("config", "signal-propagation", "normalisation", "seed-notes")}
    assert asked == {"config": False, "signal-propagation": False, "normalisation": True, "seed-notes": False}


def test_the_reference_check_keeps_the_digits_that_show_the_difference():
    # the lecture's 2.07 against five seeds at 2.0690 +- 0.0008: at the lecture's 2 decimals mean and sd would read
    # "2.07, sd 0.00", which says nothing about the 1.3 sd between them
    values = [2.0680, 2.0685, 2.0690, 2.0695, 2.0700]
    out = reference_in_spread(2.07, values, precision=2)
    assert out["sentence"].startswith("the lecture's 2.07 is 1.3 sd above our mean of 5 seeds (2.0690, sd 0.00079)")


def test_the_twins_panel_draws_no_error_bar_below_its_log_axis():
    from actgrad.report.figures import sweep_phase_figure

    rows = []
    for gain, mean, sd in ((0.5, 1e-6, 5e-6), (1.0, 1e-3, 3e-3), (2.0, 0.05, 0.02)):
        rows.append({"sweep": "s", "variant": f"s__gain{gain}", "gain": gain, "metric": "twin_final_abs_delta",
                     "mean": mean, "sd": sd, "n": 3, "predicted": np.nan})
        rows.append({"sweep": "s", "variant": f"s__gain{gain}", "gain": gain, "metric": "val_loss", "mean": 2.1,
                     "sd": 0.01, "n": 3, "predicted": np.nan})
    fig = sweep_phase_figure(pd.DataFrame(rows), ["gain"])
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("sensitivity twins"))
    assert panel.get_yscale() == "log"
    bottom = panel.get_ylim()[0]
    ends = [y for collection in panel.collections for segment in collection.get_segments() for _, y in segment]
    assert ends and min(ends) >= bottom * (1 - 1e-9), (min(ends), bottom)
