"""Atomic outputs: a killed writer leaves no half-written target, and its leftovers go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bonedamage.atomic import (
    MARKER,
    OutputError,
    atomic_dir,
    atomic_path,
    check_output_file,
    host_label,
    read_marker,
    remove_stale_siblings,
    write_text_atomic,
)
from conftest import REPO

HOST = host_label()

# Writes a file into an atomic staging folder of ``out`` (argv[1]), says so, then waits to be
# killed: the staging folder stays behind, as after a SIGKILLed ``tile`` or ``explain``.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from bonedamage.atomic import atomic_dir, atomic_path
out = Path(sys.argv[1])
with atomic_dir(out, owner="tile") as staging, atomic_path(out.with_name("index.json")) as tmp:
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

    with atomic_dir(out, owner="tile") as staging:
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


# -- modes: what an ordinary open()/mkdir gives under the umask, not mkstemp's 0600 ---------
@pytest.fixture
def umask():
    """Set the process umask for a test (put back after it)."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o027, 0o640, 0o750)])  # fmt: skip
def test_outputs_get_the_mode_of_the_umask(umask, tmp_path, mask, file_mode, dir_mode) -> None:
    umask(mask)
    write_text_atomic(tmp_path / "manifest.csv", "a,b\n")
    with atomic_path(tmp_path / "probability.tif") as tmp:
        tmp.write_bytes(b"II*\x00")
    with atomic_dir(tmp_path / "pred", owner="predict") as staging:
        (staging / "verdict.json").write_text("{}")
        write_text_atomic(staging / "tiles.csv", "x\n")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {
        "manifest.csv": file_mode,
        "probability.tif": file_mode,
        "pred": dir_mode,
        "verdict.json": file_mode,
        "tiles.csv": file_mode,
        MARKER: file_mode,
    }


