"""Which cleaning run "worked": the paper's oracle selection next to rules that do not peek at ASR.

A study's ``results.csv`` holds one row per evaluated (run, epoch). For every group
(seed, pre-training objective, cleaning method, k poisons in the cleaning set) we select over all
(learning rate × epoch ≥ 1) points of that method. Epoch 0 is the poisoned model itself, identical
for every run of a pre-training objective and seed: it is the reference the relative change is
measured from, never a "cleaned" candidate.

Rules (each picks one point per group):

- ``asr<=T%``  (oracle, the paper's): highest acc1 among points with asr1 ≤ T; "none" if no point
  qualifies. Ties: lower asr1, then earlier epoch, then smaller lr.
- ``min-asr``  (oracle): lowest asr1 reached. Ties: higher acc1, earlier epoch, smaller lr.
- ``last-epoch`` (realistic): every lr's last evaluated epoch; the lr whose last epoch has the
  highest acc1. Ties: smaller lr.
- ``best-acc`` (realistic): the point with the highest acc1 anywhere. Ties: earlier epoch, smaller lr.

The realistic rules choose by accuracy alone and then report the ASR of what they chose, so the
gap to the oracle shows what a defender without a trigger oracle would actually get.
Aggregation over seeds is mean ± sample standard deviation (none for one seed) over the seeds
where the rule found a point; the count of such seeds is reported next to it.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clip_backdoor.errors import UserError

COLUMNS = ("seed", "stage", "pretrain", "method", "lr", "k", "epoch", "step", "acc1", "acc5", "asr1",
           "asr5", "ra1", "n", "n_asr", "loss", "loss_mmcl", "loss_ssl", "run", "pruned")
# pruned: the epoch at which successive halving stopped the run (cleaning.prune), empty otherwise
INT_COLUMNS = frozenset({"seed", "k", "epoch", "step", "n", "n_asr", "pruned"})
FLOAT_COLUMNS = frozenset({"lr", "acc1", "acc5", "asr1", "asr5", "ra1", "loss", "loss_mmcl", "loss_ssl"})
REQUIRED_COLUMNS = ("stage", "pretrain", "epoch")
METRICS = ("acc1", "acc5", "asr1", "asr5", "ra1")

DEFAULT_TAUS = (0.01, 0.05, 0.10)
HEADLINE_TAU = 0.05
# ASR is a ratio of counts (e.g. 5/100); the slack keeps "exactly τ" inside the band despite rounding.
_TAU_SLACK = 1e-9
# Poisoned models whose ASRs differ by this much (absolute) learned backdoors of unequal strength:
# their cleaning results are not directly comparable, and the headline says so.
UNEVEN_ASR_GAP = 0.20

# Known names first, in the paper's order; anything else follows alphabetically.
OBJECTIVE_ORDER = ("mmcl", "mmcl+ssl", "ssl")
METHOD_ORDER = ("cleanclip", "mmcl", "ssl", "heavy-wd", "shrink-perturb", "deep-clustering")
OBJECTIVE_LABELS = {"mmcl": "MMCL", "mmcl+ssl": "MMCL+SSL", "ssl": "SSL"}
METHOD_LABELS = {"cleanclip": "CleanCLIP", "mmcl": "MMCL only", "ssl": "SSL only",
                 "heavy-wd": "heavy weight decay", "shrink-perturb": "shrink & perturb",
                 "deep-clustering": "deep clustering"}


# ------------------------------------------------------------------------------------------------
# Reading results.csv
# ------------------------------------------------------------------------------------------------
def read_results(path: str | Path) -> list[dict]:
    """Rows of ``results.csv`` with types: ints, floats, strings; an empty cell or a missing column
    is ``None`` (a missing ``seed`` is 0). Extra columns are kept as strings."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: results file not found (run the study first)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}: missing column {missing[0]!r} (header: {','.join(header) or 'empty'})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            if None in raw:
                raise UserError(f"{path}: line {line} has more cells than the header")
            rows.append(_typed_row(raw, path, line))
    return rows


