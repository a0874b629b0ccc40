"""Benchmark: the lecture's loops against the batched engine, side by side in one process.

For each of the lecture's four networks (shallow, shallow + BatchNorm, deep, deep +
BatchNorm) it times

* the lecture's loop as written (:mod:`actgrad.training.lecture`, CPU, one ``.item()`` per step): the
  reference;
* :func:`actgrad.training.engine.train_batched` on one model and on several models at once (seeds
  1000, 1001, ...), with statistics on (a :class:`~actgrad.training.stats.StatsRecorder` per model at
  the pipeline's default statistics plan), and once more without statistics at the
  largest model count;

and prints model-steps per second, the ratio to the reference, the achieved GFLOP/s (from
an analytic count of the matmul work, printed with the table) and the fraction of this
machine's dense float32 matmul rate, measured in the same run. Runs are repeated in
interleaved rounds and the best of each is kept; on CPU they are timed by process CPU time,
which a shared machine's other processes do not inflate (``--clock wall`` for wall time).

Beside them, in the same rounds, it times what a user would otherwise write to train several
seeds together (:mod:`actgrad.tools.peers`: PyTorch's torch.func ensembling recipe, eager and under
torch.compile, and JAX with the whole loop in one jitted lax.scan, where jax is installed), on
CPU at the pipeline's 5 models per job (or the counts ``--models`` names), and prints the
engine's lead over each and over the best of them.

Statistics cost most at snapshots (steps 0 and 1000 by default), which weigh far more in a
benchmark's few thousand steps than in a 200,000-step run, so the cost of each kind of
statistics step is also measured and extrapolated to a full run at the default plan.

    python -m actgrad.tools.bench --threads 1 --models 1,5,10,25
    actgrad bench --quick
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from actgrad import data
from actgrad.study.settings import linear_shapes, matmul_flops_per_step, study_defaults
from actgrad.tools import peers
from actgrad.training import kernels, lecture
from actgrad.training.engine import train_batched
from actgrad.training.job import stats_plan
from actgrad.training.model import build_network
from actgrad.training.networks import LECTURE_NETWORKS
from actgrad.training.progress import ProgressLog
from actgrad.training.stats import StatsPlan, StatsRecorder

# Every line goes out as it is printed, to a terminal or a pipe: the bench talks while it measures.
say = functools.partial(print, flush=True)

SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 100000, "lr": 0.01}]
BATCH_SIZE = 32

# The lecture's four networks: the spec the engine trains, and the lecture loop's arguments for the same net.
LECTURE_LOOP_ARGS = {
    "shallow": ("mlp", dict(W1_scale=0.2, b1_scale=0.01, W2_scale=0.01, b2_scale=0.0)),
    "shallow+BN": ("mlp", dict(batchnorm=True, hidden_bias="not_drawn", kaiming_gain=5 / 3, W2_scale=0.01,
                               b2_scale=0.0)),
    "deep": ("deep", dict(batchnorm=False, gain=5 / 3, last_layer_scale=0.1)),
    "deep+BN": ("deep", dict(batchnorm=True, gain=5 / 3, last_layer_scale=0.1)),
}
NETWORKS = {name: (spec, *LECTURE_LOOP_ARGS[name]) for name, spec in LECTURE_NETWORKS.items()}


# The engine's goals, in model-steps per second per core against the lecture's loop.
SPEED_GOALS = {"shallow": 5, "shallow+BN": 8, "deep": 5, "deep+BN": 10}


def sgemm_peak(device: torch.device, clock=time.perf_counter, n: int | None = None, reps: int = 5) -> float:
    """Best GFLOP/s of a large square float32 matmul on ``device``."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t0 = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best / 1e9


