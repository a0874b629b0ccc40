"""`actgrad export-tensorboard`: a small results tree written as events and read back with TensorBoard's reader."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest

from actgrad import cli
from actgrad.tools.tensorboard import ExportError, export, histogram_from_bins

if os.environ.get("CI"):  # the test extra installs tensorboard: under CI its absence is a failure
    import tensorboard  # noqa: F401
else:
    pytest.importorskip("tensorboard", reason='needs the tensorboard extra: pip install -e ".[tensorboard]"')

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

LAYERS = ["tanh1", "tanh2"]


def _fake_run(folder, seed: int, steps: int = 30, twin: bool = False) -> dict[str, pd.DataFrame]:
    """The three run files with runs.py's columns and values that differ per step, layer and seed."""
    rng = np.random.default_rng(seed)
    stats = pd.DataFrame([(step, layer, kind, stat, float(rng.normal()))
                          for step in (0, 10, 20) for layer in LAYERS
                          for kind, stat in (("activation", "std"), ("activation", "saturated"), ("update", "ratio"))],
                         columns=["step", "layer", "kind", "stat", "value"])
    edges = np.linspace(-1, 1, 9)
    hist_rows = []
    for step in (0, 20):
        for layer in LAYERS:
            counts = rng.integers(0, 10, size=8).astype(float)
            counts[0] = 0  # an empty first bin: the histogram's min is the next bin's left edge
            for left, right, frac in zip(edges[:-1], edges[1:], counts / counts.sum()):
                hist_rows.append((step, layer, "activation", left, right, frac))
    hists = pd.DataFrame(hist_rows, columns=["step", "layer", "kind", "bin_left", "bin_right", "fraction"])
    losses = pd.DataFrame({"step": np.arange(steps, dtype=np.int32),
                           "loss": rng.uniform(2, 3, size=steps).astype(np.float32)})
    if twin:
        losses["twin_loss"] = (losses.loss + 0.01).astype(np.float32)
    folder.mkdir(parents=True)
    frames = {"stats.parquet": stats, "histograms.parquet": hists, "losses.parquet": losses}
    for name, frame in frames.items():
        frame.to_parquet(folder / name, index=False)
    return frames


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    written = {("fix_tanh", 1): _fake_run(root / "runs" / "fix_tanh" / "seed1", 1),
               ("fix_tanh", 2): _fake_run(root / "runs" / "fix_tanh" / "seed2", 2),
               ("deep_bn", 1): _fake_run(root / "runs" / "deep_bn" / "seed1", 3, twin=True)}
    (root / "runs" / "deep_bn" / "seed1" / "metrics.json").write_text("{}")  # other run files are ignored
    return root, written


def _read(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_every_run_round_trips_through_event_files(results, tmp_path, capsys):
    root, written = results
    logdir = tmp_path / "tb"
    assert cli.main(["export-tensorboard", str(root), str(logdir), "--loss-every", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 runs written" in out and f"tensorboard --logdir {logdir}" in out
    assert sorted(p.relative_to(logdir).as_posix() for p in logdir.glob("*/*")) == [
        "deep_bn/seed1", "fix_tanh/seed1", "fix_tanh/seed2"]

    for (variant, seed), frames in written.items():
        acc = _read(logdir / variant / f"seed{seed}")
        tags = acc.Tags()
        stats = frames["stats.parquet"]
        expected = {f"{r.kind}/{r.layer}/{r.stat}" for r in stats.itertuples()}
        twin = {"loss/twin"} if variant == "deep_bn" else set()
        assert set(tags["scalars"]) == expected | {"loss/minibatch"} | twin
        for r in stats.itertuples():
            events = {e.step: e.value for e in acc.Scalars(f"{r.kind}/{r.layer}/{r.stat}")}
            assert events[r.step] == pytest.approx(r.value, rel=1e-6, abs=1e-7)  # float32 in the event

        losses = frames["losses.parquet"]
        kept = losses[losses.step % 4 == 0]
        loss_events = acc.Scalars("loss/minibatch")
        assert [e.step for e in loss_events] == kept.step.tolist()
        assert np.allclose([e.value for e in loss_events], kept.loss, rtol=1e-6)
        if variant == "deep_bn":
            assert np.allclose([e.value for e in acc.Scalars("loss/twin")], kept.twin_loss, rtol=1e-6)

        hists = frames["histograms.parquet"]
        assert set(tags["histograms"]) == {f"activation/{layer}" for layer in LAYERS}
        for layer in LAYERS:
            events = acc.Histograms(f"activation/{layer}")
            assert [e.step for e in events] == [0, 20]
            for event in events:
                bins = hists[(hists.step == event.step) & (hists.layer == layer)]
                h = event.histogram_value
                assert h.bucket == pytest.approx([0.0, *bins.fraction])
                assert h.bucket_limit == pytest.approx([-1.0, *bins.bin_right])
                assert h.num == pytest.approx(1.0)
                assert h.min == pytest.approx(-0.75) and h.max <= 1.0  # the first bin is empty


def test_export_again_replaces_the_runs_instead_of_adding_events(results, tmp_path):
    root, _ = results
    logdir = tmp_path / "tb"
    export(root, logdir)
    export(root, logdir, loss_every=1)
    run_dir = logdir / "fix_tanh" / "seed1"
    assert len(list(run_dir.iterdir())) == 1
    assert len(_read(run_dir).Scalars("loss/minibatch")) == 30
    assert sorted(p.name for p in (logdir / "fix_tanh").iterdir()) == ["seed1", "seed2"]  # no scratch left


def test_histogram_arguments_from_bins():
    bins = pd.DataFrame({"bin_left": [0.5, 0.0], "bin_right": [1.0, 0.5], "fraction": [0.25, 0.75]})
    h = histogram_from_bins(bins)  # rows in any order
    assert h["bucket_limits"] == [0.0, 0.5, 1.0] and h["bucket_counts"] == [0.0, 0.75, 0.25]
    assert (h["min"], h["max"], h["num"]) == (0.0, 1.0, 1.0)
    assert h["sum"] == pytest.approx(0.75 * 0.25 + 0.25 * 0.75)
    assert h["sum_squares"] == pytest.approx(0.75 * 0.25**2 + 0.25 * 0.75**2)


def test_a_run_file_without_a_column_is_named_and_nothing_is_written(results, tmp_path, capsys):
    root, written = results
    bad = root / "runs" / "fix_tanh" / "seed2" / "histograms.parquet"
    written["fix_tanh", 2]["histograms.parquet"].drop(columns="fraction").to_parquet(bad, index=False)
    logdir = tmp_path / "tb"
    assert cli.main(["export-tensorboard", str(root), str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "fraction" in err
    assert not logdir.exists()


def test_missing_results_and_a_foreign_folder_are_refused(results, tmp_path):
    root, _ = results
    with pytest.raises(ExportError, match="no such folder"):
        export(tmp_path / "nowhere", tmp_path / "tb")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(ExportError, match="no runs found"):
        export(tmp_path / "empty", tmp_path / "tb")
    mine = tmp_path / "tb" / "fix_tanh" / "seed1"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("not an export")
    with pytest.raises(ExportError, match="other files than TensorBoard events"):
        export(root, tmp_path / "tb")
    assert (mine / "notes.txt").exists()


def test_without_tensorboard_the_command_says_how_to_install_it(results, tmp_path, monkeypatch, capsys):
    root, _ = results
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    assert cli.main(["export-tensorboard", str(root), str(tmp_path / "tb")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[tensorboard]"' in err
    assert not (tmp_path / "tb").exists()
