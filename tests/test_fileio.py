"""Atomic writes and the temporary files a killed writer leaves: only a dead writer's are removed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clip_backdoor import fileio
from clip_backdoor.fileio import atomic_dir, atomic_path, atomic_write_text, remove_stale_temps, writer_tag


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp_name(target: str, pid: int, host: str | None = None, kind: str = "tmp") -> str:
    return f".{target}.{pid}@{host or fileio.host_id()}.abcd1234.{kind}"


def test_temporary_names_carry_the_writer(tmp_path):
    seen = []
    with atomic_path(tmp_path / "latest.pt") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "data") as tmp:
        seen.append(tmp.name)
    assert seen[0].startswith(f".latest.pt.{writer_tag()}.") and seen[0].endswith(".tmp")
    assert seen[1].startswith(f".data.{writer_tag()}.") and seen[1].endswith(".partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "latest.pt"]


def test_only_a_dead_writers_leftovers_on_this_host_are_removed(tmp_path, caplog):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        names = {
            "dead_file": temp_name("latest.pt", dead),
            "dead_dir": temp_name("poisoned", dead, kind="partial"),
            "live_child": temp_name("epoch_3.pt", live.pid),
            "mine": temp_name("metrics.jsonl", os.getpid()),
            "other_host": temp_name("latest.pt", dead, host="another-node"),
            "legacy": ".latest.pt.k3j9x_2a.tmp",
            "user_file": "notes.txt",
        }
        for key, name in names.items():
            if key == "dead_dir":
                (tmp_path / name).mkdir()
                (tmp_path / name / "manifest.csv").write_text("half")
            else:
                (tmp_path / name).write_text("x")
        removed = remove_stale_temps(tmp_path, tmp_path / "no-such-dir")
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted([names["dead_file"], names["dead_dir"]])
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names[k] for k in ("live_child", "mine", "other_host", "legacy", "user_file")}
    assert "another-node" in caplog.text and "k3j9x_2a" in caplog.text  # kept, and said so


def test_host_id_is_a_file_name_word():
    assert fileio._TEMP_NAME.match(temp_name("x.pt", 12)) is not None
    assert "." not in fileio.host_id() and "/" not in fileio.host_id()


def test_a_failed_write_leaves_nothing(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
