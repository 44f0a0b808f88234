"""The report's tables as records of display strings (rendered to Markdown, CSV and HTML), and the
CSV writer they share with ``dose.py``.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from clip_backdoor.fileio import atomic_write_text
from clip_backdoor.study import headline, select
from clip_backdoor.study.headline import format_change, format_pct
from clip_backdoor.study.select import (
    format_lr,
    method_key,
    method_label,
    objective_key,
    objective_label,
    rule_label,
)


def write_csv(path: Path, records: Sequence[dict]) -> None:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(c for r in records for c in r))
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({c: ("" if r.get(c) is None else r[c]) for c in columns})
    atomic_write_text(path, buffer.getvalue())


def final_metrics(rows: Sequence[dict]) -> list[dict]:
    """One record per run: its last evaluated epoch's metrics."""
    last: dict[tuple, dict] = {}
    for r in rows:
        key = (r["stage"], *select.run_key(r))
        if key not in last or r["epoch"] > last[key]["epoch"]:
            last[key] = r
    stages = {"pretrain": 0, "baseline": 1}  # then clean
    ordered = sorted(last.values(), key=lambda r: (
        stages.get(r["stage"], 2), objective_key(r["pretrain"]), r.get("k") or 0,
        method_key(r.get("method") or ""), r.get("lr") or 0.0, r["seed"]))
    columns = ("run", "stage", "seed", "pretrain", "method", "k", "lr", "epoch", "step", "acc1", "acc5",
               "asr1", "asr5", "ra1", "n", "n_asr", "loss", "pruned")
    return [{c: r.get(c) for c in columns} for r in ordered]


def selection_display(table: Sequence[dict]) -> list[dict]:
    """The long selection table as display strings (Markdown and HTML)."""
    out = []
    for r in table:
        found = r["n_found"] > 0
        out.append({
            "pre-training": objective_label(r["pretrain"]),
            "cleaning": method_label(r["method"], r["k"]),
            "rule": rule_label(r["rule"]) + ("" if r["peeks_at_asr"] else " (realistic)"),
            "selected on": headline.SELECTION_LABELS[r["selected_on"]],
            "acc1 (%)": headline.selected_cell(r),
            "ASR (%)": format_pct(r["asr1_mean"], r["asr1_ci"]) if found else "",
            "seeds": headline.found_cell(r),
            "change vs poisoned": format_change(r["rel_change_mean"], r["rel_change_ci"]) if found else "",
            "oracle's optimism (points)": headline.format_points(r["optimism_mean"], r["optimism_ci"])
            if r.get("n_paired") else "",
            "lr per seed": r["lrs"].replace(";", ", "),
            "epoch per seed": r["epochs"].replace(";", ", "),
        })
    if not any(r["selected_on"] == "validation" for r in table):  # no validation split: no such columns
        for record in out:
            del record["selected on"], record["oracle's optimism (points)"]
    return out


def poisoned_display(table: Sequence[dict], model: str = "poisoned") -> list[dict]:
    return [{"pre-training": objective_label(r["pretrain"]), "model": model, "seeds": r["n_seeds"],
             "acc1 (%)": format_pct(r["acc1_mean"], r["acc1_ci"]),
             "acc5 (%)": format_pct(r["acc5_mean"], r["acc5_ci"]),
             "ASR top-1 (%)": format_pct(r["asr1_mean"], r["asr1_ci"]),
             "ASR top-5 (%)": format_pct(r["asr5_mean"], r["asr5_ci"]),
             "measured at": r["source"]} for r in table]


def runs_display(records: Sequence[dict]) -> list[dict]:
    return [{"stage": r["stage"], "pre-training": objective_label(r["pretrain"]),
             "cleaning": method_label(r["method"], r["k"]) if r["method"] else "",
             "lr": format_lr(r["lr"]) if r["lr"] is not None else "", "seed": r["seed"],
             "last epoch": r["epoch"] if r.get("pruned") is None else f"{r['epoch']} (pruned)",
             **{f"{m} (%)": format_pct(r[m], None) for m in ("acc1", "acc5", "asr1", "asr5", "ra1")},
             "loss": "—" if r["loss"] is None else f"{r['loss']:.4g}", "run": r["run"] or ""}
            for r in records]


def read_detection(path: Path) -> list[dict]:
    """``detection.csv`` (written by the runner when the study scores its pairs), typed; [] when absent."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ints, floats = ("seed", "n_rows", "n_poison", "n_removed", "n_poison_removed"), (
        "auroc", "precision_at_p", "recall_at_p")
    for r in rows:
        for c in ints:
            r[c] = int(float(r[c])) if r.get(c) not in (None, "") else None
        for c in floats:
            r[c] = float(r[c]) if r.get(c) not in (None, "") else None
    return rows


def detection_display(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(scores table, filter table): per poisoned model and detector, AUROC and precision (= recall)
    at the true poison count; per filter-then-retrain model, what its filter removed. Mean ± std over
    seeds."""
    def num(values: Sequence[float | None], digits: int = 3) -> str:
        mean, std = select.mean_std(list(values))
        if mean is None:
            return "—"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["pretrain"], r["detector"])].append(r)
    from clip_backdoor.detection import DETECTORS

    ordered = sorted(groups, key=lambda g: (objective_key(g[1]), g[0] != "scores",
                                            DETECTORS.index(g[2]) if g[2] in DETECTORS else len(DETECTORS)))
    scores, filters = [], []
    for kind, pretrain, detector in ordered:
        group = groups[(kind, pretrain, detector)]
        counts = sorted({f"{r['n_poison']} / {r['n_rows']}" for r in group})
        if kind == "scores":
            scores.append({"poisoned model": objective_label(pretrain), "detector": detector,
                           "AUROC": num([r["auroc"] for r in group]),
                           "precision = recall at P": num([r["precision_at_p"] for r in group]),
                           "seeds": len(group), "poisons / pairs": ", ".join(counts)})
        else:
            before = [(r["n_poison"] or 0) + (r["n_poison_removed"] or 0) for r in group]
            share = [r["n_poison_removed"] / b if b else None for r, b in zip(group, before)]
            filters.append({"pre-training": objective_label(pretrain), "ranked by": detector,
                            "pairs removed": ", ".join(sorted({str(r["n_removed"]) for r in group})),
                            "poisons removed": num([r["n_poison_removed"] for r in group], 1),
                            "share of the poisons removed": num(share),
                            "poisons left / pairs kept": ", ".join(counts), "seeds": len(group)})
    return scores, filters
