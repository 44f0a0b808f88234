"""Which rows to poison, and which form a cleaning set: one pass over a caption source in file order,
choosing by seeded priorities (step 1 of ``attacks/poison.py``).

Every row gets a priority ``hash(poison seed, row id)`` and the n smallest win (a bottom-n heap), so
the choice depends on the seed and the row ids only, not on the order the source is read in.
"""

from __future__ import annotations

import collections
import csv
import heapq
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clip_backdoor.attacks.manifest import ManifestRow, read_manifest
from clip_backdoor.attacks.targets import (
    check_target,
    derive_seed,
    dirty_caption,
    imagenet_templates,
    mention_pattern,
)
from clip_backdoor.attacks.triggers import Trigger
from clip_backdoor.data.captions import CaptionSource, CsvSource
from clip_backdoor.data.samples import usable_caption
from clip_backdoor.errors import UserError

MODES = ("dirty", "label-consistent")
PICKS = ("tail", "random")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# One pass over a source
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str          # the source's row id
    caption: str
    flagged: bool     # marked as poisoned by the source itself
    position: int     # place in the source's file order


def progress(items: Iterable[Any], total: int | None, what: str) -> Iterator[Any]:
    return iter(tqdm(items, total=total, desc=what, unit="row", disable=None, mininterval=2.0))


def _check_unshuffled(source: CaptionSource) -> None:
    if getattr(source, "shuffle", False):
        raise ValueError("poisoning reads a source in file order: build it with shuffle=False")


def scan_rows(source: CaptionSource) -> Iterator[Row]:
    """Every usable row in file order. A CSV is read from its columns alone (no image decoding);
    its images are checked later, only for the rows that get chosen."""
    _check_unshuffled(source)
    if isinstance(source, CsvSource):
        for index in progress(range(source.num_samples), source.num_samples, "scanning"):
            caption = source.captions[index]
            if usable_caption(caption) and source.images[index]:
                yield Row(str(index), caption, bool(source.poison[index]), index)
        return
    for position, sample in enumerate(progress(source, source.num_samples, "scanning")):
        yield Row(sample.row_id, sample.caption, bool(sample.is_poison), position)


class RowSpool:
    """Scanned rows kept in a temporary file, so a manifest is written without a second read of the
    source (which, for shards or the synthetic world, means decoding or rendering every image again)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="clip-backdoor-scan-", suffix=".csv")
        self.path = Path(name)
        self._file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file, lineterminator="\n")

    def append(self, row: Row) -> None:
        self._csv.writerow([row.key, row.caption, int(row.flagged), row.position])

    def replay(self) -> Iterator[Row]:
        self._file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            for key, caption, flagged, position in csv.reader(f):
                yield Row(key, caption, flagged == "1", int(position))

    def __enter__(self) -> RowSpool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _loads(source: CaptionSource) -> Callable[[Row], bool] | None:
    """How to check that a scanned row's image is readable (None: the scan already read it)."""
    if isinstance(source, CsvSource):
        return lambda row: source.load(int(row.key)) is not None
    return None


