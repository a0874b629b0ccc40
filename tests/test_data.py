"""The names download and the lecture's splits."""

import hashlib
import json

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
