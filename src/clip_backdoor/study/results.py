"""A study's results: every run's ``metrics.jsonl`` flattened into ``results.csv`` (the columns of
``study/select.py``), ``detection.csv`` where the study detects or filters, then the report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from clip_backdoor.fileio import atomic_write_text, read_jsonl
from clip_backdoor.study.expand import StudyPlan
from clip_backdoor.study.prune import PRUNED
from clip_backdoor.study.select import COLUMNS, interval_cells

RESULT_COLUMNS = COLUMNS  # one schema, defined beside the code that reads it
METRIC_COLUMNS = RESULT_COLUMNS[RESULT_COLUMNS.index("epoch"):RESULT_COLUMNS.index("run")]

log = logging.getLogger(__name__)


def _cell(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "" if value is None else str(int(value))
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def results_rows(plan: StudyPlan) -> list[dict[str, str]]:
    """Every (run, epoch) point of the study, as results.csv holds it (strings; empty = absent)."""
    rows = []
    for run in plan.runs:
        path = Path(run.cfg.run_dir) / "metrics.jsonl"
        if not path.is_file():
            continue
        pruned = Path(run.cfg.run_dir) / PRUNED
        pruned_at = _cell(json.loads(pruned.read_text(encoding="utf-8")).get("epoch")) if pruned.is_file() \
            else ""
        for metrics in read_jsonl(path):
            row = {"seed": str(run.seed), "stage": run.stage, "pretrain": run.pretrain,
                   "method": run.method or "", "lr": _cell(run.lr), "k": _cell(run.k),
                   "start_epoch": _cell(run.start_epoch)}
            row.update({key: _cell(metrics.get(key)) for key in METRIC_COLUMNS})
            row.update({key: _cell(v) for key, v in interval_cells(metrics, plan.spec.confidence).items()})
            row["run"] = run.name
            row["pruned"] = pruned_at
            rows.append(row)
    return rows


def write_results(plan: StudyPlan) -> tuple[Path, list[dict[str, str]]]:
    rows = results_rows(plan)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = plan.root / "results.csv"
    atomic_write_text(path, buffer.getvalue())
    _write_detection(plan)
    return path, rows


def _write_detection(plan: StudyPlan) -> None:
    """``detection.csv`` (only in a study with detection or filter-then-retrain runs)."""
    from clip_backdoor.study.steps import DETECTION_COLUMNS, detection_rows

    path = plan.root / "detection.csv"
    if not any(r.after or r.before for r in plan.runs):
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DETECTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in detection_rows(plan.runs))
    atomic_write_text(path, buffer.getvalue())


def report(plan: StudyPlan) -> Path:
    """results.csv, then the report; prints the headline table. Returns the report's index.html."""
    from clip_backdoor.study.report import headline_text, write_report

    path, rows = write_results(plan)
    log.info("%s: %d rows from %d runs", path, len(rows), len({r["run"] for r in rows}))
    if not rows:
        log.warning("no finished epochs yet: nothing to report")
        return path
    index = write_report(plan.root, taus=tuple(plan.spec.thresholds), confidence=plan.spec.confidence)
    print(headline_text(plan.root, confidence=plan.spec.confidence))
    return index
