"""Regression gate (lifecycle/metric_gate.py): regressions fail, improvements and exact
runs pass."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from bonedamage.cli import main
from bonedamage.lifecycle import metric_gate as gate
from conftest import REPO

TISSUES = ["cortical", "trabecular"]
CFG = {
    "models": ["cnn", "baseline"],
    "metrics": {"balanced_accuracy": 0.02, "roc_auc": 0.02},
    "cross_platform": {"balanced_accuracy": 0.08, "roc_auc": 0.05},
}
METRICS = {
    "cnn": {"balanced_accuracy": 0.95, "roc_auc": 0.98, "scan_rule": "mean"},
    "baseline": {"balanced_accuracy": 0.80, "roc_auc": 0.85},
}


def lock(raw_md5: str = "aaa", lr: float = 0.001) -> str:
    stages = {
        "tile": {
            "cmd": "bonedamage tile",
            "deps": [{"path": "data/raw", "md5": raw_md5}],
            "outs": [{"path": "data/tiles", "md5": "t1"}],
        },
        "evaluate@cortical": {
            "cmd": "bonedamage evaluate --tissue cortical",
            "deps": [
                {"path": "data/tiles", "md5": "t1"},
                {"path": "src/bonedamage/learn/scoring.py", "md5": "e1"},
            ],
            "params": {"params.yaml": {"train": {"lr": lr}}},
            "outs": [{"path": "metrics/cortical.json", "md5": "m1"}],
        },
    }
    return yaml.safe_dump({"schema": "2.0", "stages": stages})


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def write(repo: Path, metrics: dict[str, dict], lock_text: str) -> None:
    (repo / "metrics").mkdir(exist_ok=True)
    for tissue, m in metrics.items():
        (repo / "metrics" / f"{tissue}.json").write_text(json.dumps(m))
    (repo / "dvc.lock").write_text(lock_text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.org")
    git(root, "config", "user.name", "t")
    write(root, {"cortical": METRICS, "trabecular": METRICS}, lock())
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    return root


def changed(metric: float) -> dict:
    return {**METRICS, "cnn": {**METRICS["cnn"], "balanced_accuracy": metric}}


def test_exact_reproduction_passes_and_says_so(repo: Path) -> None:
    report = gate.gate_report(repo, CFG, TISSUES)
    assert report.passed and report.same_inputs
    assert {r.verdict for r in report.rows} == {"exact"}
    assert len(report.rows) == 2 * 2 * 2
    assert "reproduced exactly" in report.to_markdown()


def test_an_injected_regression_fails_with_the_drop_in_the_table(repo: Path, capsys) -> None:
    # lr 0 committed: inputs differ, and the CNN falls to chance
    write(repo, {"cortical": changed(0.5), "trabecular": METRICS}, lock(lr=0.0))
    out = repo / "gate-report"
    code = main(["gate", "--repo", str(repo), "--out", str(out), "--params", str(params(repo))])
    printed = capsys.readouterr()
    assert code == 1
    assert "| cortical | cnn | balanced_accuracy | 0.9500 | 0.5000 | -0.4500 |" in printed.out
    assert "REGRESSION" in printed.out and "dropped beyond tolerance" in printed.err
    saved = json.loads((out / "gate.json").read_text())
    assert saved["passed"] is False and saved["regressions"] == 1
    assert (out / "gate.md").read_text().startswith("### Regression gate: FAILED")


def params(repo: Path) -> Path:
    """A params file with the sections gate reads: the repository's pipeline, and CFG."""
    pipeline = yaml.safe_load((REPO / "params.yaml").read_text())["pipeline"]
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {**pipeline, "tissues": TISSUES}, "gate": CFG}))
    return path


def test_an_improvement_and_a_drop_within_tolerance_pass(repo: Path) -> None:
    write(repo, {"cortical": changed(0.97), "trabecular": changed(0.94)}, lock(lr=0.002))
    report = gate.gate_report(repo, CFG, TISSUES)
    verdicts = {(r.tissue, r.model, r.metric): r.verdict for r in report.rows}
    assert verdicts[("cortical", "cnn", "balanced_accuracy")] == "improved"
    assert verdicts[("trabecular", "cnn", "balanced_accuracy")] == "within tolerance"
    assert report.passed and not report.same_inputs


