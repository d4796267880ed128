"""Atomic file output, and the guards of what a command may overwrite or must find.

Write to a temporary sibling, rename into place on success: a killed or failing writer
never leaves a half-written file under the final name, so DVC never caches a truncated
output and a re-run starts clean. A SIGKILLed writer cannot remove its temporary sibling;
the name carries the writer's process id and host (``.<name>.<pid>-<host>.<random>.tmp``),
and the next writer of the same target removes the siblings of processes that are gone
from this host. Live ones may be concurrent writers, and another host's (on a shared file
system) cannot be judged from here; hosts that share a name must not share a pid
namespace (containers writing one checkout). Files and folders come out with the mode an
ordinary ``open()`` or ``mkdir`` gives under the process umask (``mkstemp`` and
``mkdtemp`` make them private).

A folder output is replaced as a whole (:func:`atomic_dir`), so it must be the command's
own: a marker file (:data:`MARKER`, ignored by DVC through ``.dvcignore``) names the
command that wrote it and lists what it wrote. An existing folder holding anything else
(another command's output, files a user put there, a folder without a marker) is refused
with :class:`OutputError` unless ``force``; an output that is, lies inside or contains an
input (or the working directory) is refused always. A single-file output may not be a
folder or an input, nor lie inside an input folder (:func:`check_output_file`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MARKER = ".bonedamage-output"  # in .dvcignore: the hashes of DVC outputs never include it

Paths = Iterable[str | os.PathLike[str] | None]


class OutputError(ValueError):
    """An output location a command must not write: it holds what the command did not
    write (refused unless ``force``), or it is, lies inside or contains an input."""


class InputError(ValueError):
    """An input file or folder a command cannot read: missing, empty or of another kind."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def host_label() -> str:
    """This host's name as it appears in temporary names (no dots)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def current_umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_siblings(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by writers that were killed; return
    them. A sibling is stale when its name carries this host and a process id that no
    longer exists here."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-([A-Za-z0-9-]+)\.[^.]+\.tmp")
    removed, host = [], host_label()
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None or match[2] != host or pid_alive(int(match[1])):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-{host_label()}."


def _absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without following links (``.`` and ``..`` resolved)."""
    return Path(os.path.abspath(path))


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inputs(inputs: Paths) -> list[Path]:
    return [Path(p) for p in inputs if p is not None and str(p) != ""]


def _relation(target: Path, inputs: Paths) -> str | None:
    """How ``target`` collides with an input or the working directory, or None."""
    out = _real(target)
    if out.parent == out:
        return "is the root of the file system"
    for given in _inputs(inputs):
        src = _real(_absolute(given))
        same = out == src
        if not same and target.exists() and src.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(target, src)
        if same:
            return f"is the input {given}"
        if out.is_relative_to(src):
            return f"lies inside the input {given}"
        if src.is_relative_to(out):
            return f"contains the input {given}"
    cwd = _real(Path.cwd())
    if cwd.is_relative_to(out):
        return "is or contains the working directory"
    return None


def read_marker(folder: str | os.PathLike[str]) -> tuple[str, set[str]] | None:
    """(command, entries it wrote) of a folder a command wrote wholesale, None without one."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        return str(data["command"]), {str(e) for e in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative POSIX paths), the marker left out."""
    found = []
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder)
        found += [(rel / name).as_posix() for name in (*dirs, *files)]
    return sorted(e for e in found if e != MARKER)


def write_marker(folder: str | os.PathLike[str], owner: str) -> Path:
    """Record that ``owner`` (a command) wrote everything now in ``folder``."""
    folder = Path(folder)
    text = json.dumps({"command": owner, "entries": _entries(folder)}, indent=0) + "\n"
    (folder / MARKER).write_text(text, encoding="utf-8")
    return folder / MARKER


def _foreign(target: Path, owner: str) -> str | None:
    """Why ``target`` is not ``owner``'s to replace, or None (absent, no files, or all of
    it written by ``owner`` before)."""
    if target.is_symlink():
        return "is a symbolic link"
    if target.exists() and not target.is_dir():
        return "exists and is not a folder"
    if not target.exists():
        return None
    entries = _entries(target)
    if not any((target / e).is_file() or (target / e).is_symlink() for e in entries):
        return None  # empty, or nothing but empty folders
    mark = read_marker(target)
    if mark is None:
        return "exists and holds files that bonedamage did not write"
    command, written = mark
    if command != owner:
        return f"holds the output of `bonedamage {command}`, not of `bonedamage {owner}`"
    extra = [e for e in entries if e not in written]
    if extra:
        shown = ", ".join(extra[:3]) + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
        return f"holds files that `bonedamage {owner}` did not write: {shown}"
    return None


