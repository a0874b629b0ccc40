"""The names are known by their checksum: where they come from does not matter to what reruns."""

from __future__ import annotations

import shutil

import pytest
import yaml
from finished_study import copy_of, finished_study, planned_rules


@pytest.mark.slow
def test_a_local_copy_of_the_same_bytes_reruns_nothing(tmp_path_factory, tmp_path, names_path):
    work = copy_of(finished_study(tmp_path_factory), tmp_path)
    copy = shutil.copy(names_path, tmp_path / "my-names.txt")
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["names_url"] = f"file://{copy}"
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_rules(work) == []
    # ... while other bytes (a new checksum) do rerun the download
    config["names_sha256"] = "0" * 63 + "1"
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "download" in planned_rules(work)
