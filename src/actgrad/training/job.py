"""One training job: every seed of one variant, trained, evaluated and written to disk.

What a run writes, and where, is :mod:`actgrad.rundir`'s. Every file is written to a temporary
name and renamed into place, ``metrics.json`` last, so a killed job never leaves a file that
looks finished.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch

from actgrad import __version__
from actgrad.data import EXPECTED_INIT_LOSS, atomic_write_bytes, load_splits
from actgrad.results.vocabulary import TWIN_DISTANCE
from actgrad.rundir import METRICS, parquet_bytes, pick_snapshot, run_dir
from actgrad.study.jobs import batch_key
from actgrad.study.settings import variant_spec
from actgrad.training.cpus import cpu_slot
from actgrad.training.divergence import DivergenceRule
from actgrad.training.evaluation import batch_statistics_loss, evaluate, kept_running_stats, sample_names
from actgrad.training.loop import init_network, resolve_device, train_reference_runs
from actgrad.training.memory import check_job, job_label
from actgrad.training.model import Scratch, jacobian_spectrum
from actgrad.training.progress import ProgressLog
from actgrad.training.stats import StatsPlan, StatsRecorder, activation_shares

# At most one progress line this often (and every run's last step): progress_every: 1 is not a line per step.
PROGRESS_MIN_SECONDS = 1.0
# The sensitivity twins' parameter distance, as rows of the base run's stats.parquet.
# The input-output Jacobian at init is measured on the first examples of the training split: one lecture batch.
JACOBIAN_EXAMPLES = 32
# model.jacobian_spectrum's numbers a run records, as metrics jacobian_sv_<name>.
JACOBIAN_STATS = ("mean", "std", "min", "max", "mean_sq", "std_sq")


def stats_plan(stats: dict, steps: int) -> StatsPlan:
    """The plan of a run of ``steps`` steps from the config's (resolved) ``stats`` section."""
    return StatsPlan(every=stats["every"], update_every=stats["update_every"],
                     histogram_every=stats["histogram_every"],
                     snapshot_steps=tuple(x for x in stats["snapshot_steps"] if x < steps),
                     bins=stats["bins"], last_step=steps - 1)


def snapshot_step(plan: StatsPlan, steps_done: int) -> int | None:
    """The step the figures and the report show beside step 0: among the snapshots this run reached."""
    reached = [s for s in (*plan.snapshot_steps, plan.last_step) if 0 <= s < steps_done]
    return pick_snapshot(reached, last_step=plan.last_step)


def _init_measurements(net, spec: dict, Xtr, Ytr, scratch: Scratch) -> dict:
    """Before the first step: the loss over the training split, the shares of activation values that fit the
    activation (``<share>_init``) and the input-output Jacobian's singular values on one batch
    (``jacobian_sv_<stat>``)."""
    shares = activation_shares(spec["activation"])
    # At init the running statistics are still 0 and 1, so a BatchNorm net is evaluated
    # with the training split's own statistics.
    with kept_running_stats(net):
        init_loss, found = evaluate(net, Xtr, Ytr, calibrate=bool(net.batchnorm_layers()), shares=shares,
                                    scratch=scratch)
    spectrum = jacobian_spectrum(net, Xtr[:JACOBIAN_EXAMPLES])
    return {"init_loss": init_loss, **{f"{share}_init": found[share] for share in shares},
            **{f"jacobian_sv_{stat}": spectrum[stat] for stat in JACOBIAN_STATS}}


