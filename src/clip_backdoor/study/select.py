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
- ``min-asr@acc>=90%`` (oracle, threshold-free): lowest asr1 among points that keep ≥ 90% of the
  poisoned model's acc1; "none" if no point keeps that much. Ties as ``min-asr``.
- ``last-epoch`` (realistic): every lr's last evaluated epoch; the lr whose last epoch has the
  highest acc1. Ties: smaller lr.
- ``best-acc`` (realistic): the point with the highest acc1 anywhere. Ties: earlier epoch, smaller lr.

The realistic rules choose by accuracy alone and then report the ASR of what they chose, so the
gap to the oracle shows what a defender without a trigger oracle would actually get.

Held-out selection: when the results carry a validation split (``val_acc1``, ``val_asr1``), every
rule is applied twice, ``selected_on = "test"`` (the oracle: it chooses on the numbers it reports)
and ``selected_on = "validation"`` (it chooses (lr, epoch) on the validation split's numbers, and
reports that checkpoint's test numbers). The oracle's *optimism* is, per seed, how much better the
oracle's pick looks than the validation-selected one: test acc1 (oracle − validation) for rules that
maximise accuracy, test asr1 (validation − oracle) for rules that minimise ASR.

Aggregation over seeds: the mean and the half-width of its Student-t interval at the study's
confidence level (``*_ci``; t quantile with n − 1 degrees of freedom; none for one seed), plus the
sample standard deviation (``*_std``), over the seeds where the rule found a point; the count of
such seeds is reported next to it.
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
from clip_backdoor.study.stats import mean_interval, wilson

# results.csv, one row per evaluated (run, epoch). start_epoch: the pre-training epoch a cleaning run
# starts from; init: "transformed" on the epoch-0 row of a method that changes the weights before its
# first step (shrink-perturb), so that row is not the poisoned model.
# stage: pretrain | baseline (pre-trained without poisons) | clean. val_*: the validation split's
# metrics (held-out selection). *_lo / *_hi: the Wilson interval of that proportion at the study's
# confidence level, from the metric and its count (n for accuracy, n_asr for ASR).
VAL_COLUMNS = ("val_acc1", "val_acc5", "val_asr1", "val_asr5", "val_ra1", "val_n", "val_n_asr")
INTERVALS = (("acc1", "n"), ("asr1", "n_asr"), ("val_acc1", "val_n"), ("val_asr1", "val_n_asr"))
INTERVAL_COLUMNS = tuple(f"{m}_{end}" for m, _ in INTERVALS for end in ("lo", "hi"))
COLUMNS = ("seed", "stage", "pretrain", "method", "lr", "k", "start_epoch", "epoch", "step", "init", "acc1",
           "acc5", "asr1", "asr5", "ra1", "n", "n_asr", *VAL_COLUMNS, *INTERVAL_COLUMNS,
           "loss", "loss_mmcl", "loss_ssl", "run", "pruned")
# pruned: the epoch at which successive halving stopped the run (cleaning.prune), empty otherwise
INT_COLUMNS = frozenset({"seed", "k", "start_epoch", "epoch", "step", "n", "n_asr", "val_n", "val_n_asr",
                         "pruned"})
METRICS = ("acc1", "acc5", "asr1", "asr5", "ra1")
VAL_METRICS = tuple(f"val_{m}" for m in METRICS)
FLOAT_COLUMNS = frozenset({"lr", *METRICS, *VAL_METRICS, *INTERVAL_COLUMNS, "loss", "loss_mmcl", "loss_ssl"})
REQUIRED_COLUMNS = ("stage", "pretrain", "epoch")
FRACTIONS = (*METRICS, *VAL_METRICS, *INTERVAL_COLUMNS)  # checked to lie in [0, 1]

DEFAULT_TAUS = (0.01, 0.05, 0.10)
HEADLINE_TAU = 0.05
DEFAULT_CONFIDENCE = 0.95
KEEP_ACCURACY = 0.90  # the threshold-free summary: checkpoints that keep this share of the poisoned acc1
KEEP_RULE = f"min-asr@acc>={KEEP_ACCURACY * 100:g}%"
# ASR is a ratio of counts (e.g. 5/100); the slack keeps "exactly τ" inside the band despite rounding.
_TAU_SLACK = 1e-9
# Poisoned models whose ASRs differ by this much (absolute) learned backdoors of unequal strength:
# their cleaning results are not directly comparable, and the headline says so.
UNEVEN_ASR_GAP = 0.20

# Known names first, in the paper's order; anything else follows alphabetically.
OBJECTIVE_ORDER = ("mmcl", "mmcl+ssl", "ssl")
METHOD_ORDER = ("cleanclip", "mmcl", "ssl", "heavy-wd", "shrink-perturb", "deep-clustering", "par")
OBJECTIVE_LABELS = {"mmcl": "MMCL", "mmcl+ssl": "MMCL+SSL", "ssl": "SSL"}
METHOD_LABELS = {"cleanclip": "CleanCLIP", "mmcl": "MMCL only", "ssl": "SSL only",
                 "heavy-wd": "heavy weight decay", "shrink-perturb": "shrink & perturb",
                 "deep-clustering": "deep clustering", "par": "PAR"}
# A defended pre-training run's label is "<objective>,defense=<defence label>" (study.spec).
DEFENSE_SEP = ",defense="
DEFENSE_ORDER = ("safeclip", "roclip")
DEFENSE_LABELS = {"safeclip": "SafeCLIP", "roclip": "RoCLIP"}


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
    for metric in FRACTIONS:
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


method_key = _known_first(METHOD_ORDER)
_base_objective_key = _known_first(OBJECTIVE_ORDER)
_defense_key = _known_first(DEFENSE_ORDER)


def split_pretrain(name: str) -> tuple[str, str | None]:
    """``"mmcl,defense=safeclip"`` -> ``("mmcl", "safeclip")``; an undefended run -> ``(name, None)``."""
    objective, sep, defense = name.partition(DEFENSE_SEP)
    return (objective, defense) if sep else (name, None)


def is_defended(name: str) -> bool:
    return split_pretrain(name)[1] is not None


def objective_key(name: str) -> tuple:
    """Objectives in the paper's order, each followed by its defended runs."""
    objective, defense = split_pretrain(name)
    return (*_base_objective_key(objective), defense is not None, *_defense_key(defense or ""))


def defense_label(label: str) -> str:
    """``safeclip`` -> SafeCLIP; ``filter-dao-0.1`` -> filter-then-retrain (dao, 0.1)."""
    if label in DEFENSE_LABELS:
        return DEFENSE_LABELS[label]
    if label.startswith("filter-"):
        return f"filter-then-retrain ({', '.join(label.split('-', 2)[1:])})"
    return label


def objective_label(name: str) -> str:
    objective, defense = split_pretrain(name)
    base = OBJECTIVE_LABELS.get(objective, objective)
    return base if defense is None else f"{base} + {defense_label(defense)}"


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
    return [tau_rule(t) for t in taus] + ["min-asr", KEEP_RULE, "last-epoch", "best-acc"]


def tau_rule(tau: float) -> str:
    return f"asr<={tau * 100:g}%"


def rule_label(rule: str) -> str:
    if rule.startswith("asr<="):
        return f"best acc at ASR ≤ {rule[5:]}"
    return {"min-asr": "minimum ASR", KEEP_RULE: f"minimum ASR keeping ≥ {KEEP_ACCURACY * 100:g}% of the acc",
            "last-epoch": "last epoch, best lr by acc", "best-acc": "best acc anywhere"}[rule]


def rule_peeks_at_asr(rule: str) -> bool:
    return rule.startswith("asr<=") or rule in ("min-asr", KEEP_RULE)


def rule_minimises_asr(rule: str) -> bool:
    """The rules whose reported number is an ASR (the others report an accuracy)."""
    return rule in ("min-asr", KEEP_RULE)


def interval_cells(metrics: dict, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, float]:
    """The Wilson interval of every proportion of an evaluation that has its count: ``acc1_lo``,
    ``acc1_hi`` from ``acc1`` and ``n``; ``asr1_*`` from ``n_asr``; the same for ``val_``."""
    out: dict[str, float] = {}
    for metric, count in INTERVALS:
        value, n = finite(_number_or_none(metrics.get(metric))), _number_or_none(metrics.get(count))
        if value is None or n is None or n <= 0:
            continue
        lo, hi = wilson(round(value * n), int(n), confidence)
        out[f"{metric}_lo"], out[f"{metric}_hi"] = lo, hi
    return out


def _number_or_none(value) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
    val_acc1: float | None = None
    val_asr1: float | None = None


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

    The baseline is always the *unmodified* poisoned checkpoint the cleaning runs start from:
    1. the pre-training run's evaluation at that epoch (``start_epoch`` of its cleaning rows; without
       cleaning rows, or without the column, its last evaluated epoch);
    2. else an epoch-0 row of a cleaning run that did not change the weights before its first step
       (never ``init: transformed``: shrink-perturb's epoch 0 is the shrunk model).
    """
    rows = typed_rows(rows)
    start: dict[tuple, int] = {}
    for r in clean_rows(rows):
        if r.get("start_epoch") is not None:
            start.setdefault((r["seed"], r["pretrain"]), r["start_epoch"])
    pretrain: dict[tuple, dict] = {}
    for r in rows:
        if r["stage"] != "pretrain" or finite(r.get("acc1")) is None:
            continue
        key = (r["seed"], r["pretrain"])
        wanted = start.get(key)
        if wanted is not None:
            if r["epoch"] == wanted:
                pretrain[key] = r
        elif key not in pretrain or r["epoch"] > pretrain[key]["epoch"]:
            pretrain[key] = r
    found = {key: {**{m: r.get(m) for m in (*METRICS, *VAL_METRICS)}, "epoch": r["epoch"],
                   "source": f"pretrain epoch {r['epoch']}"} for key, r in pretrain.items()}
    epoch0 = sorted((r for r in clean_rows(rows) if r["epoch"] == 0 and r.get("init") != "transformed"
                     and finite(r.get("acc1")) is not None),
                    key=lambda r: (str(r.get("run") or ""), method_key(r.get("method") or ""),
                                   r.get("k") or 0, r.get("lr") or 0.0))
    for r in epoch0:
        found.setdefault((r["seed"], r["pretrain"]), {**{m: r.get(m) for m in (*METRICS, *VAL_METRICS)},
                                                      "epoch": None, "source": "clean epoch 0"})
    return found


def clean_baselines(rows: Sequence[dict]) -> dict[tuple, dict]:
    """(seed, pretrain) -> the clean baseline's metrics (``stage: baseline``, pre-trained without
    poisons): its evaluation at the epoch the poisoned model is measured at, else its last epoch."""
    rows = typed_rows(rows)
    poisoned = poisoned_models(rows)
    chosen: dict[tuple, dict] = {}
    for r in rows:
        if r["stage"] != "baseline" or finite(r.get("acc1")) is None:
            continue
        key = (r["seed"], r["pretrain"])
        wanted = (poisoned.get(key) or {}).get("epoch")
        old = chosen.get(key)
        if old is None or (old["epoch"] != wanted and (r["epoch"] == wanted or r["epoch"] > old["epoch"])):
            chosen[key] = r
    return {key: {**{m: r.get(m) for m in (*METRICS, *VAL_METRICS)}, "epoch": r["epoch"],
                  "source": f"baseline epoch {r['epoch']}"} for key, r in chosen.items()}


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
            groups[key].append(Point(r.get("lr"), r["epoch"], acc, finite(r.get("asr1")),
                                     finite(r.get("val_acc1")), finite(r.get("val_asr1"))))
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


def min_asr_keeping(points: Sequence[Point], poisoned_acc: float | None,
                    keep: float = KEEP_ACCURACY) -> tuple[Point | None, str]:
    """The lowest-ASR point among those with acc1 ≥ keep × the poisoned model's acc1."""
    measured = [p for p in points if p.asr1 is not None]
    if not points:
        return None, "no-points"
    if not measured:
        return None, "no-asr"
    if poisoned_acc is None:
        return None, "no-baseline"
    kept = [p for p in measured if p.acc1 >= keep * poisoned_acc - _TAU_SLACK]
    if not kept:
        return None, "none"
    return min(kept, key=lambda p: (p.asr1, -p.acc1, p.epoch, _lr(p))), "ok"


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


