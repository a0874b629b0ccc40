"""The diagnosis through the real workflow: a tiny clinic (the lecture's good networks beside planted faults) where
each fault is found and no good network is flagged severe; the prescriptions `actgrad diagnose --write-fixes` writes
validate, train, and come back as a before/after table; the report shows it all in headless Chromium."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from conftest import NAMES_SHA256, run_snakemake, write_config

from actgrad.cli import main as actgrad

pytestmark = pytest.mark.slow

KAIMING = {"C": 1, "W1": "kaiming", "b1": 0.01, "W2": 0.01, "b2": 0}
SCHEDULE = [{"from_step": 0, "lr": 0.1}, {"from_step": 150, "lr": 0.01}]
GOOD = {
    "fix_tanh": {"init": {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}},
    "kaiming": {"init": KAIMING},
    "batchnorm": {"batchnorm": True, "hidden_bias": "not_drawn",
                  "init": {"C": 1, "W1": "kaiming", "W2": 0.01, "b2": 0}},
    "deep_gain5_3": {"model": "deep", "batchnorm": False, "gain": 5 / 3},
    "deep_bn_gain5_3": {"model": "deep", "batchnorm": True, "gain": 5 / 3},
}
# fault -> (variant, the finding it must raise)
FAULTS = {
    "overconfident": ({"init": {**KAIMING, "W2": 1, "b2": 1}}, "overconfident_output"),
    "saturated": ({"init": {"C": 1, "W1": 1, "b1": 1, "W2": 0.01, "b2": 0}}, "saturated_activations"),
    "vanishing": ({"model": "deep", "batchnorm": False, "gain": 0.5}, "vanishing_gradients"),
    "exploding": ({"model": "deep", "batchnorm": False, "activation": "relu", "gain": 2.0}, "exploding_gradients"),
    "slow": ({"init": KAIMING, "lr_schedule": [{"from_step": 0, "lr": 0.0005}]}, "learning_rate_too_low"),
    "dead": ({"activation": "relu", "init": {**KAIMING, "b1": 10}}, "dead_units"),
    # the running statistics break only after a few thousand steps at batch 4 (cheap steps)
    "tiny_batch": ({"model": "deep", "batchnorm": True, "gain": 1.0, "batch_size": 4, "max_steps": 3000,
                    "lr_schedule": [{"from_step": 0, "lr": 0.1}, {"from_step": 1500, "lr": 0.01}]},
                   "batchnorm_running_statistics"),
}


def clinic_config(names) -> dict:
    return {
        "title": "tiny clinic", "names_url": str(names), "names_sha256": NAMES_SHA256, "seeds": [2147483647, 1],
        "max_steps": 300, "samples": 2, "training_jobs": "model",
        "stats": {"every": 50, "update_every": 10, "histogram_every": 200, "snapshot_steps": [0], "bins": 20},
        "variants": {**{n: {**v, "lr_schedule": v.get("lr_schedule", SCHEDULE)} for n, v in GOOD.items()},
                     **{n: {**v, "lr_schedule": v.get("lr_schedule", SCHEDULE)} for n, (v, _) in FAULTS.items()}},
    }


@pytest.fixture(scope="module")
def clinic(tmp_path_factory, names_path):
    work = tmp_path_factory.mktemp("clinic")
    study = write_config(work, clinic_config(names_path), "clinic.yaml")
    run_snakemake(work, "results/diagnosis.csv", configfile=study)
    return {"work": work, "study": study, "findings": pd.read_csv(work / "results" / "diagnosis.csv")}


def test_each_planted_fault_is_found(clinic):
    findings = clinic["findings"]
    missing = {fault: code for fault, (_, code) in FAULTS.items()
               if code not in set(findings[findings.variant == fault].code)}
    assert not missing, f"faults not found: {missing}\n{findings[['variant', 'code', 'severity']]}"


def test_the_lecture_s_good_networks_raise_no_severe_finding(clinic):
    findings = clinic["findings"]
    severe = findings[findings.variant.isin(GOOD) & (findings.severity == "severe")]
    assert severe.empty, severe[["variant", "code", "sentence"]].to_string()


def test_diagnose_prints_the_findings(clinic, capsys):
    assert actgrad(["diagnose", str(clinic["work"] / "results")]) == 0
    out = capsys.readouterr().out
    assert "SEVERE   overconfident_output" in out and "prescription: " in out


@pytest.fixture(scope="module")
def fixed(clinic):
    """The severe findings' prescriptions written, trained beside the clinic, and the report rendered from the
    tables (without the figures, which the report links around: the figure step is tested elsewhere)."""
    from conftest import REPO

    from actgrad.report.html import write_report
    from actgrad.study.load import load

    work = clinic["work"]
    fixes = work / "fixes.yaml"
    assert actgrad(["diagnose", str(work / "results"), "--write-fixes", str(fixes), "--study",
                    str(clinic["study"]), "--severe-only"]) == 0
    run_snakemake(work, "results/fixes.csv", configfile=fixes)
    report = write_report(load(fixes), work / "results", work / "results" / "figures",
                          REPO / "report" / "report.html.j2", work / "report.html", log=lambda _: None)
    return {"fixes": yaml.safe_load(fixes.read_text()), "table": pd.read_csv(work / "results" / "fixes.csv"),
            "report": report}


def test_the_written_fixes_train_and_come_back_before_and_after(fixed):
    variants = fixed["fixes"]["variants"]
    assert set(variants) == {f"{fault}__fixed" for fault in FAULTS}  # --severe-only: the good nets' warnings not
    table = fixed["table"]
    assert set(table.variant) == set(FAULTS)
    # each pair tested as in the significance table
    assert table.difference.notna().all() and table.verdict.ne("not compared").all()
    outcome = table.set_index(["variant", "code"]).outcome
    # the init faults are fixed by construction: their finding is gone
    for fault in ("overconfident", "saturated", "vanishing", "exploding", "dead"):
        assert outcome[(fault, FAULTS[fault][1])] == "gone", table[table.variant == fault].to_string()


@pytest.mark.browser
def test_the_report_shows_the_diagnosis_in_chromium(fixed, tmp_path):
    from test_browser import inspect_page, require_chromium

    page, problems, _ = inspect_page(require_chromium(), fixed["report"], tmp_path)
    assert problems == [] and page["links"] == [], (problems, page["links"])
    html = fixed["report"].read_text()
    assert 'id="diagnosis-list"' in html and 'id="prescriptions-table"' in html
    assert html.index('id="diagnosis"') < html.index('id="comparison"')  # near the top
    assert 'id="findings-overconfident"' in html and "overconfident output" in html
