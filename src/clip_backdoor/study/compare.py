"""``clip-backdoor study compare DIR...``: one cleaning method's headline numbers across studies.

A study has one attack, so "does the trigger matter?" is several studies that differ in one
property. This puts their headline cells side by side, one row per (study, pre-training objective):
the study's trigger, the poisoned model, and for the method (k = 0) the seeds that reached ASR ≤ τ,
the best accuracy there, its change from the poisoned model, and the minimum ASR keeping ≥ 90% of the
accuracy — validation-selected where the study has a validation split, as its own headline is — with
the verdicts of the study's two paired tests of the paper's finding for that method. Every number is
what each study's own report says; nothing is tested across studies (their poisoned models differ).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from clip_backdoor.errors import UserError
from clip_backdoor.study import finding, select
from clip_backdoor.study.headline import (
    format_change,
    format_pct,
    found_cell,
    markdown_table,
    min_asr_cell,
    selected_cell,
)


def _spec(study_dir: Path) -> dict:
    try:
        spec = yaml.safe_load((study_dir / "study.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _trigger_text(spec: dict) -> str:
    attack = spec.get("attack") or {}
    params = attack.get("trigger_params") or {}
    shown = ", ".join(f"{k} {v}" for k, v in params.items() if k != "patch")
    return f"{attack.get('trigger', 'badnet')}" + (f" ({shown})" if shown else "")


def _verdict(c: finding.Comparison) -> str:
    if c.test is None:
        return c.status
    p = "p < 0.001" if c.test.p < 0.001 else f"p = {c.test.p:.2g}"
    return f"{c.status} ({p}, {c.wins}/{c.n} seeds)"


def compare_rows(study_dirs: Sequence[str | Path], *, method: str = finding.METHOD,
                 tau: float = select.HEADLINE_TAU, digits: int = 1) -> list[dict]:
    """The table's records (display strings), in the order the studies were given; each study at its
    own ``confidence`` (study.yaml; default 0.95)."""
    pct, keep = f"{tau * 100:g}%", f"{select.KEEP_ACCURACY * 100:g}%"
    out = []
    for given in study_dirs:
        study_dir = Path(given)
        results = study_dir / "results.csv"
        if not results.is_file():
            raise UserError(f"{study_dir}: no results.csv (run `clip-backdoor study run` or `study report`)")
        rows = select.read_results(results)
        spec = _spec(study_dir)
        confidence = float(spec.get("confidence", select.DEFAULT_CONFIDENCE))
        table = select.selection_table(rows, taus=(tau,), confidence=confidence)
        selected_on = "validation" if select.has_validation(rows) else "test"
        index = {(r["pretrain"], r["method"], r["k"], r["rule"], r["selected_on"]): r for r in table}
        poisoned = {r["pretrain"]: r for r in select.poisoned_table(rows, confidence)}
        verdicts = {kind: _verdict(finding.compare(rows, confidence=confidence, tau=tau, kind=kind,
                                                   method=method))
                    for kind in ("tau", "threshold-free")}
        objectives = sorted({p for p in poisoned if not select.is_defended(p)}, key=select.objective_key)
        for i, objective in enumerate(objectives):
            p = poisoned[objective]
            best = index.get((objective, method, 0, select.tau_rule(tau), selected_on))
            kept = index.get((objective, method, 0, select.KEEP_RULE, selected_on))
            record = {
                "study": study_dir.name if i == 0 else "",
                "trigger": _trigger_text(spec) if i == 0 else "",
                "pre-training": select.objective_label(objective),
                "poisoned acc / ASR (%)": (f"{format_pct(p['acc1_mean'], p['acc1_ci'], digits)} / "
                                           f"{format_pct(p['asr1_mean'], p['asr1_ci'], digits)}"),
                f"seeds at ASR ≤ {pct}": found_cell(best) if best else "—",
                f"best acc at ASR ≤ {pct} (%)": selected_cell(best, digits) if best else "—",
                "change vs poisoned": (format_change(best["rel_change_mean"], best["rel_change_ci"], digits)
                                       if best and best["n_found"] else ""),
                f"min ASR keeping ≥ {keep} acc (%)": min_asr_cell(kept, digits) if kept else "—",
                f"finding at ASR ≤ {pct}": verdicts["tau"] if i == 0 else "",
                "finding, threshold-free": verdicts["threshold-free"] if i == 0 else "",
            }
            out.append(record)
    return out


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="one cleaning method's headline numbers side by side across studies "
                       "(e.g. the trigger variants)")
    c.add_argument("dirs", nargs="+", metavar="DIR", help="study directories (each with results.csv)")
    c.add_argument("--method", default=finding.METHOD, help="cleaning method (default cleanclip)")
    c.add_argument("--out", type=Path, help="also write the Markdown table to this file")


def main_compare(args: argparse.Namespace) -> int:
    from clip_backdoor.fileio import atomic_write_text

    records = compare_rows(args.dirs, method=args.method)
    if not records:
        raise UserError("no poisoned model in any of these studies' results")
    text = (f"{select.method_label(args.method)} (k = 0) across {len(args.dirs)} studies; selection as in "
            "each study's headline, mean ± t interval over its seeds (at the study's confidence, 95% by "
            "default).\n\n" + markdown_table(records))
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
    return 0
