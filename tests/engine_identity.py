"""Bit-identity check for refactors of the batched engine: save what it computes, compare later.

    python tests/engine_identity.py save /tmp/engine_baseline      # with the engine as it is
    python tests/engine_identity.py compare /tmp/engine_baseline   # after the change (--all: every difference)

Every case trains two models side by side (one network kind, batch 32 or 20, C kernels on or
off), first from init and then on from the trained state (non-trivial running statistics and
parameters), and keeps the losses, the final parameters, the BatchNorm running and last-batch
statistics, the generators' states and every recorded statistic and histogram. One more case
has a NaN model that is dropped from its batch (the divergence and select path). ``compare``
checks every saved tensor with ``torch.equal`` and prints how many comparisons it made.
Not a pytest module: it takes a couple of minutes and needs a saved baseline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from actgrad import data
from actgrad.training import loop as reference
from actgrad.training.engine import train_batched
from actgrad.training.stats import StatsPlan, StatsRecorder

SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 150, "lr": 0.05}]
SHALLOW = dict(model="mlp", n_embd=10, n_hidden=200, activation="tanh", batchnorm=False, hidden_bias="added",
               init=dict(C=1, W1=0.2, b1=0.01, W2=0.01, b2=0), gain=5 / 3)
SHALLOW_BN = dict(SHALLOW, batchnorm=True, hidden_bias="not_drawn", init=dict(SHALLOW["init"], W1="kaiming"))
DEEP = dict(model="deep", n_embd=10, n_hidden=100, n_layers=5, activation="tanh", batchnorm=False, gain=5 / 3,
            last_layer_scale=0.1)
KINDS = {
    "shallow": SHALLOW,
    "shallow_bn": SHALLOW_BN,
    "deep": DEEP,
    "deep_bn": dict(DEEP, batchnorm=True),
    "relu": dict(SHALLOW, activation="relu"),
    "deep_relu_bn": dict(DEEP, batchnorm=True, activation="relu", n_layers=2, n_hidden=64),
    "b1_drawn_not_added": dict(SHALLOW, hidden_bias="drawn_not_added"),
    "bias_before_bn": dict(SHALLOW_BN, hidden_bias="added"),
    # issue 19: cases a baseline made before them does not have (compare skips them, and says so)
    "shallow_ln_bias": dict(SHALLOW, norm="layernorm", init=dict(SHALLOW["init"], W1="orthogonal")),
    "deep_ln_gelu_orth": dict(DEEP, norm="layernorm", activation="gelu", weight_init="orthogonal", n_layers=3),
}
SEEDS = (1, 2)
STEPS_FROM_INIT, STEPS_FROM_TRAINED = 300, 200


def plan(steps: int) -> StatsPlan:
    return StatsPlan(every=50, update_every=10, histogram_every=100, snapshot_steps=(0, 50), bins=20,
                     last_step=steps - 1)


def outcome(results, nets, gens, recorders) -> dict:
    """Everything a run leaves behind, as named tensors (and the statistics' index as a list of rows)."""
    out = {}
    for m, (res, net, g) in enumerate(zip(results, nets, gens)):
        out[f"{m}/losses"] = res.losses
        out[f"{m}/steps_done"] = torch.tensor(res.steps_done)
        out[f"{m}/diverged_at"] = torch.tensor(-1 if res.diverged_at is None else res.diverged_at)
        out[f"{m}/generator"] = g.get_state()
        for name, t in net.state_dict().items():
            out[f"{m}/state/{name}"] = t.detach().cpu().clone()
        for name, bn in net.batchnorm_layers():
            out[f"{m}/last_batch/{name}/mean"] = bn.last_batch_mean.cpu().clone()
            out[f"{m}/last_batch/{name}/spread"] = bn.last_batch_spread.cpu().clone()
        rec = recorders[m] if recorders else None
        if rec is not None:
            stats = rec.stats_frame()
            out[f"{m}/stats/values"] = torch.tensor(stats.value.to_numpy())
            rows = stats[["step", "layer", "kind", "stat"]].itertuples(index=False)
            out[f"{m}/stats/index"] = [(int(step), *names) for step, *names in rows]
            hists = rec.histogram_frame()
            out[f"{m}/hists/fraction"] = torch.tensor(hists.fraction.to_numpy())
            out[f"{m}/hists/bin_left"] = torch.tensor(hists.bin_left.to_numpy())
            for layer, smap in rec.saturation_maps.items():
                out[f"{m}/saturation/{layer}"] = smap
    return out


def run_case(spec: dict, batch_size: int, use_kernels: bool, Xtr, Ytr) -> dict:
    nets, gens = map(list, zip(*[reference.init_network(spec, seed, 3) for seed in SEEDS]))
    out = {}
    for phase, steps in (("init", STEPS_FROM_INIT), ("trained", STEPS_FROM_TRAINED)):
        recorders = [StatsRecorder(plan(steps)) for _ in nets]
        results = train_batched(nets, gens, Xtr, Ytr, steps=steps, batch_size=batch_size, lr_schedule=SCHEDULE,
                                recorders=recorders, kernels=use_kernels)
        out.update({f"{phase}/{k}": v for k, v in outcome(results, nets, gens, recorders).items()})
    return out


def run_nan_case(use_kernels: bool, Xtr, Ytr) -> dict:
    nets, gens = map(list, zip(*[reference.init_network(SHALLOW_BN, seed, 3) for seed in (1, 2, 3)]))
    with torch.no_grad():
        nets[1].layers["linear2"].weight[0, 0] = float("nan")
    recorders = [StatsRecorder(plan(120)) for _ in nets]
    results = train_batched(nets, gens, Xtr, Ytr, steps=120, batch_size=32, lr_schedule=SCHEDULE,
                            recorders=recorders, max_group=2, kernels=use_kernels)
    return outcome(results, nets, gens, recorders)


def all_cases(Xtr, Ytr):
    for use_kernels in (True, False):
        on = "C" if use_kernels else "torch"
        for name, spec in KINDS.items():
            for batch_size in (32, 20):
                yield f"{name}-b{batch_size}-{on}", lambda s=spec, b=batch_size, k=use_kernels: run_case(
                    s, b, k, Xtr, Ytr)
        yield f"nan_dropped-{on}", lambda k=use_kernels: run_nan_case(k, Xtr, Ytr)


def main(argv: list[str]) -> int:
    mode, folder = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    names = os.environ.get("ACTGRAD_NAMES") or "data/names.txt"
    Xtr, Ytr = data.make_splits(data.read_names(names))["splits"]["train"]
    folder.mkdir(parents=True, exist_ok=True)
    compared, mismatched = 0, []
    for case, run in all_cases(Xtr, Ytr):
        result = run()
        path = folder / f"{case}.pt"
        if mode == "save":
            torch.save(result, path)
            print(f"saved {case}: {len(result)} tensors")
            continue
        if not path.exists():
            print(f"{case}: not in the baseline, skipped", flush=True)
            continue
        saved = torch.load(path, weights_only=False)
        if saved.keys() != result.keys():
            mismatched.append(f"{case}: different keys {sorted(saved.keys() ^ result.keys())[:5]}")
        for key in saved.keys() & result.keys():
            compared += 1
            a, b = saved[key], result[key]
            if not isinstance(a, torch.Tensor):
                if a != b:
                    mismatched.append(f"{case}: {key}")
                continue
            if not (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
                if not (a.is_floating_point() and a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
                        and torch.equal(a.nan_to_num(), b.nan_to_num())):
                    mismatched.append(f"{case}: {key}")
        print(f"{case}: {len(saved)} tensors compared", flush=True)
    if mode == "compare":
        print(f"{compared} tensors compared with torch.equal (NaN equal to NaN), {len(mismatched)} differ")
        for line in mismatched if "--all" in argv else mismatched[:40]:
            print("  differs:", line)
        return 1 if mismatched else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