def apply_rule(rule: str, points: Sequence[Point],
               poisoned_acc: float | None = None) -> tuple[Point | None, str]:
    """The point ``rule`` chooses among ``points`` (by their acc1 / asr1), and a status."""
    if rule.startswith("asr<="):
        return best_at_asr(points, float(rule[5:].rstrip("%")) / 100)
    if rule == KEEP_RULE:
        return min_asr_keeping(points, poisoned_acc)
    return {"min-asr": min_asr, "last-epoch": last_epoch_best_lr, "best-acc": best_acc_anywhere}[rule](points)


def apply_rule_on_validation(rule: str, points: Sequence[Point],
                             poisoned_val_acc: float | None = None) -> tuple[Point | None, str]:
    """The point ``rule`` chooses by the validation split's numbers (the returned point still carries
    its test numbers, which are what is reported). Points without validation numbers are left out."""
    views = [(Point(p.lr, p.epoch, p.val_acc1, p.val_asr1), p) for p in points if p.val_acc1 is not None]
    chosen, status = apply_rule(rule, [view for view, _ in views], poisoned_val_acc)
    if status == "no-points" and points:
        status = "no-validation"
    return next((p for view, p in views if view is chosen), None), status


def has_validation(rows: Sequence[dict]) -> bool:
    return any(finite(r.get("val_acc1")) is not None for r in rows if r["stage"] == "clean")


