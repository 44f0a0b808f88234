"""Constrained successive halving of the cleaning grid (opt-in: ``cleaning.prune``).

The paper's selection is "the best accuracy among checkpoints with ASR ≤ τ", over every learning
rate and epoch of a (seed, pre-training objective, method, k) group. Most learning rates lose that
contest early: they keep the backdoor, or they destroy accuracy. Successive halving trains every
learning rate of a group to the first rung (an epoch), keeps the best ``1/eta`` of them, trains
those to the next rung, and so on; the survivors of the last rung finish. A paused run keeps the
full run's cosine schedule (``stop_epoch``), so its trajectory is the one the full grid would
have had, and resuming it later is exact.

Rung score for one τ, over a run's evaluated epochs 1..rung:

- a run that has reached ASR ≤ τ (feasible) ranks by its best accuracy among such epochs, ahead of
  every run that has not;
- a run that has not ranks by its lowest ASR;
- a run that has not reached τ, but whose accuracy at the rung is still above the group's best
  feasible accuracy (the incumbent), is never pruned: it may still get below τ with a better
  accuracy than the incumbent. (With no feasible run yet there is no incumbent, and the ranking by
  ASR alone decides.)

The best ``ceil(n / eta)`` are kept for each τ; with several τ the union of those survivors goes on.
Every decision is a pure function of the runs' ``metrics.jsonl`` rows up to the rung, so a
restarted study makes the same decisions, whatever ran when. A pruned run gets ``pruned.json``
(rung, epoch, incumbent, survivors) and keeps its ``latest.pt``: ``study run --no-prune`` finishes it.

With a validation split (``val_acc1``, ``val_asr1`` in the rows) every score is on the validation
split: the held-out selection chooses there and reports the test split, and pruning on the test
split would let the test numbers decide which checkpoints the held-out selection may choose from.

Caveat: ASR can rebound, and a pruned learning rate might have got below τ later. The report marks
a group whose selection found nothing as "not explored" when some of its runs were pruned, never
as "none".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from clip_backdoor.errors import UserError

PRUNED = "pruned.json"
_TAU_SLACK = 1e-9  # as in select.py: "exactly τ" is inside the band


@dataclass(frozen=True)
class PruneSettings:
    eta: int
    rungs: tuple[int, ...]
    thresholds: tuple[float, ...]
    protect: bool = True  # never prune a run not yet at τ whose accuracy is above the incumbent's
    keep: bool = True  # also keep the best runs by the report's threshold-free cell (see ``keep_score``)


def parse_prune(data, epochs: int, thresholds: Sequence[float],
                where: str = "cleaning.prune") -> PruneSettings | None:
    """``{eta: 3, rungs: [1, 3], thresholds: [0.05], protect: true, keep: true}`` (thresholds default
    to the study's)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping such as {{eta: 3, rungs: [1, 3]}}, got {data!r}")
    for key in data:
        if key not in ("eta", "rungs", "thresholds", "protect", "keep"):
            raise UserError(f"{where}.{key}: unknown key (valid: eta, rungs, thresholds, protect, keep)")
    eta = data.get("eta", 3)
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise UserError(f"{where}.eta: {eta!r} must be an integer >= 2 (keep the best 1/eta at each rung)")
    rungs = data.get("rungs")
    if not isinstance(rungs, list) or not rungs:
        raise UserError(f"{where}.rungs: give the epochs to decide at, e.g. [1, 3]")
    for i, r in enumerate(rungs):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise UserError(f"{where}.rungs[{i}]: {r!r} is not an epoch >= 1")
        if i and r <= rungs[i - 1]:
            raise UserError(f"{where}.rungs[{i}]: {r} must come after {rungs[i - 1]} (rungs increase)")
    if rungs[0] >= epochs:
        raise UserError(f"{where}.rungs: {rungs} leaves no rung before the last cleaning epoch "
                        f"(cleaning.epochs={epochs}); a rung must be an epoch < {epochs}")
    if rungs[-1] >= epochs:
        raise UserError(f"{where}.rungs: {rungs[-1]} is not before the last cleaning epoch "
                        f"(cleaning.epochs={epochs}); a decision there saves nothing")
    taus = data.get("thresholds", list(thresholds))
    if not isinstance(taus, list) or not taus:
        raise UserError(f"{where}.thresholds: give the ASR levels to keep runs for, e.g. [0.05]")
    for i, t in enumerate(taus):
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1:
            raise UserError(f"{where}.thresholds[{i}]: {t!r} must be an ASR fraction in (0, 1]")
    protect = data.get("protect", True)
    if not isinstance(protect, bool):
        raise UserError(f"{where}.protect: expected true or false, got {protect!r}")
    keep = data.get("keep", True)
    if not isinstance(keep, bool):
        raise UserError(f"{where}.keep: expected true or false, got {keep!r}")
    return PruneSettings(eta, tuple(rungs), tuple(float(t) for t in taus), protect, keep)


# ----------------------------------------------------------------------------------------------
# One decision
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """A run's standing at a rung for one τ."""

    run: str
    feasible: bool
    best_acc: float | None  # the best accuracy among epochs with ASR ≤ τ (feasible runs)
    min_asr: float | None
    acc_now: float | None  # accuracy at the run's last evaluated epoch <= rung
    epoch: int | None  # the epoch of best_acc (feasible) or of acc_now

    def key(self, tiebreak=None) -> tuple:
        """Sort key: feasible first by best accuracy, then the others by lowest ASR; ``tiebreak``
        (e.g. the learning rate, as the selection's ties go to the smaller one) then the name."""
        last = (tiebreak, self.run) if tiebreak is not None else (self.run,)
        if self.feasible:
            return (0, -self.best_acc, self.min_asr, *last)
        return (1, self.min_asr if self.min_asr is not None else math.inf,
                -(self.acc_now if self.acc_now is not None else -math.inf), *last)


def _finite(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def split_of(rows: Mapping[str, Sequence[dict]]) -> str:
    """The metrics' prefix pruning ranks on: ``"val_"`` when the group's rows carry a validation split
    (the held-out selection chooses on it, so pruning must not look at the test split it reports on),
    else ``""`` (the test split, which the oracle selection chooses on anyway)."""
    return "val_" if any(_finite(r.get("val_acc1")) is not None for m in rows.values() for r in m) else ""


def _points(rows: Sequence[dict], epoch: int, split: str) -> list[tuple[int, float, float | None]]:
    """(epoch, acc1, asr1) of a run's evaluated epochs 1..epoch on ``split``."""
    points = [(int(r["epoch"]), _finite(r.get(f"{split}acc1")), _finite(r.get(f"{split}asr1"))) for r in rows
              if 1 <= int(r["epoch"]) <= epoch]
    return [p for p in points if p[1] is not None]


def score(run: str, rows: Sequence[dict], epoch: int, tau: float, split: str = "") -> Score:
    points = _points(rows, epoch, split)
    if not points:
        return Score(run, False, None, None, None, None)
    last = max(points, key=lambda p: p[0])
    asrs = [p[2] for p in points if p[2] is not None]
    ok = [p for p in points if p[2] is not None and p[2] <= tau + _TAU_SLACK]
    if ok:
        best = min(ok, key=lambda p: (-p[1], p[2], p[0]))
        return Score(run, True, best[1], min(asrs), last[1], best[0])
    return Score(run, False, None, min(asrs) if asrs else None, last[1], last[0])


def keep_score(rows: Sequence[dict], epoch: int, poisoned: float | None, split: str = "") -> tuple:
    """A run's standing by the report's threshold-free cell at a rung: its lowest ASR among epochs
    1..rung that keep ``KEEP_ACCURACY`` of the poisoned model's accuracy (the report's own rule,
    ``select.min_asr_keeping``; lower first), then its accuracy now (higher first); a run with no
    such epoch ranks after every run with one."""
    from clip_backdoor.study.select import Point, min_asr_keeping

    points = _points(rows, epoch, split)
    now = max(points, key=lambda p: p[0])[1] if points else None
    best, _ = min_asr_keeping([Point(None, e, acc, asr) for e, acc, asr in points], poisoned)
    return (best.asr1 if best else math.inf, -(now if now is not None else -math.inf))


def poisoned_accuracy(rows: Mapping[str, Sequence[dict]], split: str = "") -> float | None:
    """The group's starting (epoch-0) accuracy: every run of a group starts from the same model."""
    start = next((r for run in rows.values() for r in run if int(r["epoch"]) == 0), {})
    return _finite(start.get(f"{split}acc1"))


@dataclass
class Decision:
    keep: list[str]
    pruned: list[str]
    incumbents: dict[float, dict | None] = field(default_factory=dict)  # τ -> best feasible run
    scores: dict[float, list[Score]] = field(default_factory=dict)  # τ -> ranking
    split: str = ""  # the metrics ranked on: "val_" (validation split) or "" (test)
    free: list[str] = field(default_factory=list)  # the ranking by the threshold-free cell (keep_free)


def decide(rows: Mapping[str, Sequence[dict]], epoch: int, eta: int, taus: Sequence[float],
           tiebreak: Mapping[str, float] | None = None, protect: bool = True,
           keep_free: bool = True) -> Decision:
    """Which runs of one group go on past the rung at ``epoch``: a pure function of their metrics
    rows (``{run: [metrics.jsonl rows]}``); only rows of epochs 1..epoch count. Equal scores go to
    the smaller ``tiebreak[run]`` (the learning rate), then the name. ``protect=False`` drops the
    rule that keeps runs more accurate than the incumbent; ``keep_free`` also keeps the best
    ``ceil(n / eta)`` by the threshold-free cell (``keep_score``)."""
    names = sorted(rows)
    tiebreak = tiebreak or {}
    split = split_of(rows)
    n_keep = math.ceil(len(names) / eta)
    keep: set[str] = set()
    decision = Decision([], [])
    for tau in taus:
        ranking = sorted((score(name, rows[name], epoch, tau, split) for name in names),
                         key=lambda s: s.key(tiebreak.get(s.run)))
        feasible = [s for s in ranking if s.feasible]
        incumbent = feasible[0] if feasible else None
        kept = {s.run for s in ranking[:n_keep]}
        if protect and incumbent is not None:  # more accurate than the incumbent: may get below τ later
            kept |= {s.run for s in ranking if not s.feasible and s.acc_now is not None
                     and s.acc_now > incumbent.best_acc}
        keep |= kept
        decision.scores[tau] = ranking
        decision.incumbents[tau] = None if incumbent is None else {
            "run": incumbent.run, "acc1": incumbent.best_acc, "epoch": incumbent.epoch}
    if keep_free:
        poisoned = poisoned_accuracy(rows, split)
        ranking = sorted(names, key=lambda n: (*keep_score(rows[n], epoch, poisoned, split),
                                               tiebreak.get(n, math.inf), n))
        decision.free = ranking
        keep |= set(ranking[:n_keep])
    decision.split = split
    decision.keep = [n for n in names if n in keep]
    decision.pruned = [n for n in names if n not in keep]
    return decision


def pruned_record(decision: Decision, run: str, rung: int, epoch: int, eta: int) -> dict:
    """What ``pruned.json`` says about one pruned run."""
    standing = {}
    for tau, ranking in decision.scores.items():
        s = next(s for s in ranking if s.run == run)
        standing[f"{tau:g}"] = {"rank": ranking.index(s) + 1, "of": len(ranking), "feasible": s.feasible,
                                "best_acc1": s.best_acc, "min_asr1": s.min_asr, "acc1": s.acc_now}
    if decision.free:
        standing["threshold-free"] = {"rank": decision.free.index(run) + 1, "of": len(decision.free)}
    return {"rung": rung, "epoch": epoch, "eta": eta, "split": "validation" if decision.split else "test",
            "survivors": decision.keep, "standing": standing,
            "incumbent": {f"{tau:g}": inc for tau, inc in decision.incumbents.items()}}


# ----------------------------------------------------------------------------------------------
# A group over the rungs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """What a run of a group does next: ``train`` to ``stop`` (None: to the end), ``wait`` for the
    rest of the group to reach the rung, ``pruned`` (with its record), or ``done``."""

    action: str
    stop: int | None = None
    record: dict | None = None


def last_epoch(rows: Sequence[dict]) -> int:
    return max((int(r["epoch"]) for r in rows), default=0)


def group_states(rows: Mapping[str, Sequence[dict]], settings: PruneSettings,
                 finished: set[str] = frozenset(), dropped: set[str] = frozenset(),
                 tiebreak: Mapping[str, float] | None = None) -> dict[str, State]:
    """Where every run of a group stands, from the rows alone. ``finished``: runs that ran to the end
    (e.g. under --no-prune); ``dropped``: runs that failed in this invocation and are left out."""
    states: dict[str, State] = {}
    alive = sorted(set(rows) - set(dropped))
    for i, rung in enumerate(settings.rungs, start=1):
        if len(alive) <= 1:  # nothing left to choose between: the survivor trains on without pausing
            break
        behind = [m for m in alive if m not in finished and last_epoch(rows[m]) < rung]
        if behind:
            for m in alive:
                states[m] = State("train", rung) if m in behind else (
                    State("done") if m in finished else State("wait"))
            return states
        decision = decide({m: rows[m] for m in alive}, rung, settings.eta, settings.thresholds, tiebreak,
                          settings.protect, settings.keep)
        for m in decision.pruned:
            states[m] = State("done") if m in finished else State(
                "pruned", record=pruned_record(decision, m, i, rung, settings.eta))
        alive = decision.keep
    for m in alive:
        states[m] = State("done") if m in finished else State("train", None)
    return states


def simulate(rows: Mapping[str, Sequence[dict]], settings: PruneSettings, epochs: int,
             tiebreak: Mapping[str, float] | None = None) -> dict[str, int]:
    """Replay successive halving on the rows of a fully trained group: {run: epochs it would have
    trained}. Exact for this toolkit's runs, because a paused run's epochs are the full run's."""
    reached = {m: 0 for m in rows}
    while True:
        seen = {m: [r for r in rows[m] if int(r["epoch"]) <= reached[m]] for m in rows}
        states = group_states(seen, settings, tiebreak=tiebreak)
        moves = {m: min(s.stop or epochs, last_epoch(rows[m])) for m, s in states.items()
                 if s.action == "train"}
        if all(reached[m] == stop for m, stop in moves.items()):  # nothing left (or the rows end)
            return reached
        reached.update(moves)


def compute_share(trained: Mapping[str, int], epochs: int) -> float:
    """Cleaning epochs trained over those of the full grid."""
    return sum(trained.values()) / (epochs * len(trained)) if trained else 0.0


# ----------------------------------------------------------------------------------------------
# What pruning would have done on a finished full grid (``study prune-check``)
# ----------------------------------------------------------------------------------------------
def replay_groups(groups: Mapping[tuple, Mapping[str, Sequence[dict]]], lrs: Mapping[str, float],
                  settings: PruneSettings, epochs: int, agree_within: float = 0.01) -> dict:
    """For each group of full-grid rows: the epochs pruning would have trained, whether the best
    accuracy at ASR ≤ τ it would have selected is the full grid's (both "none", or both found with
    accuracies within ``agree_within``), and whether the threshold-free cell (the lowest ASR keeping
    90% of the poisoned accuracy, from the epoch-0 row) is (ASRs within ``agree_within``). Returns
    per-group records and the totals."""
    from clip_backdoor.study.select import KEEP_RULE, Point, apply_rule, apply_rule_on_validation, tau_rule

    def points(rows: Mapping[str, Sequence[dict]], reach: Mapping[str, int]) -> list[Point]:
        return [Point(lrs.get(run), int(r["epoch"]), float(r["acc1"]), _finite(r.get("asr1")),
                      _finite(r.get("val_acc1")), _finite(r.get("val_asr1")))
                for run, run_rows in rows.items() for r in run_rows
                if 1 <= int(r["epoch"]) <= reach[run] and _finite(r.get("acc1")) is not None]

    records, trained_all = [], {}
    for key, rows in groups.items():
        trained = simulate(rows, settings, epochs, tiebreak=lrs)
        split = split_of(rows)
        # the report's selection: on the validation split when there is one (then test-reported)
        select = apply_rule_on_validation if split else apply_rule
        trained_all.update(trained)
        full_reach = {run: epochs for run in rows}
        record = {"group": key, "share": compute_share(trained, epochs), "taus": {}}
        for tau in settings.thresholds:
            full, _ = select(tau_rule(tau), points(rows, full_reach))
            pruned, _ = select(tau_rule(tau), points(rows, trained))
            both = full is not None and pruned is not None
            same = (full is None and pruned is None) or (
                both and abs(full.acc1 - pruned.acc1) <= agree_within + 1e-12)
            record["taus"][tau] = {"full": full, "pruned": pruned, "same": same}
        poisoned = poisoned_accuracy(rows, split)
        full, _ = select(KEEP_RULE, points(rows, full_reach), poisoned)
        pruned, _ = select(KEEP_RULE, points(rows, trained), poisoned)
        record["keep"] = {"full": full, "pruned": pruned, "same": (full is None and pruned is None) or (
            full is not None and pruned is not None and abs(full.asr1 - pruned.asr1) <= agree_within + 1e-12)}
        records.append(record)
    agree = {tau: sum(r["taus"][tau]["same"] for r in records) for tau in settings.thresholds}
    agree[KEEP_RULE] = sum(r["keep"]["same"] for r in records)
    validation = any(split_of(rows) for rows in groups.values())
    return {"groups": records, "share": compute_share(trained_all, epochs), "agree": agree,
            "n_groups": len(records), "split": "validation" if validation else "test"}