def check_output_dir(
    target: str | os.PathLike[str], *, owner: str, inputs: Paths = (), force: bool = False
) -> None:
    """Raise :class:`OutputError` unless ``owner`` may replace the folder ``target``."""
    name, target = os.fspath(target), _absolute(target)
    clash = _relation(target, inputs)
    if clash:
        raise OutputError(f"{name}: output folder {clash}; choose another output folder")
    why = None if force else _foreign(target, owner)
    if why:
        raise OutputError(
            f"{name}: {why}; `bonedamage {owner}` replaces its output folder as a whole. "
            "Choose a new or empty folder, or pass --force to replace it"
        )


def check_output_file(target: str | os.PathLike[str], *, inputs: Paths = ()) -> None:
    """Raise :class:`OutputError` when the file output ``target`` is a folder, an input or
    lies inside an input folder."""
    name, path = os.fspath(target), _absolute(target)
    if path.is_dir():
        raise OutputError(f"{name}: is a folder; give the output file's name")
    clash = _relation(path, inputs)
    if clash and not clash.startswith("contains"):
        raise OutputError(f"{name}: output file {clash}; choose another output file")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` if the block succeeds."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give the output file's name")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.chmod(0o666 & ~current_umask())  # mkstemp makes it private
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str], *, owner: str, inputs: Paths = (), force: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; it replaces ``target`` on success.

    ``owner`` is the command that writes the folder: it may replace an existing ``target``
    only when that is empty or its own earlier output (the marker says so), or ``force``.
    ``target`` may never be, lie inside or contain one of ``inputs``. Checked before
    anything is written and again just before the swap (files put into ``target`` while
    the command ran are not deleted); the marker is written into the new folder first.
    """
    check_output_dir(target, owner=owner, inputs=inputs, force=force)
    target = _absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        yield tmp
        write_marker(tmp, owner)
        # again: someone may have put files into the folder while the command ran
        check_output_dir(target, owner=owner, inputs=inputs, force=force)
        if target.exists() or target.is_symlink():
            old = target.with_name(_prefix(target) + "old.tmp")  # a name only this writer uses
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8, ``\\n`` line ends)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def require(path: str | os.PathLike[str], what: str, *, folder: bool | None = False) -> Path:
    """``path`` as a Path when it is an existing non-empty file (a folder when ``folder``,
    either when None); else :class:`InputError` naming it and ``what`` it should be."""
    path = Path(path)
    if not path.exists():
        kind = {True: "folder", False: "file", None: "file or folder"}[folder]
        raise InputError(f"{path}: no such {kind} ({what})")
    if folder is None:
        folder = path.is_dir()
    if folder and not path.is_dir():
        raise InputError(f"{path}: is a file; expected a folder ({what})")
    if not folder and path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file ({what})")
    if not folder and path.stat().st_size == 0:
        raise InputError(f"{path}: is empty ({what})")
    return path


def require_parquet(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` when it is a readable Parquet table, else :class:`InputError`."""
    path = require(path, what)
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(max(path.stat().st_size - 4, 0))
        tail = fh.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise InputError(f"{path}: not a Parquet table ({what})")
    return path


def require_json(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` when it holds a JSON object, else :class:`InputError`."""
    path = require(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({what}: {exc})") from exc
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object ({what})")
    return path


def read_parquet(path: str | os.PathLike[str], what: str):  # -> pandas.DataFrame
    """The Parquet table at ``path``; :class:`InputError` when it cannot be read."""
    import pandas as pd
    import pyarrow as pa

    path = require_parquet(path, what)
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable Parquet table ({what}: {exc})") from exc


def require_sqlite(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` when it is absent, empty or an SQLite database, else :class:`InputError`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected an SQLite database file ({what})")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                raise InputError(f"{path}: not an SQLite database ({what})")
    return path