def typed_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows as ``read_results`` returns them; string rows (csv.DictReader, a runner's own records)
    are converted the same way, so every function here accepts either."""
    rows = list(rows)
    if any(isinstance(r.get("epoch"), str) for r in rows):
        source = Path("<results rows>")
        return [_typed_row({k: None if v is None else str(v) for k, v in r.items()}, source, line)
                for line, r in enumerate(rows, start=2)]
    return rows


def _typed_row(raw: dict[str, str | None], path: Path, line: int) -> dict:
    row: dict = {}
    for column in dict.fromkeys((*COLUMNS, *raw)):
        value = raw.get(column)
        value = value.strip() if value is not None else ""
        if value == "":
            row[column] = None
        elif column in INT_COLUMNS:
            row[column] = _parse_int(value, path, line, column)
        elif column in FLOAT_COLUMNS:
            row[column] = _parse_float(value, path, line, column)
        else:
            row[column] = value
    for metric in METRICS:
        value = row[metric]
        if value is not None and math.isfinite(value) and not 0.0 <= value <= 1.0:
            raise UserError(f"{path}: line {line}, column {metric!r}: {value:g} is not a fraction in [0, 1] "
                            "(metrics are fractions, not percent)")
    if row["seed"] is None:
        row["seed"] = 0
    if row["epoch"] is None:
        raise UserError(f"{path}: line {line}: empty 'epoch'")
    if row["stage"] is None or row["pretrain"] is None:
        raise UserError(f"{path}: line {line}: empty 'stage' or 'pretrain'")
    return row


def _parse_float(value: str, path: Path, line: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{path}: line {line}, column {column!r}: {value!r} is not a number") from None


def _parse_int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        number = _parse_float(value, path, line, column)
        if not number.is_integer():
            raise UserError(f"{path}: line {line}, column {column!r}: {value!r} is not an integer") from None
        return int(number)


# ------------------------------------------------------------------------------------------------
# Orderings and labels shared with the report
# ------------------------------------------------------------------------------------------------
def _known_first(order: Sequence[str]):
    return lambda name: (order.index(name), "") if name in order else (len(order), name)


objective_key = _known_first(OBJECTIVE_ORDER)
method_key = _known_first(METHOD_ORDER)


def objective_label(name: str) -> str:
    return OBJECTIVE_LABELS.get(name, name)


def method_label(name: str, k: int | None = 0) -> str:
    label = METHOD_LABELS.get(name, name)
    return f"{label}, k={k}" if k else label


def format_lr(lr: float | None) -> str:
    """Learning rates as people write them: 3e-4, 1e-5, 0.01."""
    if lr is None:
        return "?"
    if lr != 0 and abs(lr) < 1e-2:
        mantissa, exponent = f"{lr:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{lr:g}"


def rule_names(taus: Sequence[float] = DEFAULT_TAUS) -> list[str]:
    return [tau_rule(t) for t in taus] + ["min-asr", "last-epoch", "best-acc"]


def tau_rule(tau: float) -> str:
    return f"asr<={tau * 100:g}%"


def rule_label(rule: str) -> str:
    if rule.startswith("asr<="):
        return f"best acc at ASR ≤ {rule[5:]}"
    return {"min-asr": "minimum ASR", "last-epoch": "last epoch, best lr by acc",
            "best-acc": "best acc anywhere"}[rule]


def rule_peeks_at_asr(rule: str) -> bool:
    return rule.startswith("asr<=") or rule == "min-asr"


# ------------------------------------------------------------------------------------------------
# Points and the poisoned model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One evaluated cleaning checkpoint."""

    lr: float | None
    epoch: int
    acc1: float
    asr1: float | None


def finite(x: float | None) -> float | None:
    """The value, or None when absent or NaN/inf (a diverged run)."""
    return x if x is not None and math.isfinite(x) else None


def clean_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["stage"] == "clean"]


def group_key(row: dict) -> tuple:
    """(seed, pretrain, method, k) — the unit of selection; k absent counts as 0 (ideal set)."""
    return (row["seed"], row["pretrain"], row.get("method") or "", row.get("k") or 0)


def run_key(row: dict) -> tuple:
    """A cleaning run's identity from its parameters (not from its directory name)."""
    return (*group_key(row), row.get("lr"))


