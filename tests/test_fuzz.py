"""Seeded fuzzing of the data path: damaged PNGs, CSVs and tar shards through the real sources and loader.

Each case damages one file of a tiny dataset (a truncation, a few replaced bytes, or a zero-length
file or tar member), then reads it with the real source and ``build_train_loader``. Allowed outcomes:
rows skipped and counted, or a one-line :class:`UserError`. Never an exception of another type, a
hang (every case runs under an alarm), or rows that appear or vanish without being counted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import re
import signal
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clip_backdoor.data.captions import CsvSource, WdsSource
from clip_backdoor.data.loader import build_train_loader
from clip_backdoor.errors import UserError

N, SIZE, BATCH = 12, 8, 4
CASES = 40  # per file kind; the whole file runs in a few seconds
CAPTIONS = [f"photo {i} of a thing" if i % 3 else f"café {i} au lait" for i in range(N)]  # some non-ASCII


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def expired(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def png_bytes(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (20 * i % 256, 7 * i % 256, 99)).save(buffer, format="PNG")
    return buffer.getvalue()


def damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "replace", "empty"])
    if kind == "empty" or not data:
        return "empty", b""
    if kind == "truncate":
        return "truncate", data[:rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 3) if rng.random() < 0.5 else 1):
        at = rng.randrange(len(out))
        out[at] = (out[at] + rng.randrange(1, 256)) % 256
    return "replace", bytes(out)


def write_csv_dataset(root: Path) -> Path:
    root.mkdir()
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        for i in range(N):
            (root / f"{i}.png").write_bytes(png_bytes(i))
            writer.writerow([f"{i}.png", CAPTIONS[i]])
    return root / "train.csv"


def check_user_error(error: UserError) -> None:
    assert "\n" not in str(error), f"a UserError must be one line: {error}"


def read_through_loader(source) -> None:
    """The training loader over the damaged source: full batches of known rows, skips accounted."""
    before = source.n_skipped
    loader = build_train_loader(source, image_size=SIZE, context_length=16, batch_size=BATCH, workers=0,
                                seed=0)
    batches = list(loader)
    assert len(batches) == source.num_samples // BATCH and all(len(b["row_ids"]) == BATCH for b in batches)
    assert sum(b["n_skipped"] for b in batches) == source.n_skipped - before


def physical_rows(data: bytes) -> int:
    """Data rows a reader must report for a CSV without quotes: its non-empty lines after the first."""
    lines = re.split(rb"\r\n|\r|\n", data)
    return sum(1 for line in lines[1:] if line)


@pytest.mark.parametrize("seed", range(2))
def test_damaged_pngs_are_skipped_and_counted(tmp_path, seed):
    rng = random.Random(seed)
    path = write_csv_dataset(tmp_path / "d")
    for case in range(CASES // 2):
        i = rng.randrange(N)
        _, data = damage(png_bytes(i), rng)
        (path.parent / f"{i}.png").write_bytes(data)
        with time_limit(20):
            source = CsvSource(path, shuffle=False)
            rows = [s.row_id for s in source]
            # Every row is read or counted; only the damaged one may be missing.
            assert len(rows) + source.n_skipped == N, case
            assert set(map(str, range(N))) - set(rows) <= {str(i)}
            try:
                read_through_loader(CsvSource(path, seed=case))
            except UserError as e:  # every row unreadable: impossible here, but a one-line error if so
                check_user_error(e)
        (path.parent / f"{i}.png").write_bytes(png_bytes(i))


@pytest.mark.parametrize("seed", range(2))
def test_damaged_csvs_are_an_error_or_keep_their_row_count(tmp_path, seed):
    rng = random.Random(seed)
    path = write_csv_dataset(tmp_path / "d")
    original = path.read_bytes()
    outcomes = set()
    for case in range(CASES):
        kind, data = damage(original, rng)
        path.write_bytes(data)
        with time_limit(20):
            try:
                source = CsvSource(path, shuffle=False)
            except UserError as e:
                check_user_error(e)
                assert str(path) in str(e)
                outcomes.add("error")
                continue
            # One quote at most was made, so a row is one line: no row may vanish or appear.
            assert source.num_samples == physical_rows(data), (case, kind, data)
            rows = [s.row_id for s in source]
            assert len(rows) + source.n_skipped == source.num_samples
            outcomes.add("read")
            if source.num_samples >= BATCH:
                try:
                    read_through_loader(CsvSource(path, seed=case))
                except UserError as e:
                    check_user_error(e)
    assert outcomes == {"error", "read"}  # the cases reached both branches


def write_shards(root: Path) -> list[Path]:
    root.mkdir()
    shards = []
    for s in range(2):
        shard = root / f"shard-{s:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(s * N // 2, (s + 1) * N // 2):
                for name, data in ((f"{i:04d}.png", png_bytes(i)), (f"{i:04d}.txt", CAPTIONS[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


def with_empty_member(shard: Path, rng: random.Random) -> bytes:
    """The shard rewritten with one member's payload cut to zero bytes."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = rng.randrange(len(members))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for j, (member, data) in enumerate(members):
            data = b"" if j == target else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("seed", range(2))
def test_damaged_shards_lose_only_counted_samples(tmp_path, seed):
    rng = random.Random(seed)
    shards = write_shards(tmp_path / "s")
    originals = [s.read_bytes() for s in shards]
    keys = {f"{i:04d}" for i in range(N)}
    pattern = str(tmp_path / "s" / "shard-{000000..000001}.tar")
    for case in range(CASES // 2):
        which = rng.randrange(len(shards))
        if rng.random() < 0.25:
            data = with_empty_member(shards[which], rng)
        else:
            _, data = damage(originals[which], rng)
        shards[which].write_bytes(data)
        with time_limit(20):
            source = WdsSource(pattern, num_samples=N, shuffle=False)
            rows = [s.row_id for s in source]
            assert len(rows) == len(set(rows)) and set(rows) <= keys, case
            # A broken tar loses the rest of its shard, counted once; every other loss is counted per sample.
            assert len(rows) == N or source.n_skipped >= 1, case
            try:
                read_through_loader(WdsSource(pattern, num_samples=N, seed=case))
            except UserError as e:  # a part whose shards yield nothing at all
                check_user_error(e)
        shards[which].write_bytes(originals[which])