def test_same_inputs_but_different_metrics_is_a_reproducibility_failure(repo: Path) -> None:
    # data, code and params as committed, yet a metric moved (inside the tolerance)
    write(repo, {"cortical": changed(0.949), "trabecular": METRICS}, lock())
    report = gate.gate_report(repo, CFG, TISSUES)
    assert report.same_inputs and not report.regressions
    assert [r.model for r in report.not_reproduced] == ["cnn"]
    assert not report.passed
    assert "NOT reproduced exactly" in report.to_markdown()


def test_other_raw_data_is_not_the_same_inputs(repo: Path) -> None:
    write(repo, {"cortical": changed(0.949), "trabecular": METRICS}, lock(raw_md5="bbb"))
    report = gate.gate_report(repo, CFG, TISSUES)
    assert not report.same_inputs and report.passed


@pytest.mark.parametrize(
    ("new", "message"),
    [
        ({"cnn": {"balanced_accuracy": 0.9}, "baseline": METRICS["baseline"]}, "cnn.roc_auc"),
        ({"cnn": {**METRICS["cnn"], "roc_auc": None}, "baseline": METRICS["baseline"]}, "None"),
        ({"baseline": METRICS["baseline"]}, "no cnn.balanced_accuracy"),
    ],
)
def test_a_missing_metric_is_an_error_not_a_pass(repo: Path, new: dict, message: str) -> None:
    write(repo, {"cortical": new, "trabecular": METRICS}, lock())
    with pytest.raises(gate.GateError, match=message):
        gate.gate_report(repo, CFG, TISSUES)


def test_missing_files_and_baselines_exit_2_naming_them(repo: Path, capsys) -> None:
    (repo / "metrics" / "trabecular.json").unlink()
    assert main(["gate", "--repo", str(repo), "--params", str(params(repo))]) == 2
    assert "trabecular.json: no such metrics file" in capsys.readouterr().err
    write(repo, {"trabecular": METRICS}, lock())
    code = main(["gate", "--repo", str(repo), "--rev", "nope", "--params", str(params(repo))])
    assert code == 2 and "git show nope:" in capsys.readouterr().err