def sort_group_keys(keys: Iterable[tuple]) -> list[tuple]:
    """(seed, pretrain, method, k) keys in display order: objective, k, method, seed."""
    return sorted(keys, key=lambda g: (objective_key(g[1]), g[3], method_key(g[2]), g[0]))


def poisoned_models(rows: Sequence[dict]) -> dict[tuple, dict]:
    """(seed, pretrain) -> the poisoned model's metrics and where they came from.

    The epoch-0 row of a cleaning run is the poisoned checkpoint evaluated exactly as the cleaned
    ones are; without any, the pre-training run's last evaluated epoch stands in.
    """
    rows = typed_rows(rows)
    found: dict[tuple, dict] = {}
    epoch0 = sorted((r for r in clean_rows(rows) if r["epoch"] == 0 and finite(r.get("acc1")) is not None),
                    key=lambda r: (str(r.get("run") or ""), method_key(r.get("method") or ""),
                                   r.get("k") or 0, r.get("lr") or 0.0))
    for r in epoch0:
        found.setdefault((r["seed"], r["pretrain"]), {**{m: r.get(m) for m in METRICS},
                                                      "source": "clean epoch 0"})
    last_pretrain: dict[tuple, dict] = {}
    for r in rows:
        if r["stage"] == "pretrain" and finite(r.get("acc1")) is not None:
            key = (r["seed"], r["pretrain"])
            if key not in last_pretrain or r["epoch"] > last_pretrain[key]["epoch"]:
                last_pretrain[key] = r
    for key, r in last_pretrain.items():
        found.setdefault(key, {**{m: r.get(m) for m in METRICS}, "source": f"pretrain epoch {r['epoch']}"})
    return found


def pruned_runs(rows: Sequence[dict]) -> dict[tuple, set]:
    """(seed, pretrain, method, k) -> the runs of that group stopped early by pruning."""
    out: dict[tuple, set] = defaultdict(set)
    for r in clean_rows(typed_rows(rows)):
        if r.get("pruned") is not None:
            out[group_key(r)].add(r.get("run") or run_key(r))
    return dict(out)


def cleaning_points(rows: Sequence[dict]) -> dict[tuple, list[Point]]:
    """(seed, pretrain, method, k) -> its cleaned checkpoints (epoch ≥ 1 with a finite acc1).

    A group whose runs have only epoch 0 so far is present with no points."""
    rows = typed_rows(rows)
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for r in clean_rows(rows):
        key = group_key(r)
        groups[key]  # noqa: B018 - register the group even if it has no cleaned point yet
        acc = finite(r.get("acc1"))
        if r["epoch"] >= 1 and acc is not None:
            groups[key].append(Point(r.get("lr"), r["epoch"], acc, finite(r.get("asr1"))))
    return dict(groups)


# ------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------
def _lr(p: Point) -> float:
    return p.lr if p.lr is not None else 0.0


def best_at_asr(points: Sequence[Point], tau: float) -> tuple[Point | None, str]:
    measured = [p for p in points if p.asr1 is not None]
    if not points:
        return None, "no-points"
    if not measured:
        return None, "no-asr"
    ok = [p for p in measured if p.asr1 <= tau + _TAU_SLACK]
    if not ok:
        return None, "none"
    return min(ok, key=lambda p: (-p.acc1, p.asr1, p.epoch, _lr(p))), "ok"


def min_asr(points: Sequence[Point]) -> tuple[Point | None, str]:
    measured = [p for p in points if p.asr1 is not None]
    if not points:
        return None, "no-points"
    if not measured:
        return None, "no-asr"
    return min(measured, key=lambda p: (p.asr1, -p.acc1, p.epoch, _lr(p))), "ok"


def last_epoch_best_lr(points: Sequence[Point]) -> tuple[Point | None, str]:
    last: dict[float | None, Point] = {}
    for p in points:
        if p.lr not in last or p.epoch > last[p.lr].epoch:
            last[p.lr] = p
    if not last:
        return None, "no-points"
    return min(last.values(), key=lambda p: (-p.acc1, _lr(p))), "ok"