def matmul_ceiling(spec: dict, models: int, block_size: int, clock=time.process_time, steps: int = 2000,
                   repeat: int = 3, batch_size: int = 32) -> float:
    """Model-steps/s of a training step's matrix products alone, on CPU: for each Linear layer, over ``models``
    models and a minibatch, the forward product and the backward pass's two (input and weight gradient), as
    PyTorch batched matmuls into preallocated outputs, in the faster of two layouts (examples-major as the
    peers hold them, feature-major as the engine does); nothing else of the step. An engine built on these
    products cannot train faster than this."""
    best = 0.0
    for feature_major in (False, True):
        products = []
        for fan_in, fan_out in linear_shapes(spec, block_size):
            def mats(*shape):
                return torch.randn(models, *shape)
            if feature_major:  # (models, features, examples)
                x, w_t, g = mats(fan_in, batch_size), mats(fan_out, fan_in), mats(fan_out, batch_size)
                y, dx, dw = mats(fan_out, batch_size), mats(fan_in, batch_size), mats(fan_out, fan_in)
                products += [(w_t, x, y), (w_t.transpose(1, 2), g, dx), (g, x.transpose(1, 2), dw)]
            else:  # (models, examples, features)
                x, w, g = mats(batch_size, fan_in), mats(fan_in, fan_out), mats(batch_size, fan_out)
                y, dx, dw = mats(batch_size, fan_out), mats(batch_size, fan_in), mats(fan_in, fan_out)
                products += [(x, w, y), (g, w.transpose(1, 2), dx), (x.transpose(1, 2), g, dw)]
        for _ in range(repeat):
            for a, b, out in products:
                torch.bmm(a, b, out=out)
            t0 = clock()
            for _ in range(steps):
                for a, b, out in products:
                    torch.bmm(a, b, out=out)
            best = max(best, models * steps / (clock() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_for(device: torch.device, clock: str):
    """The timer: process CPU time on CPU (not charged for other processes on a shared machine), else wall time."""
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" else "wall"
    return time.process_time if clock == "cpu" else time.perf_counter


def time_lecture(kind: str, args: dict, Xtr, Ytr, steps: int, clock=time.perf_counter) -> float:
    """Steps per second of the lecture's own loop."""
    loop = lecture.mlp_loop if kind == "mlp" else lecture.deep_loop
    t0 = clock()
    loop(Xtr, Ytr, steps=steps, **args)
    return steps / (clock() - t0)


def default_plan() -> StatsPlan:
    """The pipeline's default statistics plan (the schema's ``stats`` defaults), without a last-step snapshot."""
    return replace(stats_plan(study_defaults()["stats"], NEVER), last_step=-1)


def seeded_networks(spec: dict, models: int, block_size: int):
    """``models`` networks of ``spec`` (seeds 1000, 1001, ...) and the generators that drew them."""
    nets, gens = [], []
    for seed in range(models):
        g = torch.Generator().manual_seed(1000 + seed)
        nets.append(build_network(spec, g, block_size))
        gens.append(g)
    return nets, gens


def time_peer(peer: str, spec: dict, models: int, Xtr, Ytr, steps: int, block_size: int, clock,
              warm: int = 20) -> peers.PeerRun:
    """A peer's run on ``models`` models of ``spec`` (seeds 1000, 1001, ...), after a warm-up run for the
    PyTorch peers (where torch.compile compiles: its ``compile_seconds`` are kept on the timed run)."""
    kwargs = dict(batch_size=BATCH_SIZE, lr_schedule=SCHEDULE, clock=clock)
    compile_seconds = 0.0
    if peer != "JAX":  # JAX compiles its whole loop ahead of the run, for the run's step count
        compile_seconds = peers.train_peer(peer, *seeded_networks(spec, models, block_size), Xtr, Ytr, steps=warm,
                                           **kwargs).compile_seconds
    run = peers.train_peer(peer, *seeded_networks(spec, models, block_size), Xtr, Ytr, steps=steps, **kwargs)
    run.compile_seconds = max(run.compile_seconds, compile_seconds)
    return run


def time_engine(spec: dict, models: int, Xtr, Ytr, steps: int, device: torch.device, stats,
                block_size: int, clock=time.perf_counter, kernels: bool | None = None,
                progress_every: int | None = None) -> float:
    """Model-steps per second of the batched engine on ``models`` models (different seeds).

    ``stats``: False, True (:func:`default_plan`) or a StatsPlan. ``kernels``: as
    :func:`~actgrad.training.engine.train_batched` takes it (None: the C kernels where they build).
    ``progress_every``: progress lines that often (formatted, then dropped), or none.
    """
    nets, gens = seeded_networks(spec, models, block_size)
    plan = stats if isinstance(stats, StatsPlan) else default_plan()
    recorders = [StatsRecorder(plan) for _ in range(models)] if stats else None
    progress = ProgressLog(lambda line: None, steps, models, every=progress_every) if progress_every else None
    _sync(device)
    t0 = clock()
    train_batched(nets, gens, Xtr, Ytr, steps=steps, batch_size=BATCH_SIZE, lr_schedule=SCHEDULE,
                  recorders=recorders, device=device, kernels=kernels, progress=progress)
    _sync(device)
    return models * steps / (clock() - t0)


# Steps of each kind in a 200,000-step run at the default plan (every 1000, updates every 100,
# histograms every 5000, snapshots at 0, 1000 and the last step): each kind includes the cheaper ones.
DEFAULT_RUN = {"update": 1800, "series": 160, "histogram": 37, "snapshot": 3}
NEVER = 10 ** 9


def stats_step_costs(spec: dict, models: int, Xtr, Ytr, device: torch.device, block_size: int, clock,
                     steps: int = 40) -> dict[str, float]:
    """Seconds that one step of each kind of statistics adds to a plain step, for ``models`` models.

    Each is measured on a run whose every step is of that kind (plans built for the purpose).
    """
    bins = default_plan().bins
    plans = {
        "update": StatsPlan(every=NEVER, update_every=1, histogram_every=NEVER, snapshot_steps=(), bins=bins),
        "series": StatsPlan(every=1, update_every=1, histogram_every=NEVER, snapshot_steps=(), bins=bins),
        "histogram": StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=(), bins=bins),
        "snapshot": StatsPlan(every=1, update_every=1, histogram_every=1, snapshot_steps=tuple(range(steps)),
                              bins=bins),
    }

    def per_step(stats):
        return models / time_engine(spec, models, Xtr, Ytr, steps, device, stats, block_size, clock)

    plain = min(per_step(False) for _ in range(2))
    costs = {kind: max(0.0, min(per_step(plan) for _ in range(2)) - plain) for kind, plan in plans.items()}
    costs["plain"] = plain
    return costs


DEFAULT_NAMES = "data/names.txt"  # where the pipeline downloads them


BENCH_EXAMPLES = """\
examples:
  actgrad bench --quick                           a short run: 300 steps, 1 and 10 models (peers at 5)
  actgrad bench --threads 1 --models 1,5,10,30    the README's table
  actgrad bench --device cuda --quick             on a GPU, where there is one"""

# The peers by their command-line names (--peers), and the count they run at by default: the pipeline's models per job.
PEER_NAMES = {"torch.func": "torch.func", "torch.compile": "torch.func + compile", "jax": "JAX"}
PIPELINE_MODELS = 5
LEAD_GOAL = 2  # the engine's goal: at least 2x the best peer on every network


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="actgrad bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BENCH_EXAMPLES)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 3000; --quick: 300)")
    p.add_argument("--models", default=None, help="model counts for the engine, comma-separated (default 1,5,10,25)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: speed per core)")
    p.add_argument("--names", default=DEFAULT_NAMES,
                   help=f"names file (default: {DEFAULT_NAMES}, the pipeline's download)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, or a comma-separated list (default cpu)")
    p.add_argument("--networks", default=",".join(NETWORKS), help=f"which networks (default {','.join(NETWORKS)})")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds, best kept (default 2; --quick: 1)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto (default): process CPU time on CPU, wall time on CUDA")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 300 steps, models 1,10 (and 5 for the peers), one round")
    p.add_argument("--peers", default=",".join(PEER_NAMES),
                   help=f"what a user would otherwise write, timed beside the engine on CPU: any of "
                        f"{','.join(PEER_NAMES)}, or none (default: all; jax only where it is installed)")
    p.add_argument("--peer-models", default=None,
                   help=f"model counts for the peers (default: the --models counts where --models is given, "
                        f"else {PIPELINE_MODELS}, the pipeline's models per job); the engine is timed at them too")
    args = p.parse_args(argv)
    args.steps = args.steps or (300 if args.quick else 3000)
    models_given = args.models is not None
    args.models = [int(m) for m in (args.models or ("1,10" if args.quick else "1,5,10,25")).split(",")]
    chosen = [n.strip() for n in args.peers.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in chosen if n not in PEER_NAMES]
    if unknown:
        p.error(f"--peers: unknown peer(s) {unknown}; choose from {list(PEER_NAMES)} or none")
    args.peers = [PEER_NAMES[n] for n in chosen]
    if args.peer_models:
        args.peer_models = [int(m) for m in args.peer_models.split(",")]
    else:
        args.peer_models = list(args.models) if models_given else [PIPELINE_MODELS]
    if not args.peers:
        args.peer_models = []
    args.models = sorted(set(args.models) | set(args.peer_models))
    args.repeat = args.repeat or (1 if args.quick else 2)
    args.networks = [n.strip() for n in args.networks.split(",")]
    unknown = [n for n in args.networks if n not in NETWORKS]
    if unknown:
        p.error(f"unknown network(s) {unknown}; choose from {list(NETWORKS)}")
    devices = []
    for name in args.device.split(","):
        name = name.strip()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            p.error(f"--device {name}: this machine has no CUDA GPU")
        devices.append(torch.device(name))
    args.devices = devices
    return args


