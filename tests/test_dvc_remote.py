"""DVC remote round trip: push from one checkout, pull into a fresh clone, nothing to redo.

A tiny copy of the repository's layout (``data.dvc`` tracking ``data/raw``, a pipeline
stage reading it, a default local remote at a path relative to ``.dvc/`` as in
``.dvc/config``) goes through what a new machine does: ``git clone`` then ``dvc pull``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

DVC = str(Path(sys.executable).with_name("dvc"))
# the stage: a one-liner that summarises data/raw (as the describe stage does, in small)
SUMMARY = (
    "python -c \"import json, pathlib; fs = sorted(p for p in pathlib.Path('data/raw')"
    ".rglob('*') if p.is_file()); pathlib.Path('metrics').mkdir(exist_ok=True); "
    "pathlib.Path('metrics/data.json').write_text(json.dumps({'files': len(fs), "
    "'bytes': sum(p.stat().st_size for p in fs)}))\""
)


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_then_pull_into_a_fresh_clone_is_byte_identical_and_up_to_date(tmp_path) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1")
    env["HOME"] = str(tmp_path / "home")  # no user-wide git or DVC config
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    sh(["git", "init", "-q"], repo, env)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com")):
        sh(["git", "config", key, value], repo, env)
    sh(["git", "config", "commit.gpgsign", "false"], repo, env)
    sh([DVC, "init", "-q"], repo, env)

    raw = repo / "data" / "raw"
    rng = random.Random(0)
    (raw / "trabecular-01" / "pristine").mkdir(parents=True)
    (raw / "manifest.csv").write_text("scan_id,path\nt01-p,trabecular-01/pristine/scan.tif\n")
    (raw / "trabecular-01" / "pristine" / "scan.tif").write_bytes(rng.randbytes(200_000))
    (raw / "trabecular-01" / "pristine" / "empty.tif").write_bytes(b"")
    sh([DVC, "add", "-q", "data/raw"], repo, env)
    # the repository's layout: data.dvc at the root tracks data/raw
    record = yaml.safe_load((repo / "data" / "raw.dvc").read_text())
    record["outs"][0]["path"] = "data/raw"
    (repo / "data.dvc").write_text(yaml.safe_dump(record, sort_keys=False))
    (repo / "data" / "raw.dvc").unlink()
    sh([DVC, "stage", "add", "-q", "-n", "describe", "-d", "data/raw", "-o", "metrics/data.json",
        SUMMARY], repo, env)  # fmt: skip
    sh([DVC, "repro", "-q"], repo, env)
    summary = json.loads((repo / "metrics" / "data.json").read_text())
    assert summary == {"files": 3, "bytes": sum(len(b) for b in files(raw).values())}
    sh([DVC, "remote", "add", "-d", "local", "../remote"], repo, env)  # relative, like ours
    assert "../../remote" in (repo / ".dvc" / "config").read_text()
    sh([DVC, "push", "-q"], repo, env)
    assert any(p.is_file() for p in (tmp_path / "remote").rglob("*"))
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "data, pipeline and remote"], repo, env)
    expected = {**files(raw), "metrics/data.json": (repo / "metrics/data.json").read_bytes()}

    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    # git carries the pointers only
    assert not (clone / "data" / "raw").exists() and not (clone / "metrics/data.json").exists()
    shutil.rmtree(repo)  # whatever the clone gets now comes from the remote
    sh([DVC, "pull", "-q"], clone, env)
    got = {
        **files(clone / "data" / "raw"),
        "metrics/data.json": (clone / "metrics/data.json").read_bytes(),
    }
    assert got == expected

    assert "up to date" in sh([DVC, "status"], clone, env)
    assert json.loads(sh([DVC, "status", "--json"], clone, env)) == {}
    assert json.loads(sh([DVC, "status", "--cloud", "--json"], clone, env)) == {}
    before = (clone / "metrics" / "data.json").stat().st_mtime_ns
    out = sh([DVC, "repro"], clone, env)
    assert "didn't change" in out and "Running stage" not in out, out
    assert (clone / "metrics" / "data.json").stat().st_mtime_ns == before

    # the status is not blind: an edited scan is reported, and the stage would re-run
    (clone / "data" / "raw" / "manifest.csv").write_text("scan_id,path\n")
    changed = json.loads(sh([DVC, "status", "--json"], clone, env))
    assert set(changed) >= {"data.dvc", "describe"}, changed