def best_acc_anywhere(points: Sequence[Point]) -> tuple[Point | None, str]:
    if not points:
        return None, "no-points"
    return min(points, key=lambda p: (-p.acc1, p.epoch, _lr(p))), "ok"


def apply_rule(rule: str, points: Sequence[Point]) -> tuple[Point | None, str]:
    if rule.startswith("asr<="):
        return best_at_asr(points, float(rule[5:].rstrip("%")) / 100)
    return {"min-asr": min_asr, "last-epoch": last_epoch_best_lr, "best-acc": best_acc_anywhere}[rule](points)


def relative_change(acc: float | None, acc0: float | None) -> float | None:
    """(acc − acc0) / acc0, the paper's "relative drop" with its sign (negative = lost accuracy)."""
    if acc is None or acc0 is None or not acc0 > 0:
        return None
    return (acc - acc0) / acc0


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def select_per_seed(rows: Sequence[dict], taus: Sequence[float] = DEFAULT_TAUS) -> list[dict]:
    """One row per (seed, pretrain, method, k, rule): the chosen point, or a status saying why none.

    status: ok | none (ASR measured, no point qualifies) | not-explored (none among the points
    trained, and some runs of the group were pruned before their last epoch) | no-asr (no point has
    an ASR) | no-points (no cleaned epoch evaluated yet).
    """
    rows = typed_rows(rows)
    poisoned = poisoned_models(rows)
    out = []
    groups = cleaning_points(rows)
    pruned = pruned_runs(rows)
    for key in sort_group_keys(groups):
        seed, pretrain, method, k = key
        points = groups[key]
        base = poisoned.get((seed, pretrain), {})
        for rule in rule_names(taus):
            point, status = apply_rule(rule, points)
            if status == "none" and pruned.get(key):
                status = "not-explored"
            out.append({
                "seed": seed, "pretrain": pretrain, "method": method, "k": k, "rule": rule,
                "peeks_at_asr": rule_peeks_at_asr(rule), "status": status,
                "acc1": point.acc1 if point else None, "asr1": point.asr1 if point else None,
                "rel_change": relative_change(point.acc1 if point else None, base.get("acc1")),
                "lr": point.lr if point else None, "epoch": point.epoch if point else None,
                "n_points": len(points), "n_pruned": len(pruned.get(key, ())),
                "poisoned_acc1": base.get("acc1"), "poisoned_asr1": base.get("asr1"),
            })
    return out


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the present values (std needs two)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


def selection_table(rows: Sequence[dict], taus: Sequence[float] = DEFAULT_TAUS) -> list[dict]:
    """One row per (pretrain, method, k, rule), aggregated over seeds: mean ± std of acc1, asr1
    and relative change over the seeds where the rule found a point; ``n_found`` of ``n_seeds``."""
    return aggregate_per_seed(select_per_seed(rows, taus))


def aggregate_per_seed(per_seed: Sequence[dict]) -> list[dict]:
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in per_seed:
        by_key[(r["pretrain"], r["method"], r["k"], r["rule"])].append(r)
    out = []
    for (pretrain, method, k, rule), group in by_key.items():
        group.sort(key=lambda r: r["seed"])
        found = [r for r in group if r["status"] == "ok"]
        statuses = {r["status"] for r in group}
        status = "ok" if found else next(s for s in ("not-explored", "none", "no-asr", "no-points")
                                         if s in statuses)
        row = {"pretrain": pretrain, "method": method, "k": k, "rule": rule,
               "peeks_at_asr": rule_peeks_at_asr(rule), "status": status,
               "n_seeds": len(group), "n_found": len(found),
               "n_pruned": sum(r.get("n_pruned", 0) for r in group)}
        for metric in ("acc1", "asr1", "rel_change", "poisoned_acc1", "poisoned_asr1"):
            source = group if metric.startswith("poisoned") else found
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([r[metric] for r in source])
        row["lrs"] = ";".join(format_lr(r["lr"]) for r in found)
        row["epochs"] = ";".join(str(r["epoch"]) for r in found)
        row["seeds"] = ";".join(str(r["seed"]) for r in group)
        out.append(row)
    return out