def _final_evaluation(net, spec: dict, splits, device, scratch: Scratch | None = None) -> dict:
    """Train/val/test losses with the running statistics, and for BatchNorm nets also with
    statistics calibrated over the whole training split (the lecture's two evaluations) and the
    validation loss with each minibatch's own statistics (``val_loss_batch_stats``: what the
    coupling of examples does at the run's batch size). LayerNorm has no running statistics:
    its evaluation is the same function either way, so it gets no second number."""
    data = {key: (splits[f"X{split}"].to(device), splits[f"Y{split}"].to(device))
            for split, key in (("train", "train"), ("dev", "val"), ("test", "test"))}
    scratch = scratch if scratch is not None else Scratch()
    out = {}
    shares = activation_shares(spec["activation"])
    out["train_loss"], found = evaluate(net, *data["train"], shares=shares, scratch=scratch)
    out["val_loss"], _ = evaluate(net, *data["val"], scratch=scratch)
    out["test_loss"], _ = evaluate(net, *data["test"], scratch=scratch)
    if net.batchnorm_layers():
        with kept_running_stats(net):
            out["train_loss_calibrated"], _ = evaluate(net, *data["train"], calibrate=True, scratch=scratch)
            out["val_loss_calibrated"], _ = evaluate(net, *data["val"], scratch=scratch)
            out["test_loss_calibrated"], _ = evaluate(net, *data["test"], scratch=scratch)
        out["val_loss_batch_stats"] = batch_statistics_loss(net, *data["val"], batch_size=spec["batch_size"])
    out.update({f"{share}_final": found[share] for share in shares})
    return out


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def train_variants(config: dict, names: list[str], splits_path: str | os.PathLike, results: str | os.PathLike,
                   log=print, mem_mb: float | None = None) -> list[dict]:
    """Train every seed (and twin) of the variants ``names``, write each run and return their metrics: the variants
    with the same :func:`batch_key` in one engine call, the groups one after another (in the order of their first
    variant).

    Before any work the job checks that each minibatch fits the training split and that the job fits in ``mem_mb``
    (the memory it was granted; ``resources.train_mem_mb`` by default). On CPU it then claims a CPU of its own
    (:func:`~actgrad.training.cpus.cpu_slot`), so that training jobs never time-share one.

    Each model draws its own parameters and minibatches from its own generator, and the engine computes each
    model on its own, so a run's numbers do not depend on which variants share its job.
    """
    specs = [variant_spec(config, name) for name in names]
    groups: dict[str, list[dict]] = {}
    for spec in specs:
        groups.setdefault(batch_key(spec), []).append(spec)
    splits = load_splits(splits_path)
    n_train = int(splits["Ytrain"].shape[0])
    n_examples = n_train + int(splits["Ydev"].shape[0]) + int(splits["Ytest"].shape[0])
    # The workflow made these checks when it planned (before Snakemake deleted anything); the job makes them
    # again with the splits it has and the memory it was granted (a retried cluster job's is larger).
    estimates = check_job(config, names, n_train, int(splits["block_size"]), n_examples, mem_mb=mem_mb)
    for label, estimate in estimates.items():
        log(f"[{label}] memory: about {estimate['total']:,.0f} MB estimated")
    labelled = {_label([s["name"] for s in group]): group for group in groups.values()}
    device = resolve_device(config["device"])
    threads = int(config["threads"])
    slot = cpu_slot(threads, log=lambda m: log(f"[{_label(names)}] {m}")) if device.type == "cpu" else nullcontext()
    with slot:
        return [metrics for label, group in labelled.items()
                for metrics in _train_variants(config, group, label, splits, results, device, threads, log)]


_label = job_label


def _train_variants(config, specs, label, splits, results, device, threads, log) -> list[dict]:
    engine = config["engine"]
    torch.set_num_threads(threads)
    block_size = int(splits["block_size"])
    Xtr, Ytr = splits["Xtrain"], splits["Ytrain"]
    steps, batch_size, lr_schedule = specs[0]["max_steps"], specs[0]["batch_size"], specs[0]["lr_schedule"]
    plan = stats_plan(config["stats"], steps)

    # Every variant's seeds, then every variant's twins: for one variant, the order it always had.
    members = [(spec, seed, 0.0) for spec in specs for seed in spec["seeds"]]
    members += [(spec, seed, spec["w1_perturbation"]) for spec in specs if spec["sensitivity_twin"]
                for seed in spec["seeds"]]
    Xtr_d, Ytr_d = Xtr.to(device), Ytr.to(device)
    scratch = Scratch()  # every evaluation of the job writes the same few whole-split tensors
    nets, gens, recorders, before = [], [], [], []
    for spec, seed, perturbation in members:
        net, g = init_network(spec, seed, block_size, w1_perturbation=perturbation)
        net.to(device)
        nets.append(net)
        gens.append(g)
        recorders.append(None if perturbation else StatsRecorder(plan, activation_range=(
            (-1.0, 1.0) if spec["activation"] == "tanh" else None)))
        if perturbation:
            before.append(None)
            continue
        before.append(_init_measurements(net, spec, Xtr_d, Ytr_d, scratch))

    log(f"[{label}] training {len(members)} run(s) of {steps} steps with the {engine} engine on {device}")
    if engine == "batched" and device.type == "cpu":
        from actgrad.training import kernels

        log(f"[{label}] C kernels: {kernels.status()}")
    divergence = DivergenceRule(loss_multiple=float(config["divergence"]["loss_multiple"]),
                                window=int(config["divergence"]["window"]))
    progress = ProgressLog(log, steps, len(members), every=int(config["progress_every"]), label=label,
                           min_seconds=PROGRESS_MIN_SECONDS)
    index = {(spec["name"], seed, p): i for i, (spec, seed, p) in enumerate(members)}
    base_of_twin = {i: index[(spec["name"], seed, 0.0)] for i, (spec, seed, p) in enumerate(members) if p}
    if engine == "batched":
        from actgrad.training.engine import train_batched as train_runs
    else:
        train_runs = train_reference_runs
    start = time.perf_counter()
    results_list = train_runs(nets, gens, Xtr, Ytr, steps=steps, batch_size=batch_size,
                              lr_schedule=lr_schedule, recorders=recorders, device=device,
                              divergence=divergence, progress=progress, twins=base_of_twin)
    wall = time.perf_counter() - start

    twin_of = {base: i for i, base in base_of_twin.items()}
    all_metrics = []
    for i, (spec, seed, perturbation) in enumerate(members):
        if perturbation:
            continue
        name = spec["name"]
        res, net, rec = results_list[i], nets[i], recorders[i]
        twin = results_list[twin_of[i]] if i in twin_of else None
        metrics = _write_run(config, spec, name, seed, res, twin, net, rec, before[i], splits, device,
                             results, wall / len(members), scratch, plan)
        all_metrics.append(metrics)
        status = metrics["status"] + (f" at step {metrics['diverged_at']}: {metrics['diverged_rule']}"
                                      if metrics["diverged_at"] is not None else "")
        log(f"[{name}] seed {seed}: step0 {metrics['step0_loss']:.4f}  train {metrics['train_loss']:.4f}  "
            f"val {metrics['val_loss']:.4f}  ({status})")
    return all_metrics


