"""The headline of a study: its table (per objective, the poisoned model and each cleaning method's
selected checkpoint), the note saying what its numbers are, and the sentences on the paper's finding
(``study/finding.py``) and on each pre-training defence (``study/defense_effects.py``), as display
strings rendered to Markdown (and by ``report.py`` to HTML).

The numbers come from ``study/select.py``; this module only formats them, so selection imports no
presentation and ``finding`` (which builds on selection) sits between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

from clip_backdoor.study.defense_effects import defense_effects, defense_sentences
from clip_backdoor.study.finding import finding_text
from clip_backdoor.study.select import (
    DEFAULT_CONFIDENCE,
    HEADLINE_TAU,
    KEEP_ACCURACY,
    KEEP_RULE,
    baseline_table,
    clean_rows,
    has_validation,
    is_defended,
    method_key,
    method_label,
    objective_key,
    objective_label,
    poisoned_table,
    selection_table,
    tau_rule,
    typed_rows,
    uneven_backdoors,
    unlearned_backdoors,
)


def format_pct(mean: float | None, spread: float | None, digits: int = 1) -> str:
    """A fraction as percent, ``23.8 ± 0.4`` (no ± without a spread, e.g. one seed), ``—`` when absent."""
    if mean is None:
        return "—"
    text = f"{mean * 100:.{digits}f}"
    return f"{text} ± {spread * 100:.{digits}f}" if spread is not None else text


def format_change(mean: float | None, spread: float | None, digits: int = 1) -> str:
    if mean is None:
        return "—"
    text = f"{mean * 100:+.{digits}f}"
    return (f"{text} ± {spread * 100:.{digits}f}" if spread is not None else text) + "%"


def format_points(mean: float | None, spread: float | None, digits: int = 1) -> str:
    """A difference of two fractions in percentage points, signed: ``+2.3 ± 1.0``."""
    if mean is None:
        return "—"
    text = f"{mean * 100:+.{digits}f}"
    return f"{text} ± {spread * 100:.{digits}f}" if spread is not None else text


_NO_POINT = {"none": "none", "not-explored": "not explored", "no-asr": "no ASR", "no-points": "not yet",
             "no-baseline": "no baseline", "no-validation": "no validation"}


def selected_cell(row: dict, digits: int = 1) -> str:
    """The acc1 a rule chose (mean ± t interval over the seeds where it chose one), or why none."""
    if row["n_found"] == 0:
        return _NO_POINT[row["status"]]
    return format_pct(row["acc1_mean"], row["acc1_ci"], digits)


def min_asr_cell(row: dict, digits: int = 1) -> str:
    if row["n_found"] == 0:
        return _NO_POINT[row["status"]]
    return format_pct(row["asr1_mean"], row["asr1_ci"], digits)


def found_cell(row: dict) -> str:
    return f"{row['n_found']}/{row['n_seeds']}"


def _model_cell(row: dict | None, digits: int) -> str:
    if not row:
        return "—"
    acc = format_pct(row["acc1_mean"], row["acc1_ci"], digits)
    return f"{acc} / {format_pct(row['asr1_mean'], row['asr1_ci'], digits)}"


SELECTION_LABELS = {"test": "oracle (test)", "validation": "validation → test",
                    "optimism": "oracle's optimism"}


def headline_rows(rows: Sequence[dict], tau: float = HEADLINE_TAU, digits: int = 1,
                  confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
    """The headline as records of display strings (the Markdown and HTML tables render these).

    Per objective: the poisoned model (and, when the study has them, the clean baseline); per cleaning
    method: the best acc at ASR ≤ τ, the seeds that got there, the change vs the poisoned model, the
    minimum ASR and the threshold-free minimum ASR keeping ≥ 90% of the accuracy. With a validation
    split, each method has three rows: the oracle, validation-selected test-reported, and the gap."""
    rows = typed_rows(rows)
    table = selection_table(rows, taus=(tau,), confidence=confidence)
    index = {(r["pretrain"], r["method"], r["k"], r["rule"], r["selected_on"]): r for r in table}
    poisoned = {r["pretrain"]: r for r in poisoned_table(rows, confidence)}
    baselines = {r["pretrain"]: r for r in baseline_table(rows, confidence)}
    validated = any(r["selected_on"] == "validation" for r in table)
    rule = tau_rule(tau)
    pct = f"{tau * 100:g}%"
    keep = f"{KEEP_ACCURACY * 100:g}%"
    best_col, found_col = f"best acc at ASR ≤ {pct} (%)", f"seeds at ASR ≤ {pct}"
    columns = ["pre-training", "poisoned acc / ASR (%)",
               *(["clean model acc / ASR (%)"] if baselines else []),
               "cleaning", *(["selection"] if validated else []), best_col,
               *(["its ASR (%)"] if validated else []), found_col, "change vs poisoned", "min ASR (%)",
               f"min ASR keeping ≥ {keep} acc (%)"]
    pretrains = sorted({r["pretrain"] for r in table} | set(poisoned) | set(baselines), key=objective_key)
    defended_only = not clean_rows(rows) and any(is_defended(p) for p in pretrains)
    out = []
    for pretrain in pretrains:
        models = {"pre-training": objective_label(pretrain),
                  "poisoned acc / ASR (%)": _model_cell(poisoned.get(pretrain), digits)}
        if baselines:
            models["clean model acc / ASR (%)"] = _model_cell(baselines.get(pretrain), digits)
        methods = sorted({(r["method"], r["k"]) for r in table if r["pretrain"] == pretrain},
                         key=lambda mk: (mk[1], method_key(mk[0])))
        if not methods:
            if is_defended(pretrain):
                why = "(defended; not cleaned)"
            else:  # a defences study compares pre-trainings and has no cleaning stage
                why = "(undefended; not cleaned)" if defended_only else "(no cleaning runs yet)"
            out.append({c: models.get(c, "") for c in columns} | {"cleaning": why})
        first = True
        for method, k in methods:
            for selected_on in (("test", "validation", "optimism") if validated else ("test",)):
                record = dict.fromkeys(columns, "")
                if first:
                    record.update(models)
                    first = False
                if selected_on == "test":
                    record["cleaning"] = method_label(method, k)
                if validated:
                    record["selection"] = SELECTION_LABELS[selected_on]
                if selected_on == "optimism":
                    best = index.get((pretrain, method, k, rule, "validation"))
                    lowest = index.get((pretrain, method, k, "min-asr", "validation"))
                    kept = index.get((pretrain, method, k, KEEP_RULE, "validation"))
                    for column, r in ((best_col, best), ("min ASR (%)", lowest),
                                      (f"min ASR keeping ≥ {keep} acc (%)", kept)):
                        if r and r["n_paired"]:
                            record[column] = format_points(r["optimism_mean"], r["optimism_ci"], digits)
                    if best:
                        record[found_col] = f"{best['n_paired']} paired"
                    out.append(record)
                    continue
                best = index[(pretrain, method, k, rule, selected_on)]
                lowest = index[(pretrain, method, k, "min-asr", selected_on)]
                kept = index[(pretrain, method, k, KEEP_RULE, selected_on)]
                record[best_col] = selected_cell(best, digits)
                if validated:
                    record["its ASR (%)"] = format_pct(best["asr1_mean"], best["asr1_ci"], digits) \
                        if best["n_found"] else ""
                record[found_col] = found_cell(best)
                record["change vs poisoned"] = format_change(best["rel_change_mean"], best["rel_change_ci"],
                                                             digits) if best["n_found"] else ""
                record["min ASR (%)"] = min_asr_cell(lowest, digits)
                record[f"min ASR keeping ≥ {keep} acc (%)"] = min_asr_cell(kept, digits)
                out.append(record)
    return out


def markdown_table(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not records:
        return "_(no rows)_\n"
    columns = list(columns or records[0])
    cells = [[_md_cell(r.get(c)) for c in columns] for r in records]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _md_cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def headline_table(rows: Sequence[dict], tau: float = HEADLINE_TAU, digits: int = 1,
                   confidence: float = DEFAULT_CONFIDENCE) -> str:
    """Markdown: the headline table (see :func:`headline_rows`), the note saying what its numbers are,
    and the computed sentence on the paper's finding (``study.finding``)."""
    records = headline_rows(rows, tau, digits, confidence)
    if not records:
        return "_No results yet._\n"
    return (markdown_table(records) + "\n" + headline_note(rows, tau, confidence) + "\n\n"
            + conclusions(rows, tau=tau, confidence=confidence) + "\n")


