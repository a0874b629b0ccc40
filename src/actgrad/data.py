"""The names data set: download with checksum, validation, and the lecture's splits."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported where tensors are made: the download, the figures, the summary and the
# report use only the torch-free helpers here, and importing torch costs them 1.4 s of CPU each.
if TYPE_CHECKING:
    import torch

BLOCK_SIZE = 3
SPLIT_SEED = 42
NAME_PATTERN = re.compile(r"[a-z]+")
# 26 letters and the end-of-name token: a net that knows nothing starts at -ln(1/27) = 3.2958.
VOCAB_SIZE = 27
EXPECTED_INIT_LOSS = -math.log(1 / VOCAB_SIZE)
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DataError(Exception):
    """A problem with the names data, with a message meant for the user as it is."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a finished file gets the usual mode.
_FILE_MODE = 0o666 & ~_umask()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


OFFLINE_HINT = "to use a local copy instead: --config names_url=/path/to/names.txt"


def fetch(source: str, retries: int = 3, backoff: float = 1.0, timeout: float = 10.0,
          deadline: float = 30.0) -> bytes:
    """Read ``source``: an http(s) URL, a ``file://`` URL or a plain local path.

    Transient network failures (no connection, time-outs, 5xx and 429) are retried
    ``retries`` times; everything else fails at once with a :class:`DataError`. Each try
    waits at most ``timeout`` seconds for the server, and all tries together, back-off
    included, end within ``deadline`` seconds: a server that accepts the connection and never
    answers cannot hold the pipeline for minutes.
    """
    try:
        parsed = urllib.parse.urlparse(source)
        if parsed.scheme in ("http", "https"):
            if not parsed.hostname:
                raise ValueError("no host given")
            parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise DataError(f"{source}: not a valid URL ({e})") from None
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{source}: is a directory, not a file") from None
        except OSError as e:
            raise DataError(f"{source}: cannot read: {e.strerror or e}") from None
    if parsed.scheme not in ("http", "https"):
        raise DataError(f"{source}: unsupported URL scheme {parsed.scheme!r} (use http, https, file or a path)")

    give_up_at = time.monotonic() + deadline
    last_problem = ""
    offline = False  # whether the last problem is one a local copy gets around
    tries = 0
    for attempt in range(retries + 1):
        wait = backoff * 2 ** (attempt - 1) if attempt else 0.0
        left = give_up_at - time.monotonic() - wait
        if attempt and left < min(1.0, timeout):  # too little time left for another try to be worth it
            break
        if wait:
            time.sleep(wait)
        tries += 1
        try:
            data = _http_get(source, min(timeout, left), give_up_at)
            return data
        except _Truncated as e:
            last_problem, offline = str(e), False
        except urllib.error.HTTPError as e:
            last_problem, offline = f"HTTP {e.code} {e.reason}", False
            if e.code not in RETRYABLE_HTTP:
                break
        except http.client.IncompleteRead as e:
            # The server closed the connection before sending every byte it announced.
            got = len(e.partial)
            last_problem = (f"truncated download ({got} of {got + e.expected} bytes)" if e.expected is not None
                            else f"truncated download ({got} bytes, then the connection closed)")
            offline = False
        except (ValueError, http.client.InvalidURL) as e:  # a malformed URL: no point in trying again
            raise DataError(f"{source}: not a valid URL ({e})") from None
        except (TimeoutError, _DeadlinePassed):
            last_problem, offline = "no answer from the server (timed out)", True
        except (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                last_problem = "no answer from the server (timed out)"
            else:
                last_problem = f"unreachable (offline or host down: {reason})"
            offline = True
    message = f"{source}: {last_problem}" + (f" after {tries} tries" if tries > 1 else "")
    if "timed out" in last_problem:
        message += f" ({deadline - max(0.0, give_up_at - time.monotonic()):.0f} s)"
    raise DataError(message + (f"; {OFFLINE_HINT}" if offline else ""))


class _Truncated(Exception):
    pass


class _DeadlinePassed(Exception):
    pass


def _http_get(source: str, timeout: float, give_up_at: float) -> bytes:
    """One GET of ``source``; every wait on the server ends by ``give_up_at``.

    The socket's timeout bounds each wait, so the body is read in chunks and the timeout
    shortened before each: a server that sends a byte now and then cannot stretch the read.
    """
    with urllib.request.urlopen(source, timeout=timeout) as response:
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
        chunks = []
        while True:
            left = give_up_at - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed()
            if sock is not None:
                sock.settimeout(min(timeout, left))
            chunk = response.read1(1 << 16)  # what has come: read() would wait for the whole chunk
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        expected = response.headers.get("Content-Length")
        if expected is not None and expected.isdigit() and len(data) != int(expected):
            raise _Truncated(f"truncated download ({len(data)} of {expected} bytes)")
        return data


def _line_problem(line: str) -> str:
    """What is wrong with one line of the names file, in a few words."""
    if line == "":
        return "a blank line"
    if line.strip() == "":
        return "a line of only whitespace"
    if line.endswith("\r"):
        return "a Windows line ending (\\r\\n)"
    if any(c.isupper() for c in line):
        return "an upper-case letter"
    if any(c.isdigit() for c in line):
        return "a digit"
    if any(c.isspace() for c in line):
        return "a space or tab"
    return "a character other than a-z"


def validate_names(data: bytes, source: str = "names file") -> list[str]:
    """Return the names in ``data``, or raise naming the first offending lines.

    One name per line, lower-case a-z only; a single trailing newline is allowed
    (makemore's file has none).
    """
    if not data.strip():
        raise DataError(f"{source}: the file is empty")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}: non-ASCII byte on line {line}; expected lower-case a-z names") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    bad = [i for i, line in enumerate(lines, start=1) if not NAME_PATTERN.fullmatch(line)]
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        example = lines[bad[0] - 1]
        raise DataError(
            f"{source}: {len(bad)} line(s) are not a lower-case a-z name, at line {shown}; "
            f"line {bad[0]} is {example!r}: {_line_problem(example)}"
        )
    return lines


