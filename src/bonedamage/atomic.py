"""Atomic file output: write to a temporary sibling, rename into place on success.

A killed or failing writer never leaves a half-written file under the final name, so
DVC never caches a truncated output and a re-run starts clean. A SIGKILLed writer cannot
remove its temporary sibling; the name carries the writer's process id and host
(``.<name>.<pid>-<host>.<random>.tmp``), and the next writer of the same target removes
the siblings of processes that are gone from this host. Live ones may be concurrent
writers, and another host's (on a shared file system) cannot be judged from here; hosts
that share a name must not share a pid namespace (containers writing one checkout).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; it replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder is an ordinary one
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8, ``\\n`` line ends)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