def poisoned_table(rows: Sequence[dict]) -> list[dict]:
    """Per pre-training objective: the poisoned model's metrics, mean ± std over seeds."""
    rows = typed_rows(rows)
    per_objective: dict[str, list[dict]] = defaultdict(list)
    for (seed, pretrain), metrics in sorted(poisoned_models(rows).items(), key=lambda kv: kv[0][0]):
        per_objective[pretrain].append({"seed": seed, **metrics})
    out = []
    for pretrain in sorted(per_objective, key=objective_key):
        group = per_objective[pretrain]
        row: dict = {"pretrain": pretrain, "n_seeds": len(group)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([g[metric] for g in group])
        row["source"] = ";".join(sorted({g["source"] for g in group}))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# The headline
# ------------------------------------------------------------------------------------------------
def format_pct(mean: float | None, std: float | None, digits: int = 1) -> str:
    """A fraction as percent, ``23.8 ± 0.4`` (no ± for one seed), ``—`` when absent."""
    if mean is None:
        return "—"
    text = f"{mean * 100:.{digits}f}"
    return f"{text} ± {std * 100:.{digits}f}" if std is not None else text


def format_change(mean: float | None, std: float | None, digits: int = 1) -> str:
    if mean is None:
        return "—"
    text = f"{mean * 100:+.{digits}f}"
    return (f"{text} ± {std * 100:.{digits}f}" if std is not None else text) + "%"


def _seed_note(row: dict) -> str:
    return "" if row["n_found"] == row["n_seeds"] else f" ({row['n_found']}/{row['n_seeds']} seeds)"


_STATUS_CELLS = {"none": "none", "not-explored": "not explored", "no-asr": "no ASR", "no-points": "not yet"}


def selected_cell(row: dict, digits: int = 1) -> str:
    """The acc1 a rule chose, or why there is none."""
    if row["n_found"] == 0:
        return _STATUS_CELLS[row["status"]]
    return format_pct(row["acc1_mean"], row["acc1_std"], digits) + _seed_note(row)


def min_asr_cell(row: dict, digits: int = 1) -> str:
    if row["n_found"] == 0:
        return _STATUS_CELLS[row["status"]]
    return format_pct(row["asr1_mean"], row["asr1_std"], digits) + _seed_note(row)


def headline_rows(rows: Sequence[dict], tau: float = HEADLINE_TAU, digits: int = 1) -> list[dict]:
    """The headline as records of display strings (the Markdown and HTML tables render these)."""
    rows = typed_rows(rows)
    table = selection_table(rows, taus=(tau,))
    index = {(r["pretrain"], r["method"], r["k"], r["rule"]): r for r in table}
    poisoned = {r["pretrain"]: r for r in poisoned_table(rows)}
    rule = tau_rule(tau)
    pct = f"{tau * 100:g}%"
    pretrains = sorted({r["pretrain"] for r in table} | set(poisoned), key=objective_key)
    out = []
    for pretrain in pretrains:
        base = poisoned.get(pretrain)
        base_cell = (f"{format_pct(base['acc1_mean'], base['acc1_std'], digits)} / "
                     f"{format_pct(base['asr1_mean'], base['asr1_std'], digits)}") if base else "—"
        methods = sorted({(r["method"], r["k"]) for r in table if r["pretrain"] == pretrain},
                         key=lambda mk: (mk[1], method_key(mk[0])))
        if not methods:
            out.append({"pre-training": objective_label(pretrain), "poisoned acc / ASR (%)": base_cell,
                        "cleaning": "(no cleaning runs yet)", f"best acc at ASR ≤ {pct} (%)": "",
                        "change vs poisoned": "", "min ASR (%)": "", "seeds": ""})
        for i, (method, k) in enumerate(methods):
            best = index[(pretrain, method, k, rule)]
            lowest = index[(pretrain, method, k, "min-asr")]
            out.append({
                "pre-training": objective_label(pretrain) if i == 0 else "",
                "poisoned acc / ASR (%)": base_cell if i == 0 else "",
                "cleaning": method_label(method, k),
                f"best acc at ASR ≤ {pct} (%)": selected_cell(best, digits),
                "change vs poisoned": format_change(best["rel_change_mean"], best["rel_change_std"], digits)
                if best["n_found"] else "",
                "min ASR (%)": min_asr_cell(lowest, digits),
                "seeds": str(best["n_seeds"]),
            })
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


def headline_table(rows: Sequence[dict], tau: float = HEADLINE_TAU, digits: int = 1) -> str:
    """Markdown: per pre-training objective, the poisoned model's acc/ASR and, per cleaning method,
    the best accuracy at ASR ≤ τ (oracle selection over every lr × epoch ≥ 1), its relative change
    from the poisoned model, and the minimum ASR reached — mean ± std over seeds."""
    records = headline_rows(rows, tau, digits)
    if not records:
        return "_No results yet._\n"
    return markdown_table(records) + "\n" + headline_note(rows, tau) + "\n"


def headline_note(rows: Sequence[dict], tau: float = HEADLINE_TAU) -> str:
    """The sentence under the headline table saying what its numbers are."""
    rows = typed_rows(rows)
    n = len({r["seed"] for r in rows})
    note = (f"Top-1 zero-shot accuracy and attack success rate in %, mean ± std over {n} "
            f"seed{'s' if n != 1 else ''}. Best acc: the highest accuracy among all "
            f"(learning rate, epoch ≥ 1) cleaning checkpoints with ASR ≤ {tau * 100:g}% (the paper's "
            f"selection, which peeks at ASR); \"none\": no checkpoint got there; (a/b seeds): it did in "
            f"a of b seeds, and the mean is over those.")
    runs = {r.get("run") for r in clean_rows(rows)}
    n_pruned = len({r.get("run") for r in clean_rows(rows) if r.get("pruned") is not None})
    if n_pruned:
        note += (f" Pruned (cleaning.prune): {n_pruned} of {len(runs)} cleaning runs were stopped early by "
                 f"successive halving; \"not explored\": no trained checkpoint reached ASR ≤ {tau * 100:g}% "
                 f"and some runs of the group were stopped before their last epoch (they might have).")
    unlearned = unlearned_backdoors(rows, tau)
    if unlearned:
        plural = len(unlearned) > 1
        note += (f" Warning: the poisoned {' and '.join(unlearned)} model{'s' if plural else ''} already "
                 f"ha{'ve' if plural else 's'} ASR ≤ {tau * 100:g}% (the backdoor was not learned), so "
                 f"{'their' if plural else 'its'} rows say nothing about cleaning.")
    uneven = [] if unlearned else uneven_backdoors(rows)  # one warning about backdoor strength is enough
    if uneven:
        note += (f" Note: the poisoned models learned backdoors of unequal strength (ASR "
                 f"{backdoor_listing(uneven)}); a "
                 f"weaker backdoor is not necessarily easier to remove, but compare with that in mind.")
    return note


def uneven_backdoors(rows: Sequence[dict], gap: float = UNEVEN_ASR_GAP) -> list[tuple[str, float]]:
    """``[(objective label, mean poisoned ASR), ...]`` when those ASRs span ``gap`` or more, else ``[]``."""
    asrs = [(objective_label(r["pretrain"]), r["asr1_mean"]) for r in poisoned_table(rows)
            if r["asr1_mean"] is not None]
    if len(asrs) < 2 or max(a for _, a in asrs) - min(a for _, a in asrs) < gap - _TAU_SLACK:
        return []
    return asrs


def backdoor_listing(asrs: Sequence[tuple[str, float]]) -> str:
    """``MMCL 98%, MMCL+SSL 72%``."""
    return ", ".join(f"{label} {asr * 100:.0f}%" for label, asr in asrs)


def unlearned_backdoors(rows: Sequence[dict], tau: float = HEADLINE_TAU) -> list[str]:
    """Objectives whose poisoned model (mean over seeds) is already at ASR ≤ τ."""
    return [objective_label(r["pretrain"]) for r in poisoned_table(rows)
            if r["asr1_mean"] is not None and r["asr1_mean"] <= tau + _TAU_SLACK]
