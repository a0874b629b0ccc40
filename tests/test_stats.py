"""Statistics collected through hooks equal what the lecture computes from its layers."""

import pandas as pd
import pytest
import torch
from conftest import LECTURE_SEED, REPO

from actgrad.study import load, settings
from actgrad.training import lecture
from actgrad.training import loop as reference
from actgrad.training.stats import NetworkHooks, StatsPlan, StatsRecorder

DEFAULT = load.load(REPO / "config" / "config.yaml")


def test_plan_steps():
    plan = StatsPlan(every=1000, update_every=100, histogram_every=5000, snapshot_steps=(0, 1000), bins=50,
                     last_step=1999)
    assert plan.series(0) and plan.series(1000) and plan.series(1999) and not plan.series(1500)
    assert plan.update(1500) and not plan.update(1550)
    assert plan.histogram(0) and not plan.histogram(1000 + 1) and plan.snapshot(1999)


def test_recorder_figures_on_a_known_tensor():
    rec = StatsRecorder(StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=(0,), bins=4))
    out = torch.tensor([[0.0, 0.995, -0.98], [0.5, 0.999, 0.1]])
    rec.activation(0, "tanh1", out)
    df = rec.stats_frame().set_index("stat").value
    assert df["saturated_pct"] == pytest.approx(100 * 3 / 6)
    assert df["saturated99_pct"] == pytest.approx(100 * 2 / 6)
    assert df["dead_units"] == 1  # only the second unit is above 0.99 for every example
    hist = rec.histogram_frame()
    assert hist.fraction.sum() == pytest.approx(1.0) and hist.bin_left.min() == -1.0
    assert rec.saturation_maps["tanh1"].tolist() == [[False, True, False], [False, True, False]]


def test_deep_batchnorm_statistics_at_step_1000_are_the_lectures(splits):
    """The lecture's run (BatchNorm, gain 1) stops after step 1,000 and prints each tanh layer's figures."""
    Xtr, Ytr = splits["splits"]["train"]
    ref_losses, _, layers = lecture.deep_loop(Xtr, Ytr, steps=1001, batchnorm=True, gain=1.0)
    spec = settings.variant_spec(DEFAULT, "deep_bn_gain1")
    net, g = reference.init_network(spec, LECTURE_SEED, 3)
    rec = StatsRecorder(StatsPlan(every=1000, update_every=1000, histogram_every=1000, snapshot_steps=(0, 1000),
                                  bins=50, last_step=1000))
    hooks = NetworkHooks(net, rec)
    res = reference.train_reference(net, g, Xtr, Ytr, steps=1001, batch_size=32, lr_schedule=spec["lr_schedule"],
                                callbacks=[hooks])
    assert torch.equal(res.losses, torch.tensor(ref_losses))
    stats = rec.stats_frame()
    at = stats[stats.step == 1000].set_index(["layer", "kind", "stat"]).value
    tanhs = [layer for layer in layers if isinstance(layer, lecture.Tanh)]
    for i, layer in enumerate(tanhs, start=1):
        t = layer.out
        assert at[(f"tanh{i}", "activation", "mean")] == pytest.approx(t.mean().item(), abs=1e-7)
        assert at[(f"tanh{i}", "activation", "std")] == pytest.approx(t.std().item(), rel=1e-6)
        sat = (t.abs() > 0.97).float().mean().item() * 100
        assert at[(f"tanh{i}", "activation", "saturated_pct")] == pytest.approx(sat, abs=1e-5)
        assert at[(f"tanh{i}", "activation_grad", "std")] == pytest.approx(t.grad.std().item(), rel=1e-6)
    weights = [layer.weight for layer in layers if isinstance(layer, lecture.Linear)]
    for i, w in enumerate(weights, start=1):
        ratio = (w.grad.std() / w.data.std()).item()
        # The lecture's weights are already updated at this point; ours were recorded before the update.
        assert at[(f"layers.linear{i}.weight", "weight_grad", "grad_data_ratio")] == pytest.approx(ratio, rel=1e-3)


def test_a_runs_plan_is_the_configs_and_its_defaults_are_the_schemas():
    """One place for the defaults: a config that says nothing about statistics gets the schema's, and
    StatsPlan itself has none to disagree with them."""
    import dataclasses

    from actgrad.training.job import snapshot_step, stats_plan

    schema_stats = {k: v["default"] for k, v in settings.load_schema()["properties"]["stats"]["properties"].items()}
    assert settings.study_defaults()["stats"] == schema_stats
    assert [f.name for f in dataclasses.fields(StatsPlan) if f.default is dataclasses.MISSING] == [
        "every", "update_every", "histogram_every", "snapshot_steps", "bins"]
    plan = stats_plan(DEFAULT["stats"], 300)
    assert (plan.every, plan.update_every, plan.histogram_every, plan.bins) == (1000, 100, 5000, 50)
    assert plan.snapshot_steps == (0,) and plan.last_step == 299  # step 1,000 is past the end
    assert snapshot_step(plan, steps_done=300) == 299
    plan = stats_plan(DEFAULT["stats"], 200_000)
    assert snapshot_step(plan, steps_done=200_000) == 1000
    assert snapshot_step(plan, steps_done=500) is None  # diverged before any snapshot but step 0


def _histogram_rows(rec: StatsRecorder) -> list[tuple]:
    """The histogram table written out bin by bin, in Python floats: what histogram_frame must equal."""
    rows = []
    for step, layer, kind, counts, lo, hi in rec._hists:
        counts = counts.float()
        width = (hi - lo) / counts.numel()
        total = counts.sum().item() or 1.0
        for i, fraction in enumerate((counts / total).tolist()):
            rows.append((step, layer, kind, lo + i * width, lo + (i + 1) * width, fraction))
    return rows


def test_the_histogram_table_holds_every_bin_of_every_histogram_exactly():
    rec = StatsRecorder(StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=(0,), bins=7))
    g = torch.Generator().manual_seed(0)
    for step in (0, 1, 300):
        rec.activation(step, "tanh1", torch.rand(50, 9, generator=g) * 2 - 1)  # fixed range (-1, 1)
        rec.preactivation(step, "tanh1", torch.randn(50, 9, generator=g) * 3)  # its own range at snapshots
    rec.activation_grad(0, "tanh1", torch.full((4, 3), float("nan")))  # nothing finite: an empty histogram
    frame = rec.histogram_frame()
    expected = pd.DataFrame.from_records(_histogram_rows(rec), columns=["step", "layer", "kind", "bin_left",
                                                                         "bin_right", "fraction"])
    pd.testing.assert_frame_equal(frame, expected, check_exact=True)
    # three activation histograms, the snapshot's pre-activation and gradient
    assert len(frame) == 7 * 5 and frame[frame.kind == "activation_grad"].fraction.eq(0).all()
    empty = StatsRecorder(StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=(), bins=7))
    assert empty.histogram_frame().empty and list(empty.histogram_frame().columns) == list(frame.columns)