def test_a_baseline_folder_instead_of_a_revision(repo: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for tissue in TISSUES:
        (base / f"{tissue}.json").write_text(json.dumps(changed(0.99)))
    report = gate.gate_report(repo, CFG, TISSUES, baseline_dir=base)
    assert [r.verdict for r in report.regressions] == ["REGRESSION"] * 2
    assert not report.same_inputs  # no lock file to compare with


AMD = {"torch": "2.14.1", "device": "cpu AVX2", "cpu": "AuthenticAMD family 25 model 1"}
INTEL = {"torch": "2.14.1", "device": "cpu AVX512", "cpu": "GenuineIntel family 6 model 106"}


def on(platform: dict, metrics: dict) -> dict:
    return {**metrics, "platform": platform}


@pytest.fixture
def amd_repo(repo: Path) -> Path:
    write(repo, {t: on(AMD, METRICS) for t in TISSUES}, lock())
    git(repo, "commit", "-qam", "results made on the AMD machine")
    return repo


def test_the_same_platform_still_requires_exact_reproduction(amd_repo: Path) -> None:
    write(amd_repo, {"cortical": on(AMD, changed(0.949)), "trabecular": on(AMD, METRICS)}, lock())
    report = gate.gate_report(amd_repo, CFG, TISSUES)
    assert report.same_inputs and report.same_platform
    assert [r.model for r in report.not_reproduced] == ["cnn"] and not report.passed


def test_another_platform_is_held_to_the_cross_platform_tolerances(amd_repo: Path) -> None:
    # the same inputs on an Intel CPU: -0.05 would fail the 0.02 tolerance, not the 0.08 one
    write(
        amd_repo, {"cortical": on(INTEL, changed(0.90)), "trabecular": on(INTEL, METRICS)}, lock()
    )
    report = gate.gate_report(amd_repo, CFG, TISSUES)
    assert report.same_inputs and not report.same_platform
    assert report.passed and not report.not_reproduced
    row = next(r for r in report.rows if r.verdict == "within tolerance")
    assert (row.tissue, row.model, row.tolerance) == ("cortical", "cnn", 0.08)
    text = report.to_markdown()
    assert "Platform differs" in text and "GenuineIntel family 6 model 106" in text
    saved = json.loads(report.to_json())
    assert saved["same_platform"] is False and saved["platforms"]["new"] == INTEL
    # ... and a real regression still fails there
    write(
        amd_repo, {"cortical": on(INTEL, changed(0.85)), "trabecular": on(INTEL, METRICS)}, lock()
    )
    assert [r.tissue for r in gate.gate_report(amd_repo, CFG, TISSUES).regressions] == ["cortical"]


def test_no_cross_platform_tolerances_is_an_error_naming_the_setting(amd_repo: Path) -> None:
    write(amd_repo, {t: on(INTEL, METRICS) for t in TISSUES}, lock())
    cfg = {k: v for k, v in CFG.items() if k != "cross_platform"}
    with pytest.raises(gate.GateError, match=r"gate\.cross_platform: missing"):
        gate.gate_report(amd_repo, cfg, TISSUES)
    assert gate.gate_report(amd_repo, CFG, TISSUES).passed


def test_a_platform_recorded_on_one_side_only_counts_as_another(repo: Path) -> None:
    write(repo, {t: on(AMD, METRICS) for t in TISSUES}, lock())
    report = gate.gate_report(repo, CFG, TISSUES)  # the committed baseline recorded none
    assert not report.same_platform and report.passed
    assert "not recorded" in report.to_markdown()


def test_the_repo_gate_names_what_evaluate_writes(params: dict) -> None:
    cfg = params["gate"]
    assert set(cfg["models"]) <= {
        "cnn",
        "baseline",
        *(f"resnet_{i}" for i in params["resnet"]["inits"]),
    }
    repo = REPO
    for tissue in params["pipeline"]["tissues"]:
        committed = json.loads((repo / "metrics" / f"{tissue}.json").read_text())
        for model in cfg["models"]:
            assert set(cfg["metrics"]) <= set(committed[model])


# -- the report folder: gate's own, never its inputs -----------------------------------------
def test_gate_replaces_only_its_own_report_folder(repo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "gate.md").write_text("a reviewer's notes, not a gate report")
    args = ["gate", "--repo", str(repo), "--out", str(out), "--params", str(params(repo))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: exists and holds files that bonedamage did not write")
    assert [p.name for p in out.iterdir()] == ["gate.md"]
    assert (out / "gate.md").read_text() == "a reviewer's notes, not a gate report"
    assert main([*args, "--force"]) == 0
    assert main(args) == 0  # its own report: replaced
    assert json.loads((out / "gate.json").read_text())["passed"] is True
    assert (out / "gate.md").read_text().startswith("### Regression gate")


@pytest.mark.parametrize("where", ["metrics", "inside-metrics", "repo", "baseline"])
def test_gate_never_writes_over_or_around_its_inputs_even_with_force(
    where: str, repo: Path, tmp_path: Path, capsys
) -> None:
    """Once: `gate --out metrics` wrote gate.json and gate.md among the metrics it read."""
    base = tmp_path / "base"
    base.mkdir()
    for tissue in TISSUES:
        (base / f"{tissue}.json").write_text(json.dumps(METRICS))
    out = {"metrics": repo / "metrics", "inside-metrics": repo / "metrics" / "gate",
           "repo": repo, "baseline": base}[where]  # fmt: skip
    pfile = params(repo)
    before = {p: p.read_bytes() for p in [*repo.rglob("*"), *base.rglob("*")] if p.is_file()}
    for force in ((), ("--force",)):
        code = main(["gate", "--repo", str(repo), "--baseline", str(base), "--out", str(out),
                     "--params", str(pfile), *force])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {out}: output folder "), err
        assert "input" in err, err
    after = {p: p.read_bytes() for p in [*repo.rglob("*"), *base.rglob("*")] if p.is_file()}
    assert after == before