def conclusions(rows: Sequence[dict], *, tau: float = HEADLINE_TAU,
                confidence: float = DEFAULT_CONFIDENCE) -> str:
    """The computed sentences under the headline: on the paper's finding (about cleaning) unless the
    study only compares pre-training defences; on each defence when it has defended models."""
    rows = typed_rows(rows)
    effects = defense_effects(rows, tau=tau, confidence=confidence)
    parts = [] if effects and not clean_rows(rows) else [finding_text(rows, confidence=confidence, tau=tau)]
    if effects:
        parts.append(defense_sentences(effects, tau=tau, confidence=confidence))
    return "\n\n".join(parts)


def headline_note(rows: Sequence[dict], tau: float = HEADLINE_TAU,
                  confidence: float = DEFAULT_CONFIDENCE) -> str:
    """The sentences under the headline table saying what its numbers are."""
    rows = typed_rows(rows)
    n = len({r["seed"] for r in rows})
    level = f"{confidence * 100:g}%"
    pct = f"{tau * 100:g}%"
    note = (f"Top-1 zero-shot accuracy and attack success rate in %, mean ± half-width of the {level} "
            f"Student-t confidence interval over {n} seed{'s' if n != 1 else ''} (t quantile with "
            f"n − 1 degrees of freedom over the n seeds a cell averages; no ± for one seed). Best acc: the "
            f"highest accuracy among all (learning rate, epoch ≥ 1) cleaning checkpoints with ASR ≤ {pct} "
            f"(the paper's selection, which peeks at ASR); \"none\": no checkpoint got there; seeds at "
            f"ASR ≤ {pct}: in how many seeds one did, and the cell's mean is over those. Min ASR keeping "
            f"≥ {KEEP_ACCURACY * 100:g}% acc: the lowest ASR among checkpoints whose accuracy is at least "
            f"{KEEP_ACCURACY * 100:g}% of the poisoned model's (threshold-free; \"none\": every checkpoint "
            f"lost more). Per-checkpoint binomial (Wilson, {level}) intervals are in results.csv.")
    if any(r["stage"] == "baseline" for r in rows):
        note += (" Clean model: the same pre-training without poisons, the floor; its ASR is how often "
                 "the trigger alone sends a clean model's non-target images to the target.")
    if has_validation(rows):
        note += (" Oracle (test): (lr, epoch) chosen on the numbers it reports; validation → test: chosen "
                 "on the validation split, reported on the disjoint test split; oracle's optimism: per "
                 "seed, oracle minus validation-selected, in percentage points (for ASR columns, "
                 "validation-selected minus oracle), mean ± interval over the seeds where both chose.")
    runs = {r.get("run") for r in clean_rows(rows)}
    n_pruned = len({r.get("run") for r in clean_rows(rows) if r.get("pruned") is not None})
    if n_pruned:
        note += (f" Pruned (cleaning.prune): {n_pruned} of {len(runs)} cleaning runs were stopped early by "
                 f"successive halving; \"not explored\": no trained checkpoint reached ASR ≤ {pct} and "
                 f"some runs of the group were stopped before their last epoch (they might have).")
    unlearned = unlearned_backdoors(rows, tau)
    if unlearned:
        plural = len(unlearned) > 1
        note += (f" Warning: the poisoned {' and '.join(unlearned)} model{'s' if plural else ''} already "
                 f"ha{'ve' if plural else 's'} ASR ≤ {pct} (the backdoor was not learned), so "
                 f"{'their' if plural else 'its'} rows say nothing about cleaning.")
    uneven = [] if unlearned else uneven_backdoors(rows)  # one warning about backdoor strength is enough
    if uneven:
        note += (f" Note: the poisoned models learned backdoors of unequal strength (ASR "
                 f"{backdoor_listing(uneven)}); a "
                 f"weaker backdoor is not necessarily easier to remove, but compare with that in mind.")
    return note


def backdoor_listing(asrs: Sequence[tuple[str, float]]) -> str:
    """``MMCL 98%, MMCL+SSL 72%``."""
    return ", ".join(f"{label} {asr * 100:.0f}%" for label, asr in asrs)