def _write_run(config, spec, name, seed, res, twin, net, rec, before, splits, device, results, seconds,
               scratch, plan) -> dict:
    out = run_dir(results, name, seed)
    out.mkdir(parents=True, exist_ok=True)
    diverged = res.diverged_at is not None
    losses = res.losses.numpy()
    step0 = float(losses[0]) if len(losses) else float("nan")
    metrics = {
        "variant": name,
        "seed": seed,
        "model": spec["model"],
        "batchnorm": bool(spec["batchnorm"]),
        "norm": spec.get("norm"),
        "activation": spec.get("activation"),
        "weight_init": spec.get("weight_init"),
        "batch_size": spec["batch_size"],
        "steps": spec["max_steps"],
        "steps_done": res.steps_done,
        "status": "diverged" if diverged else "ok",
        "diverged_at": res.diverged_at,
        "diverged_rule": res.diverged_rule,
        "step0_loss": step0,
        "expected_init_loss": EXPECTED_INIT_LOSS,
        **before,  # init_loss, the activation's shares and the Jacobian's spectrum at init
        "snapshot_step": snapshot_step(plan, res.steps_done),
        "seconds": seconds,
    }
    if diverged:
        nan = float("nan")
        metrics.update(train_loss=nan, val_loss=nan, test_loss=nan,
                       **{f"{share}_final": nan for share in activation_shares(spec["activation"])})
        if net.batchnorm_layers():
            metrics.update(train_loss_calibrated=nan, val_loss_calibrated=nan, test_loss_calibrated=nan,
                           val_loss_batch_stats=nan)
        samples = []
    else:
        metrics.update(_final_evaluation(net, spec, splits, device, scratch))
        samples = sample_names(net, splits["itos"], int(splits["block_size"]), int(config["samples"]), seed)
    twin_losses = None
    if twin is not None:
        # The twin's losses on the run's steps (NaN where it stopped earlier).
        n = min(len(losses), len(twin.losses))
        twin_losses = np.full(len(losses), np.nan, dtype=np.float32)
        twin_losses[:n] = twin.losses.numpy()[:n]
        metrics["twin_w1_perturbation"] = spec["w1_perturbation"]
        metrics["twin_final_abs_delta"] = float(abs(losses[n - 1] - twin_losses[n - 1])) if n else float("nan")
    metrics.update({
        "engine": config["engine"],
        "kernels": res.extra.get("kernels"),  # the batched engine's, on CPU: "C" or "PyTorch"
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "actgrad": __version__,
        "python": platform.python_version(),
    })

    loss_frame = pd.DataFrame({"step": np.arange(len(losses), dtype=np.int32), "loss": losses.astype(np.float32)})
    if twin_losses is not None:
        loss_frame["twin_loss"] = twin_losses
    maps = {layer: m.numpy() for layer, m in rec.saturation_maps.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **maps)
    payloads = {
        "losses.parquet": parquet_bytes(loss_frame),
        "stats.parquet": parquet_bytes(_with_twin_distance(rec.stats_frame(), res.extra.get("param_distance"))),
        "histograms.parquet": parquet_bytes(rec.histogram_frame()),
        "saturation.npz": buf.getvalue(),
        "params.pt": _torch_bytes({k: v.detach().cpu() for k, v in net.state_dict().items()}),
        "samples.txt": ("\n".join(samples) + "\n").encode() if samples else b"",
        "metrics.json": (json.dumps(_jsonable(metrics), indent=2) + "\n").encode(),
    }
    for filename in sorted(payloads, key=lambda f: f == METRICS):  # metrics.json last: it marks the run complete
        atomic_write_bytes(out / filename, payloads[filename])
    return metrics


def _with_twin_distance(stats: pd.DataFrame, trace) -> pd.DataFrame:
    """The statistics, and the twin's parameter distance at its steps (``(steps, distances)``) if it has one."""
    if trace is None:
        return stats
    steps, distances = trace
    rows = pd.DataFrame({"step": np.asarray(steps).astype(stats["step"].dtype), **TWIN_DISTANCE,
                         "value": np.asarray(distances).astype(stats["value"].dtype)})
    return pd.concat([stats, rows[stats.columns]], ignore_index=True)


def _jsonable(d: dict) -> dict:
    """NaN is not JSON; write it as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