def plan_rows(args, compiled: bool, peer_list: list[str]) -> tuple[list[tuple], list[tuple]]:
    """The rows the bench times: (network, label, device, models, stats, kernels), the lecture loop on CPU
    first for each network, and the peers' (network, peer, models)."""
    # Without the C kernels, once, at the smallest batch of several models (the pipeline trains 5).
    several = min([m for m in args.models if m > 1] or args.models)
    rows = []
    for net in args.networks:
        rows.append((net, "lecture loop", torch.device("cpu"), 1, False, None))
        for dev in args.devices:
            for m in args.models:
                rows.append((net, "engine", dev, m, True, None))
                if m == several and dev.type == "cpu" and compiled:
                    rows.append((net, "engine (PyTorch ops)", dev, m, True, False))
            rows.append((net, "engine", dev, max(args.models), False, None))
    # The peers and, for the same work (no statistics), the engine at their model counts, on CPU.
    peer_rows = [(net, peer, m) for net in args.networks for m in args.peer_models for peer in peer_list]
    for net in args.networks:
        for m in args.peer_models if peer_list else []:
            if (net, "engine", torch.device("cpu"), m, False, None) not in rows:
                rows.append((net, "engine", torch.device("cpu"), m, False, None))
    return rows, peer_rows


# Rough one-core rates for the plan's estimate (docs/engine.md's tables): the lecture loop's steps/s, the engine's
# model-steps/s at 5 models, each peer's lead-adjusted share of it, and the matmuls-alone ceiling.
LECTURE_RATE = {"shallow": 4525, "shallow+BN": 1952, "deep": 997, "deep+BN": 444}
ENGINE_RATE = {"shallow": 29400, "shallow+BN": 24800, "deep": 9400, "deep+BN": 8300}
PEER_SLOWDOWN = {"torch.func": 12.0, "torch.func + compile": 2.4, "JAX": 1.6}
PEER_COMPILE_SECONDS = {"torch.func": 0.0, "torch.func + compile": 2.5, "JAX": 1.5}
CEILING_RATE = {"shallow": 56000, "shallow+BN": 56000, "deep": 13700, "deep+BN": 13700}