def relative_change(acc: float | None, acc0: float | None) -> float | None:
    """(acc − acc0) / acc0, the paper's "relative drop" with its sign (negative = lost accuracy)."""
    if acc is None or acc0 is None or not acc0 > 0:
        return None
    return (acc - acc0) / acc0


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
SELECTIONS = ("test", "validation")  # oracle; validation-selected, test-reported


def select_per_seed(rows: Sequence[dict], taus: Sequence[float] = DEFAULT_TAUS) -> list[dict]:
    """One row per (seed, pretrain, method, k, rule, selected_on): the chosen point, or a status
    saying why none. ``selected_on = "validation"`` rows exist only when the results have a
    validation split; their acc1 / asr1 are the chosen checkpoint's *test* numbers (``val_acc1`` /
    ``val_asr1``: what it was chosen on).

    status: ok | none (ASR measured, no point qualifies) | not-explored (none among the points
    trained, and some runs of the group were pruned before their last epoch) | no-asr (no point has
    an ASR) | no-points (no cleaned epoch evaluated yet) | no-baseline (the rule needs the poisoned
    model's accuracy, which is missing) | no-validation (no point has validation numbers).
    """
    rows = typed_rows(rows)
    poisoned = poisoned_models(rows)
    selections = SELECTIONS if has_validation(rows) else SELECTIONS[:1]
    out = []
    groups = cleaning_points(rows)
    pruned = pruned_runs(rows)
    for key in sort_group_keys(groups):
        seed, pretrain, method, k = key
        points = groups[key]
        base = poisoned.get((seed, pretrain), {})
        for rule in rule_names(taus):
            for selected_on in selections:
                if selected_on == "test":
                    point, status = apply_rule(rule, points, base.get("acc1"))
                else:
                    point, status = apply_rule_on_validation(rule, points, base.get("val_acc1"))
                if status == "none" and pruned.get(key):  # cleaning.prune stopped some of its runs
                    status = "not-explored"
                out.append({
                    "seed": seed, "pretrain": pretrain, "method": method, "k": k, "rule": rule,
                    "selected_on": selected_on, "peeks_at_asr": rule_peeks_at_asr(rule), "status": status,
                    "acc1": point.acc1 if point else None, "asr1": point.asr1 if point else None,
                    "val_acc1": point.val_acc1 if point else None,
                    "val_asr1": point.val_asr1 if point else None,
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


def _summaries(row: dict, name: str, values: Sequence[float | None], confidence: float) -> None:
    """``name_mean``, ``name_ci`` (t-interval half-width) and ``name_std`` of the present values."""
    row[f"{name}_mean"], row[f"{name}_ci"] = mean_interval(values, confidence)
    row[f"{name}_std"] = mean_std(values)[1]


def selection_table(rows: Sequence[dict], taus: Sequence[float] = DEFAULT_TAUS,
                    confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
    """One row per (pretrain, method, k, rule, selected_on), aggregated over seeds: mean ± t interval
    (and std) of acc1, asr1 and relative change over the seeds where the rule found a point;
    ``n_found`` of ``n_seeds``; on validation rows, the oracle's optimism."""
    return aggregate_per_seed(select_per_seed(rows, taus), confidence)


def optimism(oracle: dict, validated: dict) -> float | None:
    """How much better the oracle's pick looks than the validation-selected one, in the rule's
    reported metric (test acc1 for accuracy rules, test asr1 for ASR rules); None unless both chose."""
    if oracle["status"] != "ok" or validated["status"] != "ok":
        return None
    if rule_minimises_asr(oracle["rule"]):
        if oracle["asr1"] is None or validated["asr1"] is None:
            return None
        return validated["asr1"] - oracle["asr1"]
    return oracle["acc1"] - validated["acc1"]


def aggregate_per_seed(per_seed: Sequence[dict], confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in per_seed:
        by_key[(r["pretrain"], r["method"], r["k"], r["rule"], r.get("selected_on", "test"))].append(r)
    out = []
    for (pretrain, method, k, rule, selected_on), group in by_key.items():
        group.sort(key=lambda r: r["seed"])
        found = [r for r in group if r["status"] == "ok"]
        statuses = {r["status"] for r in group}
        status = "ok" if found else next(s for s in ("not-explored", "none", "no-asr", "no-baseline",
                                                     "no-validation", "no-points") if s in statuses)
        row = {"pretrain": pretrain, "method": method, "k": k, "rule": rule, "selected_on": selected_on,
               "peeks_at_asr": rule_peeks_at_asr(rule), "status": status,
               "n_seeds": len(group), "n_found": len(found),
               "n_pruned": sum(r.get("n_pruned", 0) for r in group)}
        for metric in ("acc1", "asr1", "rel_change", "poisoned_acc1", "poisoned_asr1"):
            source = group if metric.startswith("poisoned") else found
            _summaries(row, metric, [r[metric] for r in source], confidence)
        if selected_on == "validation":
            oracle = {r["seed"]: r for r in by_key.get((pretrain, method, k, rule, "test"), [])}
            gaps = [optimism(oracle[r["seed"]], r) for r in group if r["seed"] in oracle]
            gaps = [g for g in gaps if g is not None]
            _summaries(row, "optimism", gaps, confidence)
            row["n_paired"] = len(gaps)
        row["lrs"] = ";".join(format_lr(r["lr"]) for r in found)
        row["epochs"] = ";".join(str(r["epoch"]) for r in found)
        row["seeds"] = ";".join(str(r["seed"]) for r in group)
        out.append(row)
    return out


def _per_objective_table(models: dict[tuple, dict], confidence: float) -> list[dict]:
    per_objective: dict[str, list[dict]] = defaultdict(list)
    for (seed, pretrain), metrics in sorted(models.items(), key=lambda kv: kv[0][0]):
        per_objective[pretrain].append({"seed": seed, **metrics})
    out = []
    for pretrain in sorted(per_objective, key=objective_key):
        group = per_objective[pretrain]
        row: dict = {"pretrain": pretrain, "n_seeds": len(group)}
        for metric in METRICS:
            _summaries(row, metric, [g[metric] for g in group], confidence)
        row["source"] = ";".join(sorted({g["source"] for g in group}))
        out.append(row)
    return out


def poisoned_table(rows: Sequence[dict], confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
    """Per pre-training objective: the poisoned model's metrics, mean ± t interval (and std) over seeds."""
    return _per_objective_table(poisoned_models(typed_rows(rows)), confidence)


def baseline_table(rows: Sequence[dict], confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
    """Per pre-training objective: the clean baseline's metrics (the floor), over seeds."""
    return _per_objective_table(clean_baselines(typed_rows(rows)), confidence)


def uneven_backdoors(rows: Sequence[dict], gap: float = UNEVEN_ASR_GAP) -> list[tuple[str, float]]:
    """``[(objective label, mean poisoned ASR), ...]`` when those ASRs span ``gap`` or more, else ``[]``."""
    asrs = [(objective_label(r["pretrain"]), r["asr1_mean"]) for r in poisoned_table(rows)
            if r["asr1_mean"] is not None and not is_defended(r["pretrain"])]
    if len(asrs) < 2 or max(a for _, a in asrs) - min(a for _, a in asrs) < gap - _TAU_SLACK:
        return []
    return asrs


def unlearned_backdoors(rows: Sequence[dict], tau: float = HEADLINE_TAU) -> list[str]:
    """Objectives whose poisoned model (mean over seeds) is already at ASR ≤ τ (a defended model at
    low ASR is the defence working, not an unlearned backdoor)."""
    from clip_backdoor.evaluate import backdoor_not_learned

    return [objective_label(r["pretrain"]) for r in poisoned_table(rows)
            if r["asr1_mean"] is not None and backdoor_not_learned(r["asr1_mean"], tau)
            and not is_defended(r["pretrain"])]