def download_names(source: str, expected_sha256: str | None, dest: str | os.PathLike, *, retries: int = 3,
                   backoff: float = 1.0, timeout: float = 10.0, deadline: float = 30.0) -> dict:
    """Fetch, validate and verify the names, then write them to ``dest`` atomically.

    Nothing is written unless every check passes. The content is checked before the
    checksum, so an empty file, an HTML error page or a hand-edited list is reported as
    what it is rather than only as a checksum mismatch.
    """
    data = fetch(source, retries=retries, backoff=backoff, timeout=timeout, deadline=deadline)
    words = validate_names(data, source)
    actual = sha256_of(data)
    if expected_sha256 and actual != expected_sha256.lower():
        raise DataError(f"{source}: checksum mismatch: expected sha256 {expected_sha256}, got {actual} "
                        f"({len(data)} bytes, {len(words)} names)")
    atomic_write_bytes(dest, data)
    return {"source": source, "sha256": actual, "bytes": len(data), "names": len(words)}


def read_names(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    return validate_names(path.read_bytes(), str(path))


def vocabulary(words: list[str]) -> tuple[dict[str, int], dict[int, str]]:
    """The lecture's vocabulary: the sorted characters as 1..n, and ``.`` as 0."""
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    itos = {i: s for s, i in stoi.items()}
    return stoi, itos


def build_dataset(words: list[str], stoi: dict[str, int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context of ``block_size`` characters, next character) pair of every word."""
    import torch

    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    X = torch.tensor(X, dtype=torch.int64).view(-1, block_size)
    Y = torch.tensor(Y, dtype=torch.int64)
    return X, Y


def make_splits(words: list[str], block_size: int = BLOCK_SIZE, seed: int = SPLIT_SEED) -> dict:
    """The lecture's 80/10/10 split after ``random.seed(seed); random.shuffle(words)``."""
    words = list(words)
    stoi, itos = vocabulary(words)
    if len(stoi) != VOCAB_SIZE:
        raise DataError(f"the names use {len(stoi) - 1} distinct letters; the models expect all 26 of a-z")
    if len(words) < 10:
        raise DataError(f"only {len(words)} names; the 80/10/10 split needs at least 10")
    splits = {name: build_dataset(part, stoi, block_size) for name, part in _shuffled_thirds(words, seed).items()}
    return {"splits": splits, "stoi": stoi, "itos": itos, "block_size": block_size}


def _shuffled_thirds(words: list[str], seed: int) -> dict[str, list[str]]:
    words = list(words)
    rng_state = random.getstate()
    try:
        random.seed(seed)
        random.shuffle(words)
    finally:
        random.setstate(rng_state)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "dev": words[n1:n2], "test": words[n2:]}


def split_sizes(words: list[str], seed: int = SPLIT_SEED) -> dict[str, int]:
    """The examples of each split :func:`make_splits` makes, counted without building them (and without torch):
    a name of n letters gives n + 1 examples, whatever the block size."""
    return {name: sum(len(w) + 1 for w in part) for name, part in _shuffled_thirds(words, seed).items()}


# The examples per split of makemore's names.txt (the sha256 the shipped configs pin) at the lecture's split
# seed: what the workflow checks a job against while it plans, before the names are downloaded.
KNOWN_SPLIT_SIZES = {
    ("0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d", SPLIT_SEED):
        {"train": 182625, "dev": 22655, "test": 22866},
}


def planned_split_sizes(sha256: str, seed: int, candidates=()) -> dict[str, int] | None:
    """The split sizes of the names with checksum ``sha256`` at split seed ``seed``, known before the splits are
    made: from :data:`KNOWN_SPLIT_SIZES`, else from the first of ``candidates`` (a ``splits.json`` the splits
    step wrote, or a local names file) that is of these names. None if none is: the training job checks then.
    """
    sha256 = sha256.lower()
    if (sha256, seed) in KNOWN_SPLIT_SIZES:
        return dict(KNOWN_SPLIT_SIZES[(sha256, seed)])
    for path in candidates:
        path = Path(path)
        try:
            if path.suffix == ".json":
                summary = json.loads(path.read_text())
                if summary.get("data_sha256") == sha256 and summary.get("split_seed") == seed:
                    return {k: int(v) for k, v in summary["examples"].items()}
                continue
            data = path.read_bytes()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not there or not readable: the steps that read it say so
        if sha256_of(data) == sha256:
            try:
                return split_sizes(validate_names(data, str(path)), seed)
            except DataError:
                return None
    return None


def save_splits(names_path: str | os.PathLike, out_tensors: str | os.PathLike, out_summary: str | os.PathLike,
                block_size: int = BLOCK_SIZE, seed: int = SPLIT_SEED) -> dict:
    import torch

    names_path = Path(names_path)
    data = names_path.read_bytes()
    words = validate_names(data, str(names_path))
    try:
        built = make_splits(words, block_size, seed)
    except DataError as e:
        raise DataError(f"{names_path}: {e}") from None
    payload = {f"X{name}": xy[0] for name, xy in built["splits"].items()}
    payload.update({f"Y{name}": xy[1] for name, xy in built["splits"].items()})
    payload["itos"] = built["itos"]
    payload["block_size"] = block_size
    summary = {
        "names": len(words),
        "block_size": block_size,
        "split_seed": seed,
        "examples": {name: int(xy[1].shape[0]) for name, xy in built["splits"].items()},
        "vocabulary": "".join(built["itos"][i] for i in range(len(built["itos"]))),
        "data_sha256": sha256_of(data),
    }
    out_tensors = Path(out_tensors)
    out_tensors.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_tensors.with_name(f".{out_tensors.name}.part")
    torch.save(payload, tmp)
    os.replace(tmp, out_tensors)
    atomic_write_bytes(out_summary, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def load_splits(path: str | os.PathLike) -> dict:
    import torch

    return torch.load(path, weights_only=True)