def estimate_seconds(args, rows, peer_rows, warm: int = 20) -> float:
    """What the bench will take, from :data:`ENGINE_RATE` and the others: rough (another machine, other threads,
    a GPU), but the right order of magnitude before a run of many minutes."""
    seconds = 0.0
    for net, label, dev, m, _stats, _kernels in rows:
        rate = LECTURE_RATE[net] if label == "lecture loop" else ENGINE_RATE[net] * (dev.type == "cpu" or 3.0)
        seconds += args.repeat * m * (args.steps + warm) / rate
    for net, peer, m in peer_rows:
        seconds += args.repeat * (m * (args.steps + warm) * PEER_SLOWDOWN[peer] / ENGINE_RATE[net]
                                  + 2 * PEER_COMPILE_SECONDS[peer])
    for net, m in {(net, m) for net, _peer, m in peer_rows}:
        seconds += 2 * 3 * 2000 * m / CEILING_RATE[net]  # the matmuls-alone ceiling, two layouts
    m = max(args.models)
    for net in args.networks:
        for _ in args.devices:
            seconds += 10 * 40 * m / ENGINE_RATE[net]  # the statistics' cost per kind of step
            seconds += 2 * args.repeat * args.steps * m / ENGINE_RATE[net]  # progress lines' cost
    return seconds + args.repeat * len(args.devices) * 1.0 + 3.0  # sgemm peaks; the splits


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> list[dict]:
    """Time every row, print the table, return the rows as dicts."""
    if not Path(args.names).is_file():
        raise SystemExit(f"actgrad bench: no names file at {args.names}; get it with `snakemake --cores 1 "
                         f"{DEFAULT_NAMES}` in the project, or point --names PATH at a copy of makemore's names.txt")
    torch.set_num_threads(args.threads)
    compiled = any(dev.type == "cpu" for dev in args.devices) and kernels.load() is not None
    peer_list = list(args.peers)
    jax_note = peers.jax_missing() if "JAX" in peer_list else None
    if jax_note:
        peer_list.remove("JAX")
    rows, peer_rows = plan_rows(args, compiled, peer_list)
    # The plan and what it will take, before anything is measured; then each row as it is measured.
    say(f"actgrad bench: {len(rows)} engine and lecture-loop rows and {len(peer_rows)} peer rows, "
        f"{args.steps:,} steps each, best of {args.repeat} interleaved round(s), networks {', '.join(args.networks)}, "
        f"models {', '.join(map(str, args.models))}; about {_duration(estimate_seconds(args, rows, peer_rows))} "
        f"(estimated from docs/engine.md's one-core rates; rows print as they are measured, the table's in the "
        f"last round)")
    if jax_note:
        say(jax_note)
    words = data.read_names(args.names)
    built = data.make_splits(words)
    Xtr, Ytr = built["splits"]["train"]
    block_size = built["block_size"]

    clocks = {dev: clock_for(dev, args.clock) for dev in args.devices}
    cpu_clock = clock_for(torch.device("cpu"), args.clock)
    say(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {args.steps} steps per run, best of {args.repeat} interleaved round(s)")
    say("timed by " + ", ".join(f"{'process CPU time' if c is time.process_time else 'wall time'} on {d}"
                                for d, c in clocks.items()))
    say("FLOPs per model-step (3 x forward matmul FLOPs, batch 32): "
        + ", ".join(f"{n} {matmul_flops_per_step(NETWORKS[n][0], block_size) / 1e6:.2f} M" for n in args.networks))
    say("engine: M models of one network (seeds 1000..) trained together; statistics on (a StatsRecorder "
        "per model, the default plan) unless marked 'no stats'; reference: the lecture's loop on CPU")
    say(f"C kernels on CPU: {kernels.status()}"
        + ("; 'PyTorch ops': the same engine without them" if compiled else ""))

    peer_runs: dict[tuple, peers.PeerRun] = {}
    compile_seconds: dict[tuple, float] = {}
    best = {r: 0.0 for r in rows}
    peaks = {dev: 0.0 for dev in args.devices}
    warm = 20
    results = []
    started = time.perf_counter()
    for round_ in range(1, args.repeat + 1):
        last = round_ == args.repeat
        for dev in args.devices:
            peaks[dev] = max(peaks[dev], sgemm_peak(dev, clocks[dev]))
        if last:  # the table's rows are final as the last round measures them
            for dev in args.devices:
                label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} thread(s)"
                size = 8192 if dev.type == "cuda" else 2048
                say(f"sgemm peak on {dev} ({label}): {peaks[dev]:.1f} GFLOP/s ({size}x{size} float32 matmul, best)")
            say()
            header = (f"{'network':<11} {'engine':<22} {'device':<7} {'models':>6} {'model-steps/s':>14} "
                      f"{'x lecture':>9} {'GFLOP/s':>8} {'% peak':>7}  {'goal':<9}")
            say(header)
            say("-" * len(header))
        for row in rows:
            net, label, dev, m, stats, use_kernels = row
            spec, kind, lecture_args = NETWORKS[net]
            if label == "lecture loop":
                time_lecture(kind, lecture_args, Xtr, Ytr, warm)
                rate = time_lecture(kind, lecture_args, Xtr, Ytr, args.steps, cpu_clock)
            else:
                time_engine(spec, m, Xtr, Ytr, warm, dev, stats, block_size, kernels=use_kernels)
                rate = time_engine(spec, m, Xtr, Ytr, args.steps, dev, stats, block_size, clocks[dev],
                                   kernels=use_kernels)
            best[row] = max(best[row], rate)
            if last:
                results.append(print_row(row, best, peaks, block_size))
            else:
                say(f"round {round_}/{args.repeat}: {net} {label}{'' if stats or label != 'engine' else ' (no stats)'}"
                    f" {dev.type} {m} model(s): {rate:,.0f} model-steps/s ({_duration(time.perf_counter() - started)}"
                    " so far)")
        if last and peer_rows:
            say()
            say(f"peers: what a user would otherwise write to train several seeds together (actgrad.tools.peers), on "
                f"CPU, the same networks, minibatches (batch {BATCH_SIZE}) and lr {SCHEDULE[0]['lr']:g}, no "
                "statistics; lead = the engine's model-steps/s (no statistics: the same work) over the peer's; with "
                "stats = the engine as the pipeline runs it; compile: wall seconds, once, not in the rate; cpu/wall: "
                "process CPU time over wall time of the timed run (about 1 on one core)")
            say(PEER_HEADER)
            say("-" * len(PEER_HEADER))
        for row in peer_rows:
            net, peer, m = row
            run_ = time_peer(peer, NETWORKS[net][0], m, Xtr, Ytr, args.steps, block_size, cpu_clock, warm)
            compile_seconds[row] = max(compile_seconds.get(row, 0.0), run_.compile_seconds)
            if row not in peer_runs or run_.seconds < peer_runs[row].seconds:
                peer_runs[row] = run_
            if last:
                results.append(print_peer_row(row, peer_runs, compile_seconds, best))
            else:
                say(f"round {round_}/{args.repeat}: peer {peer}, {net}, {m} model(s): "
                    f"{m * run_.timed_steps / run_.seconds:,.0f} model-steps/s")
    if peer_rows:
        results += print_ceilings(args, results, best, block_size,
                                  peaks.get(torch.device("cpu")) or sgemm_peak(torch.device("cpu"), cpu_clock))
    say()
    m = max(args.models)
    say(f"statistics overhead, {m} models: in these {args.steps}-step runs (stats on vs off, where snapshots at "
          "steps 0 and 1000 weigh far more than in a real run), and extrapolated to a 200,000-step run at the "
          "default plan from the measured cost of each kind of statistics step:")
    for net in args.networks:
        for dev in args.devices:
            on = best[(net, "engine", dev, m, True, None)]
            off = best[(net, "engine", dev, m, False, None)]
            costs = stats_step_costs(NETWORKS[net][0], m, Xtr, Ytr, dev, block_size, clocks[dev])
            extra = sum(n * costs[kind] for kind, n in DEFAULT_RUN.items())
            full = 200000 * costs["plain"]
            say(f"  {net:<11} {dev.type}: {100 * (off / on - 1):+5.1f}% here, {100 * extra / full:+5.1f}% over "
                  f"200k steps (per step, ms: plain {1e3 * costs['plain']:.2f}, + update {1e3 * costs['update']:.2f}, "
                  f"series {1e3 * costs['series']:.2f}, histogram {1e3 * costs['histogram']:.2f}, "
                  f"snapshot {1e3 * costs['snapshot']:.2f})")
            results.append(dict(network=net, device=str(dev), models=m, stats_overhead_here=off / on - 1,
                                stats_overhead_200k=extra / full))
    say()
    every = max(1, args.steps // 10)
    say(f"progress lines, {m} models, statistics on: the time of a {args.steps}-step run with a line every {every} "
          f"steps against none (best of {args.repeat} interleaved), and scaled to the pipeline's line every "
          f"{PIPELINE_PROGRESS:,} steps:")
    for net in args.networks:
        for dev in args.devices:
            without, with_lines = progress_cost(NETWORKS[net][0], m, Xtr, Ytr, args.steps, dev, block_size,
                                                clocks[dev], args.repeat, every)
            here = without / with_lines - 1
            say(f"  {net:<11} {dev.type}: {without:,.0f} vs {with_lines:,.0f} model-steps/s, {100 * here:+5.2f}% "
                  f"time here, {100 * here * every / PIPELINE_PROGRESS:+6.3f}% at one line per "
                  f"{PIPELINE_PROGRESS:,} steps")
            results.append(dict(network=net, device=str(dev), models=m, progress_every=every,
                                progress_overhead_here=here,
                                progress_overhead_pipeline=here * every / PIPELINE_PROGRESS))
    return results


PEER_HEADER = (f"{'network':<11} {'peer':<22} {'models':>6} {'model-steps/s':>14} {'lead':>7} {'with stats':>10} "
               f"{'compile s':>9} {'cpu/wall':>8}")


def print_row(row, best, peaks, block_size: int) -> dict:
    """One row of the engine's table, printed once its last measurement is in."""
    net, label, dev, m, stats, _ = row
    spec = NETWORKS[net][0]
    ref = best[(net, "lecture loop", torch.device("cpu"), 1, False, None)]
    rate = best[row]
    gflops = rate * matmul_flops_per_step(spec, block_size) / 1e9
    peak = peaks[dev]
    name = label if label != "engine" else f"engine{'' if stats else ' (no stats)'}"
    goal = "" if label == "lecture loop" else (
        f"{SPEED_GOALS[net]:g}x {'met' if rate / ref >= SPEED_GOALS[net] else 'short'}")
    say(f"{net:<11} {name:<22} {dev.type:<7} {m:>6} {rate:>14,.0f} {rate / ref:>9.2f} {gflops:>8.1f} "
        f"{100 * gflops / peak:>6.1f}%  {goal}")
    return dict(network=net, engine=name, device=str(dev), models=m, stats=stats,
                model_steps_per_s=rate, ratio=rate / ref, gflops=gflops, peak_fraction=gflops / peak)


def print_peer_row(row, peer_runs, compile_seconds, best) -> dict:
    """One peer's row: model-steps/s beside the engine's at the same count, and the engine's lead."""
    cpu = torch.device("cpu")
    net, peer, m = row
    run = peer_runs[row]
    rate = m * run.timed_steps / run.seconds
    lead = best[(net, "engine", cpu, m, False, None)] / rate
    with_stats = best.get((net, "engine", cpu, m, True, None), 0.0) / rate
    stats_text = f"{with_stats:>9.2f}x" if with_stats else f"{'':>10}"
    cpu_wall = run.cpu_seconds / run.wall_seconds
    say(f"{net:<11} {peer:<22} {m:>6} {rate:>14,.0f} {lead:>6.2f}x {stats_text} "
        f"{compile_seconds[row]:>9.1f} {cpu_wall:>8.2f}")
    return dict(network=net, peer=peer, device="cpu", models=m, model_steps_per_s=rate, lead=lead,
                lead_with_stats=with_stats or None, compile_seconds=compile_seconds[row], cpu_per_wall=cpu_wall)


def print_ceilings(args, results, best, block_size: int, cpu_peak: float) -> list[dict]:
    """The best peer per network, and what the goal's lead would take: of the step's matmuls alone, and of the
    CPU's sgemm peak (``cpu_peak``, GFLOP/s) for their FLOPs with nothing else in the step."""
    cpu = torch.device("cpu")
    results = [r for r in results if "peer" in r]
    out = []
    say()
    say(f"ceiling: a step's matrix products alone (actgrad.tools.bench.matmul_ceiling), the most model-steps/s "
          f"an engine "
          f"built on PyTorch's matmul can reach; the engine's share of it; what a {LEAD_GOAL}x lead over the best "
          f"peer would need, of the ceiling and, for the step's matmul FLOPs alone, of the sgemm peak "
          f"({cpu_peak:.0f} GFLOP/s)")
    for net in args.networks:
        for m in args.peer_models:
            mine = [r for r in results if r["network"] == net and r["models"] == m]
            top = max(mine, key=lambda r: r["model_steps_per_s"])
            verdict = "met" if top["lead"] >= LEAD_GOAL else "missed"
            ceiling = matmul_ceiling(NETWORKS[net][0], m, block_size, clock=clock_for(cpu, args.clock))
            engine = best[(net, "engine", cpu, m, False, None)]
            needed = LEAD_GOAL * top["model_steps_per_s"]
            needed_of_peak = needed * matmul_flops_per_step(NETWORKS[net][0], block_size) / 1e9 / cpu_peak
            say(f"best peer, {net}, {m} models: {top['peer']} at {top['model_steps_per_s']:,.0f} model-steps/s; "
                  f"the engine leads it {top['lead']:.2f}x: goal {LEAD_GOAL}x {verdict}; ceiling {ceiling:,.0f}, "
                  f"the engine at {100 * engine / ceiling:.0f}% of it; {LEAD_GOAL}x needs {needed:,.0f} = "
                  f"{100 * needed / ceiling:.0f}% of the ceiling, its matmuls alone at {100 * needed_of_peak:.0f}% "
                  f"of the sgemm peak")
            out.append(dict(network=net, models=m, best_peer=top["peer"], lead_over_best=top["lead"],
                                goal_met=top["lead"] >= LEAD_GOAL, matmul_ceiling=ceiling,
                                engine_share_of_ceiling=engine / ceiling, needed_share_of_ceiling=needed / ceiling,
                                needed_share_of_sgemm_peak=needed_of_peak))
    return out


PIPELINE_PROGRESS = 10000  # the pipeline's default steps between progress lines (the lecture's print interval)


def progress_cost(spec: dict, models: int, Xtr, Ytr, steps: int, device, block_size: int, clock, repeat: int,
                  every: int) -> tuple[float, float]:
    """Model-steps/s of the engine (statistics on) without and with progress lines every ``every`` steps."""
    best = {None: 0.0, every: 0.0}
    for _ in range(repeat):
        for progress_every in best:
            rate = time_engine(spec, models, Xtr, Ytr, steps, device, True, block_size, clock,
                               progress_every=progress_every)
            best[progress_every] = max(best[progress_every], rate)
    return best[None], best[every]


if __name__ == "__main__":
    main()