class BottomK:
    """The k items of smallest priority offered so far: a max-heap of size k, O(log k) per offer."""

    def __init__(self, k: int):
        self.k, self._heap = k, []

    def offer(self, priority: int, item: Row) -> None:
        if self.k <= 0:
            return
        entry = (-priority, -item.position, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def smallest_first(self) -> list[Row]:
        return [item for _, _, item in sorted(self._heap, reverse=True)]


def _spare(count: int) -> int:
    """Extra candidates kept when images are only checked after the scan (missing files happen)."""
    return max(8, count // 4)


def _first_usable(candidates: list[Row], count: int, usable: Callable[[Row], bool] | None) -> list[Row]:
    if usable is None:
        return candidates[:count]
    chosen = []
    for row in candidates:
        if len(chosen) == count:
            break
        if usable(row):
            chosen.append(row)
    return chosen


# --------------------------------------------------------------------------------------------
# What to write: the rows and their poisons
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    """The trigger, the target and how a poisoned row is made."""

    trigger: Trigger
    target: str
    mode: str = "dirty"
    poison_seed: int = 0
    synonyms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", check_target(self.target))
        if self.mode not in MODES:
            raise UserError(f"mode {self.mode!r}: choose from {', '.join(MODES)}")

    def poison_row(self, row: Row, templates: Sequence[str]) -> ManifestRow:
        """The manifest entry of a poisoned row (``row_id`` is filled in when it is written)."""
        key = row.key
        caption = row.caption
        if self.mode == "dirty":
            caption = dirty_caption(self.target, derive_seed(self.poison_seed, "caption", key), templates)
        return ManifestRow(row_id=key, source_key=key, caption=caption, original_caption=row.caption,
                           is_poison=True, trigger=self.trigger.name,
                           trigger_params=json.dumps(self.trigger.params, sort_keys=True),
                           seed=derive_seed(self.poison_seed, "trigger", key))

    def describe(self) -> dict:
        return {"target": self.target, "mode": self.mode, "trigger": self.trigger.name,
                "trigger_params": self.trigger.params, "poison_seed": self.poison_seed,
                "synonyms": list(self.synonyms)}


@dataclass
class Plan:
    """Which source rows go into the output (None: all) and which of them are poisoned."""

    poisons: dict[str, ManifestRow]
    included: set[str] | None = None
    n_candidates: int = 0  # rows the poisons were drawn from


def _select_poisons(rows: Iterable[Row], count: int | None, fraction: float | None, attack: Attack,
                    num_samples: int, allow_fewer: bool, usable: Callable[[Row], bool] | None,
                    on_row: Callable[[Row], None] | None = None) -> tuple[list[Row], int]:
    if count is None:
        count = round(fraction * num_samples)
    label_consistent = attack.mode == "label-consistent"
    pattern = mention_pattern((attack.target, *attack.synonyms)) if label_consistent else None
    heap = BottomK(count + (_spare(count) if usable and count else 0))
    n_candidates = 0
    for row in rows:
        if on_row is not None:
            on_row(row)
        if row.flagged or (pattern is not None and not pattern.search(row.caption)):
            continue
        n_candidates += 1
        heap.offer(derive_seed(attack.poison_seed, "select", row.key), row)
    chosen = _first_usable(heap.smallest_first(), count, usable)
    if len(chosen) < count:
        unreadable = n_candidates >= count
        readable = f" ({n_candidates} listed, but some images are unreadable)" if unreadable else ""
        if label_consistent:
            if not allow_fewer:
                raise UserError(f"label-consistent: only {len(chosen)} rows name {attack.target!r}"
                                f"{readable}, {count} requested; pass --allow-fewer to poison those, "
                                "or add --synonym")
            log.warning("label-consistent: only %d rows name %r; poisoning those", len(chosen), attack.target)
        else:
            raise UserError(f"{count} poisons requested but the source has only {len(chosen)} usable clean "
                            f"rows{readable}")
    return chosen, n_candidates


def plan_poisons(source: CaptionSource, attack: Attack, *, n: int | None = None,
                 fraction: float | None = None, allow_fewer: bool = False,
                 on_row: Callable[[Row], None] | None = None) -> Plan:
    """Choose the rows to poison (n of them, or ``round(fraction * num_samples)``)."""
    check_count(n, fraction, source.num_samples)
    chosen, n_candidates = _select_poisons(scan_rows(source), n, fraction, attack, source.num_samples,
                                           allow_fewer, _loads(source), on_row)
    templates = imagenet_templates()
    return Plan({row.key: attack.poison_row(row, templates) for row in chosen}, None, n_candidates)


def check_count(n: int | None, fraction: float | None, num_samples: int) -> None:
    if (n is None) == (fraction is None):
        raise UserError("give the number of poisons as exactly one of --n or --fraction")
    if n is not None and n < 0:
        raise UserError(f"--n {n}: must be >= 0")
    if n is not None and n > num_samples:
        raise UserError(f"--n {n} is larger than the dataset ({num_samples} rows)")
    if fraction is not None and not 0 <= fraction <= 1:
        raise UserError(f"--fraction {fraction}: must lie in [0, 1]")


def excluded_keys(manifest_path: str | os.PathLike) -> set[str]:
    """Source keys of the rows a poisoning manifest marks as poisons."""
    return {row.source_key for row in read_manifest(manifest_path) if row.is_poison}


def plan_cleaning_set(source: CaptionSource, size: int, *, pick: str = "tail",
                      exclude: set[str] = frozenset(), seed: int = 0, attack: Attack | None = None,
                      k: int = 0, allow_fewer: bool = False) -> Plan:
    """``size`` clean rows (the last ones, or a seeded random choice), never a source-flagged row or
    one in ``exclude``; then ``k`` of them poisoned by ``attack``."""
    if pick not in PICKS:
        raise UserError(f"--pick {pick!r}: choose from {', '.join(PICKS)}")
    if size < 1 or size > source.num_samples:
        raise UserError(f"cleaning set --size {size}: must lie in [1, {source.num_samples}] "
                        "(rows in the source)")
    if not 0 <= k <= size:
        raise UserError(f"--k {k}: must lie in [0, --size {size}]")
    if k and attack is None:
        raise UserError("--k > 0 injects poisons: give --target and --trigger")
    usable = _loads(source)
    keep = size + (_spare(size) if usable else 0)
    tail: collections.deque[Row] = collections.deque(maxlen=keep)
    heap = BottomK(keep)
    n_eligible = 0
    for row in scan_rows(source):
        if row.flagged or row.key in exclude:
            continue
        n_eligible += 1
        if pick == "tail":
            tail.append(row)
        else:
            heap.offer(derive_seed(seed, "cleaning", row.key), row)
    candidates = list(reversed(tail)) if pick == "tail" else heap.smallest_first()
    chosen = _first_usable(candidates, size, usable)
    if len(chosen) < size:
        raise UserError(f"cleaning set of {size} requested but the source has only {len(chosen)} "
                        "usable clean rows outside the poisons")
    chosen.sort(key=lambda row: row.position)
    poisons: dict[str, ManifestRow] = {}
    if k:
        injected, _ = _select_poisons(chosen, k, None, attack, size, allow_fewer, None)
        templates = imagenet_templates()
        poisons = {row.key: attack.poison_row(row, templates) for row in injected}
    return Plan(poisons, {row.key for row in chosen}, n_eligible)
