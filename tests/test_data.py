"""The names download and the lecture's splits."""

import hashlib
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import NAMES_SHA256

from actgrad import data


def test_download_from_plain_path_and_file_url(names_path, tmp_path):
    for source in (str(names_path), names_path.as_uri()):
        dest = tmp_path / "names.txt"
        info = data.download_names(source, NAMES_SHA256, dest)
        assert dest.read_bytes() == names_path.read_bytes()
        assert info["names"] == 32033 and info["sha256"] == NAMES_SHA256
        dest.unlink()


def test_checksum_mismatch_names_both_hashes_and_writes_nothing(names_path, tmp_path):
    dest = tmp_path / "names.txt"
    wrong = "0" * 64
    with pytest.raises(data.DataError) as e:
        data.download_names(str(names_path), wrong, dest)
    message = str(e.value)
    assert str(names_path) in message and wrong in message and NAMES_SHA256 in message
    assert "\n" not in message
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_bad_content_names_first_offending_lines(tmp_path):
    bad = b"emma\nOlivia\nava\nmia2\n\nzoe"
    src = tmp_path / "bad.txt"
    src.write_bytes(bad)
    with pytest.raises(data.DataError, match=r"3 line\(s\).*line 2, 4, 5.*'Olivia'"):
        data.download_names(str(src), hashlib.sha256(bad).hexdigest(), tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_splits_are_the_lectures(splits):
    counts = {name: xy[0].shape[0] for name, xy in splits["splits"].items()}
    assert counts == {"train": 182625, "dev": 22655, "test": 22866}
    assert splits["itos"][0] == "." and splits["itos"][1] == "a" and splits["itos"][26] == "z"
    Xtr, Ytr = splits["splits"]["train"]
    assert Xtr.shape == (182625, 3) and Xtr.dtype == torch.int64
    # random.seed(42); random.shuffle(words) puts 'yuheng' first: its first example is '...' -> 'y'
    assert Xtr[0].tolist() == [0, 0, 0] and splits["itos"][Ytr[0].item()] == "y"
    assert "".join(splits["itos"][i] for i in Ytr[:7].tolist()) == "yuheng."


def test_splits_are_deterministic_and_leave_global_random_alone(names_path):
    import random

    words = data.read_names(names_path)
    random.seed(0)
    before = random.random()
    random.seed(0)
    a = data.make_splits(words)
    after = random.random()
    b = data.make_splits(words)
    assert before == after
    for name in ("train", "dev", "test"):
        assert torch.equal(a["splits"][name][0], b["splits"][name][0])
        assert torch.equal(a["splits"][name][1], b["splits"][name][1])


def test_saved_splits_round_trip_with_summary(names_path, tmp_path):
    summary = data.save_splits(names_path, tmp_path / "splits.pt", tmp_path / "splits.json")
    assert json.loads((tmp_path / "splits.json").read_text()) == summary
    assert summary["examples"] == {"train": 182625, "dev": 22655, "test": 22866}
    assert summary["vocabulary"] == ".abcdefghijklmnopqrstuvwxyz"
    assert summary["data_sha256"] == NAMES_SHA256
    loaded = data.load_splits(tmp_path / "splits.pt")
    assert loaded["Xtrain"].shape == (182625, 3) and loaded["block_size"] == 3


# ---------------------------------------------------------------------------------------------
# a server that accepts the connection and then never answers (or answers a byte at a time)
# ---------------------------------------------------------------------------------------------


@contextmanager
def silent_server(drip: float | None = None, lifetime: float = 45.0):
    """A loopback server that accepts every connection and never answers it, or with ``drip``
    sends a response whose body comes one byte every ``drip`` seconds. It stops by itself after
    ``lifetime`` seconds, and when the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    accepted = []

    def serve():
        end = time.monotonic() + lifetime
        while not stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)
            if drip is not None:
                threading.Thread(target=dribble, args=(conn, end), daemon=True).start()
        for conn in accepted:
            conn.close()
        listener.close()

    def dribble(conn, end):
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            while not stop.is_set() and time.monotonic() < end:
                conn.sendall(b"a")
                time.sleep(drip)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/names.txt", accepted
    finally:
        stop.set()
        thread.join(5)


def test_a_server_that_never_answers_is_given_up_on_by_the_deadline(tmp_path):
    with silent_server() as (url, accepted):
        start = time.monotonic()
        with pytest.raises(data.DataError) as e:
            data.download_names(url, NAMES_SHA256, tmp_path / "names.txt", timeout=1.0, deadline=3.0, backoff=0.1)
        elapsed = time.monotonic() - start
    message = str(e.value)
    assert elapsed < 3.5, elapsed
    assert len(accepted) >= 2  # it was tried again within the deadline
    assert message.startswith(f"{url}: no answer from the server (timed out) after ") and "\n" not in message
    assert message.endswith("; to use a local copy instead: --config names_url=/path/to/names.txt"), message
    assert not (tmp_path / "names.txt").exists()


def test_a_server_that_answers_a_byte_at_a_time_is_given_up_on_by_the_deadline(tmp_path):
    """Each byte comes well within the per-try timeout; only the deadline over the whole read stops it."""
    with silent_server(drip=0.2) as (url, _):
        start = time.monotonic()
        with pytest.raises(data.DataError, match=r"no answer from the server \(timed out\).*names_url="):
            data.download_names(url, NAMES_SHA256, tmp_path / "names.txt", timeout=1.0, deadline=2.0, retries=0)
        assert time.monotonic() - start < 2.5
    assert not (tmp_path / "names.txt").exists()


@pytest.mark.slow
def test_with_the_default_settings_a_hung_download_fails_within_30_seconds(tmp_path):
    with silent_server() as (url, accepted):
        start = time.monotonic()
        with pytest.raises(data.DataError, match=r"no answer .* after \d tries \(30 s\); to use a local copy"):
            data.download_names(url, NAMES_SHA256, tmp_path / "names.txt")
        elapsed = time.monotonic() - start
    assert elapsed <= 30.5, elapsed
    assert len(accepted) >= 2
