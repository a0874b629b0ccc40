"""Fused CPU kernels (``kernels.c``): the batched engine's, and three for evaluating a whole split (a column's
variance, BatchNorm with running statistics, counting values); compiled on first use, loaded with ctypes.

Plain C with no Python or PyTorch headers, so any C compiler builds it in well under a
second. The library is cached per source, flags and CPU (``-march=native``: a
cluster whose nodes differ gets one build per kind of node) in ``$ACTGRAD_CACHE_DIR``,
else ``$XDG_CACHE_HOME/actgrad``, else ``~/.cache/actgrad``. Without a compiler, or with
``ACTGRAD_KERNELS=off``, :func:`load` returns None and the engine uses PyTorch operations
for the same arithmetic (:func:`status` says which and why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
# No -ffast-math: NaN and Inf must propagate, and no multiply-add may be fused where the
# PyTorch path rounds twice.
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"]
NATIVE = ["-march=native"]


class BatchNormArgs(ctypes.Structure):
    """``bn_args`` of kernels.c: the fixed buffers of one BatchNorm layer of the engine."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("x", "out", "gamma", "beta", "inv", "scale", "mean", "spread", "run_mean", "run_spread",
                 "ggamma", "gbeta")] + [
        ("rows", ctypes.c_int64), ("B", ctypes.c_int64), ("std_flavour", ctypes.c_int64),
        ("eps", ctypes.c_float), ("keep", ctypes.c_float), ("take", ctypes.c_float)]


_loaded: tuple[object, str] | None = None  # (library or None, status), once per process


def cache_dir() -> Path:
    if os.environ.get("ACTGRAD_CACHE_DIR"):
        return Path(os.environ["ACTGRAD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actgrad"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "flags", "Features"):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first CPU describes them all
    except OSError:
        pass
    return "\n".join(parts)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: jobs starting together may each build it.
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path):
    # PyDLL: the kernels never release the GIL, so ctypes need not release and retake it per call.
    lib = ctypes.PyDLL(str(path))
    bn, ptr, i64 = ctypes.POINTER(BatchNormArgs), ctypes.c_void_p, ctypes.c_int64
    f32, f64 = ctypes.c_float, ctypes.c_double
    signatures = {  # every kernel of kernels.c returns nothing (void)
        "bn_forward": [bn],
        "bn_backward": [bn, ptr, ptr, ptr],
        "tanh_backward_bias": [ptr, ptr, ptr, ptr, i64, i64],
        "embedding_forward": [ptr, i64, ptr, i64, ptr, i64, i64],
        "embedding_backward": [ptr, i64, i64, ptr, i64, ptr, i64, i64],
        "cross_entropy": [ptr, ptr, ptr, i64, i64, i64, ptr, ptr],
        "ln_forward": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32],
        "ln_backward": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64],
        "column_var": [ptr, i64, i64, f64, i64, ptr, ptr, ptr],
        "count_values": [ptr, i64, ptr, ptr, i64, ptr],
        "bn_eval": [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _load():
    if os.environ.get("ACTGRAD_KERNELS", "on").lower() in ("off", "0", "false", "no"):
        return None, "off (ACTGRAD_KERNELS=off): PyTorch operations"
    cc = compiler()
    identity = [SOURCE.read_bytes(), _cpu_signature().encode()]
    error = ""
    for flags in (FLAGS + NATIVE, FLAGS):
        key = hashlib.sha256(b"\0".join([*identity, " ".join(flags).encode()])).hexdigest()[:16]
        path = cache_dir() / f"kernels-{key}.so"
        try:
            if not path.exists():
                if cc is None:
                    return None, "off (no C compiler found; set CC): PyTorch operations"
                _build(cc, flags, path)
            return _open(path), f"on ({path})"
        except subprocess.CalledProcessError as e:
            error = ((e.stderr or "").strip().splitlines() or [str(e)])[-1]  # the compiler's last word
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            error = str(e)
    return None, f"off (the C kernels did not build: {error}): PyTorch operations"


def load():
    """The compiled kernels, or None where they cannot be built (see :func:`status`)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def status() -> str:
    """``on (path)`` or ``off (why)``: what :func:`load` found."""
    load()
    return _loaded[1]


def reset() -> None:
    """Forget what :func:`load` found (for tests that change the environment)."""
    global _loaded
    _loaded = None
