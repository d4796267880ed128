"""Atomic outputs: a killed writer leaves no half-written target, and its leftovers go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bonedamage.atomic import (
    atomic_dir,
    atomic_path,
    host_label,
    remove_stale_siblings,
    write_text_atomic,
)

HOST = host_label()

# Writes a file into an atomic staging folder of ``out`` (argv[1]), says so, then waits to be
# killed: the staging folder stays behind, as after a SIGKILLed ``tile`` or ``explain``.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from bonedamage.atomic import atomic_dir, atomic_path
out = Path(sys.argv[1])
with atomic_dir(out) as staging, atomic_path(out.with_name("index.json")) as tmp:
    (staging / "chunk.npy").write_bytes(b"half")
    tmp.write_text("half")
    print("staged", flush=True)
    time.sleep(60)
"""


def killed_writer(out: Path) -> tuple[int, list[Path]]:
    """Run KILLED_WRITER on ``out``, SIGKILL it mid-write; return its pid and what it left."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "staged\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.pid, sorted(out.parent.glob(".*.tmp"))


def test_a_killed_writer_leaves_no_target_and_the_next_writer_removes_its_leftovers(
    tmp_path: Path,
) -> None:
    out = tmp_path / "tiles"
    pid, left = killed_writer(out)
    assert not out.exists() and not (tmp_path / "index.json").exists()
    # .<target>.<pid>-<host>.<random>.tmp
    prefixes = [p.name[: p.name.rindex(".", 0, -4)] for p in left]
    assert prefixes == [f".index.json.{pid}-{HOST}", f".tiles.{pid}-{HOST}"], left

    with atomic_dir(out) as staging:
        (staging / "chunk.npy").write_bytes(b"whole")
    assert (out / "chunk.npy").read_bytes() == b"whole"
    write_text_atomic(tmp_path / "index.json", "whole")
    assert (tmp_path / "index.json").read_text() == "whole"
    assert not list(tmp_path.glob(".*.tmp")), "the killed writer's staging is still there"


def test_only_leftovers_of_dead_processes_of_the_same_target_are_removed(
    tmp_path: Path,
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getpid()
    names = {
        f".tiles.{dead.pid}-{HOST}.abc123_x.tmp": False,  # a killed writer of `tiles`: removed
        f".tiles.{live}-{HOST}.abc123_x.tmp": True,  # a writer still running: kept
        f".tiles.{dead.pid}-not-{HOST}.abc123_x.tmp": True,  # another host's: not judged
        f".tiles.7.{dead.pid}-{HOST}.abc123_x.tmp": True,  # a writer of `tiles.7`: not ours
        ".tiles.old.tmp": True,  # no process id: not ours to judge
        f".other.{dead.pid}-{HOST}.abc123_x.tmp": True,  # another target
    }
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_stale_siblings(tmp_path / "tiles")
    assert [p.name for p in removed] == [f".tiles.{dead.pid}-{HOST}.abc123_x.tmp"]
    assert {n: (tmp_path / n).exists() for n in names} == names


def test_a_failing_block_leaves_the_old_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(".*.tmp"))
