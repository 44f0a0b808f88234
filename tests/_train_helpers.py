"""Module-level pieces shared by the training tests, in and out of spawned DDP processes (``mp.spawn``
pickles by name): a CSV dataset with real bad rows and an independent count of the bad rows read."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

# Rows of the bad-rows CSV whose image file does not exist, and whose PNG is cut short.
MISSING = (3, 11, 20, 29, 41, 50)
CORRUPT = (7, 33, 46, 60)
N_ROWS = 64


def write_bad_csv(root: Path, n_rows: int = N_ROWS) -> Path:
    """``root/train.csv``: ``n_rows`` 32x32 PNG rows, of which MISSING have no file and CORRUPT a torn one."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(n_rows):
            name = f"img/{i}.png"
            if i not in MISSING:
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
                data = buffer.getvalue()
                (root / name).write_bytes(data[:60] if i in CORRUPT else data)
            writer.writerow([name, f"a photo of thing {i}"])
    return root / "train.csv"


def counting_load(reads: Counter):
    """A ``CsvSource.load`` that also counts, in ``reads[epoch]``, every read of a bad row (a load that
    returns no sample): the bad rows seen, counted outside the sources' own skip counter."""
    from clip_backdoor.data.captions import CsvSource

    real_load = CsvSource.load

    def load(self, index):
        sample = real_load(self, index)
        if sample is None:
            reads[self.epoch] += 1
        return sample

    return load
