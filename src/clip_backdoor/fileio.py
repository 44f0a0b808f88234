"""Atomic writes: a file a user relies on is either the old version or the new one, never half.

Everything that matters (checkpoints, manifests, metrics, results, reports, poisoned datasets) is
written to a temporary sibling and moved into place with ``os.replace``, which is atomic on POSIX.

A writer killed before the rename (kill -9, preemption, OOM) leaves its temporary sibling behind.
Every temporary name therefore carries its writer, ``.<name>.<pid>@<host>.<random>.<kind>``, where
``host`` is the host name plus a hash of the PID namespace (two containers sharing a host name and a
volume are two hosts). :func:`remove_stale_temps` deletes only what a dead writer left: same host,
PID no longer running. A temporary file of another host is kept (its writer cannot be checked from
here) and named in a warning, so nothing another live process may be writing is ever removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# .<name>.<pid>@<host>.<random>.<kind>; kind: tmp (a file), partial/new/old (a directory being built).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_+-]+)\.[A-Za-z0-9_]+"
                        r"\.(?P<kind>tmp|partial|new|old)$")
# What versions before writer tags left: .<name>.<random>.tmp, .<name>.partial-<random>, ...
_LEGACY_TEMP_NAME = re.compile(r"^\..+(\.[a-z0-9_]{8}\.tmp|\.(partial|new|old)-[a-z0-9_]{8})$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@functools.cache
def host_id() -> str:
    """This host as a file-name-safe word: host name, plus a hash of the PID namespace."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")[:48] or "host"
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return name
    return f"{name}+{hashlib.sha1(namespace.encode()).hexdigest()[:6]}"


def writer_tag() -> str:
    """``<pid>@<host>``: who is writing a temporary file (read back by :func:`remove_stale_temps`)."""
    return f"{os.getpid()}@{host_id()}"


def _tmp_sibling(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; a user's outputs get the permissions a plain open() would give.
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def temp_dir_sibling(path: str | os.PathLike, kind: str = "partial") -> Path:
    """A new empty directory next to ``path`` named after its writer (kind: partial, new or old)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{writer_tag()}.", suffix=f".{kind}", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    return tmp


def pid_running(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(*directories: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that dead writers left in ``directories`` (not recursive).

    Removed: names of :func:`writer_tag` form whose writer ran on this host and is no longer running.
    Kept, with one warning: those of another host, and untagged ones of older versions. Returns what
    was removed.
    """
    removed, kept = [], []
    for directory in map(Path, directories):
        try:
            entries = list(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match is None:
                if _LEGACY_TEMP_NAME.match(entry.name):
                    kept.append(entry)
                continue
            if match["host"] != host_id():
                kept.append(entry)
                continue
            if pid_running(int(match["pid"])):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) left by killed writers in %s", len(removed),
                 ", ".join(sorted({str(p.parent) for p in removed})))
    if kept:
        log.warning("kept %d temporary file(s) whose writer cannot be checked from this host (another "
                    "host, or an older version): %s; delete them if nothing is writing them",
                    len(kept), ", ".join(str(p) for p in kept[:3]) + (" ..." if len(kept) > 3 else ""))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn last line (a killed writer) is ignored, not an error."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a whole JSONL file atomically (used to truncate metrics to a resume point)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line; rewriting atomically keeps earlier lines safe if we are killed mid-write."""
    path = Path(path)
    rows = read_jsonl(path) if path.exists() else []
    rows.append(row)
    write_jsonl(path, rows)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only when complete.

    An interrupted writer leaves ``.<name>.<pid>@<host>.*.partial`` behind, never a half-written ``path``.
    ``path`` must not exist yet (callers decide whether to refuse or remove an old one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_sibling(path, "partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