# -- a folder output replaces only what the same command wrote -------------------------------
def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def write_folder(out: Path, owner: str, names: dict[str, str]) -> None:
    with atomic_dir(out, owner=owner) as staging:
        for name, text in names.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def test_a_command_replaces_its_own_folder_and_a_new_or_empty_one(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    write_folder(out, "tile", {"index.parquet": "1", "cortical/C1-0000.npy": "1"})
    assert read_marker(out) == ("tile", {"index.parquet", "cortical", "cortical/C1-0000.npy"})
    write_folder(out, "tile", {"index.parquet": "2"})  # its own: replaced as a whole
    assert tree(out) == {MARKER: (out / MARKER).read_bytes(), "index.parquet": b"2"}
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)  # nothing but empty folders: nothing to lose
    write_folder(empty, "validate", {"index.html": "docs"})
    assert (empty / "index.html").read_text() == "docs" and not (empty / "sub").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_files_put_into_the_folder_while_the_command_runs_are_not_deleted(tmp_path) -> None:
    out = tmp_path / "pred"
    write_folder(out, "predict", {"verdict.json": "1"})
    refused = pytest.raises(OutputError, match=r"did not write: notes\.txt")
    with refused, atomic_dir(out, owner="predict") as staging:
        (staging / "verdict.json").write_text("2")
        (out / "notes.txt").write_text("written meanwhile")  # a user, mid-run
    assert (out / "notes.txt").read_text() == "written meanwhile"
    assert (out / "verdict.json").read_text() == "1"  # the last run's output, as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_swap_never_touches_a_users_hidden_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    write_folder(out, "tile", {"index.parquet": "1"})
    (tmp_path / ".tiles.old").mkdir()  # a name a user (or another tool) may use
    (tmp_path / ".tiles.old" / "keep.txt").write_text("mine")
    write_folder(out, "tile", {"index.parquet": "2"})
    assert (tmp_path / ".tiles.old" / "keep.txt").read_text() == "mine"
    assert (out / "index.parquet").read_text() == "2"


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("user-files", "holds files that bonedamage did not write"),
        ("another-command", "holds the output of `bonedamage tile`, not of `bonedamage predict`"),
        ("file-added-later", "did not write: notes.txt"),
        ("a-file", "exists and is not a folder"),
        ("a-link", "is a symbolic link"),
    ],
)
def test_a_folder_holding_what_the_command_did_not_write_is_refused_unless_force(
    case: str, fragment: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    if case == "user-files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif case == "another-command":
        write_folder(out, "tile", {"index.parquet": "tiles"})
    elif case == "file-added-later":
        write_folder(out, "predict", {"verdict.json": "{}"})
        (out / "notes.txt").write_text("mine")
    elif case == "a-file":
        out.write_text("a file")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
        out.symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="--force") as exc, atomic_dir(out, owner="predict"):
        raise AssertionError("the block must not run")
    assert str(exc.value).startswith(f"{out}: ") and fragment in str(exc.value)
    assert tree(tmp_path) == before  # nothing written, nothing staged
    with atomic_dir(out, owner="predict", force=True) as staging:
        (staging / "verdict.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "verdict.json"]
    if case == "a-link":  # the link was replaced, not what it points to
        assert not out.is_symlink() and (tmp_path / "elsewhere" / "keep.txt").is_file()


INPUT_CLASHES = ["is-the-scan-file", "is-the-scan-folder", "inside-an-input",
                 "contains-an-input", "link-to-an-input", "working-dir"]  # fmt: skip


@pytest.mark.parametrize("case", INPUT_CLASHES)
def test_an_output_folder_that_is_inside_or_contains_an_input_is_refused_even_with_force(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = tmp_path / "data" / "scan.tif"
    slices = tmp_path / "data" / "slices"
    slices.mkdir(parents=True)
    scan.write_bytes(b"II*\x00 a scan")
    (slices / "s0.tif").write_bytes(b"II*\x00 a slice")
    inputs = [scan, slices]
    out = {
        "is-the-scan-file": scan,
        "is-the-scan-folder": slices,
        "inside-an-input": slices / "pred",
        "contains-an-input": tmp_path / "data",
        "link-to-an-input": tmp_path / "link",
        "working-dir": tmp_path / "work",
    }[case]
    if case == "link-to-an-input":
        out.symlink_to(slices)
    if case == "working-dir":
        out.mkdir()
        monkeypatch.chdir(out)
        out = Path(".")
    before = tree(tmp_path)
    for force in (False, True):
        with (
            pytest.raises(OutputError, match="choose another output folder") as exc,
            atomic_dir(out, owner="predict", inputs=inputs, force=force),
        ):
            raise AssertionError("the block must not run")
        assert any(w in str(exc.value) for w in ("input", "working directory")), exc.value
        assert tree(tmp_path) == before
    assert not list(tmp_path.rglob(".*.old")) and not list(tmp_path.rglob(".*.tmp"))


def test_a_file_output_may_not_be_a_folder_or_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    with pytest.raises(OutputError, match="is a folder"), atomic_path(folder):
        raise AssertionError("the block must not run")
    with pytest.raises(OutputError, match="is a folder"):
        write_text_atomic(folder, "{}")
    assert folder.is_dir() and not list(tmp_path.glob(".*"))
    tiles, splits = tmp_path / "tiles", tmp_path / "splits.parquet"
    tiles.mkdir()
    splits.write_bytes(b"PAR1")
    for out, what in ((splits, "is the input"), (tiles / "index.parquet", "lies inside")):
        with pytest.raises(OutputError, match=f"output file {what}"):
            check_output_file(out, inputs=[tiles, splits])
    check_output_file(tmp_path / "metrics.json", inputs=[tiles, splits])  # beside them: fine


def test_dvc_does_not_see_the_marker(tmp_path: Path) -> None:
    """The repo's .dvcignore keeps the marker out of DVC's hashes: a DVC-tracked folder
    hashes the same with it as without it (dvc.lock and data.dvc stay as committed)."""
    dvc = [sys.executable, "-m", "dvc"]
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    md5 = {}
    for name, ignore in (("plain", False), ("marked", True), ("marked-no-ignore", False)):
        repo = tmp_path / name
        (repo / "data" / "tiles").mkdir(parents=True)
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
        if ignore:
            (repo / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
        (repo / "data" / "tiles" / "index.parquet").write_text("tiles")
        if name != "plain":
            (repo / "data" / "tiles" / MARKER).write_text('{"command": "tile"}')
        subprocess.run([*dvc, "add", "-q", "data/tiles"], cwd=repo, env=env, check=True)
        md5[name] = (repo / "data" / "tiles.dvc").read_text().split("md5: ")[1].split()[0]
    assert md5["marked"] == md5["plain"]
    assert md5["marked-no-ignore"] != md5["plain"]  # the check can fail
