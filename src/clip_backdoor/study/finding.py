"""Does the paper's finding hold in this study? One computed sentence, never a hand-written one.

The paper's finding: CleanCLIP removes the backdoor from an MMCL-pretrained model at little cost in
accuracy, but from an MMCL+SSL-pretrained model only at a large cost (or not at all). Here it is a
paired comparison over training seeds (each seed pre-trained both models and cleaned both):

1. **At ASR ≤ τ** (the paper's rule): per seed, CleanCLIP's relative accuracy change (the best
   accuracy at ASR ≤ τ against the poisoned model's, k = 0) on MMCL minus that on MMCL+SSL. A seed
   with *no* checkpoint at ASR ≤ τ enters as a change of −100% ("cleaning needed the model
   destroyed"): the most pessimistic value the change can take, so a model that cannot be cleaned
   counts as the worst possible outcome rather than vanishing from the comparison.
2. **Threshold-free**: per seed, the minimum ASR among checkpoints that keep ≥ 90% of the poisoned
   model's accuracy, on MMCL+SSL minus that on MMCL. A seed where no checkpoint keeps that much
   enters with the poisoned model's own ASR (the only "checkpoint" that keeps the accuracy is the
   untouched one, whose backdoor is intact).

Each is a two-sided paired t-test on the per-seed differences at level α = 1 − confidence. The
finding is *established* when p < α and the mean difference points the paper's way (positive);
otherwise it is printed as *not established*, saying why. Seeds enter only when both objectives
have evaluated CleanCLIP checkpoints; fewer than ``MIN_SEEDS`` such seeds are too few for a claim.
With a validation split the selections are validation-selected and test-reported; otherwise they
are the oracle's (and the sentence says so).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from clip_backdoor.study import select
from clip_backdoor.study.stats import PairedTest, paired_t, paired_t_power, seeds_for_power

MIN_SEEDS = 3
METHOD = "cleanclip"  # the paper's claim is about CleanCLIP
# Methods whose study rows get the same two sentences when the study cleans with them: PAR's
# question is the paper's, asked of another method (does the objective decide PAR's success too?).
FINDING_METHODS = ("cleanclip", "par")
OBJECTIVES = ("mmcl", "mmcl+ssl")  # (expected to clean easily, expected to resist)
DESTROYED = -1.0  # the relative change a seed enters with when no checkpoint reached ASR ≤ τ


@dataclass
class Comparison:
    """One paired comparison: per-seed values of both objectives, their differences and the test."""

    kind: str  # "tau" | "threshold-free"
    selected_on: str  # "test" (oracle) | "validation"
    method: str = METHOD
    objectives: tuple[str, str] = OBJECTIVES  # (expected to clean easily, expected to resist)
    seeds: list[int] = field(default_factory=list)
    first: list[float] = field(default_factory=list)  # MMCL
    second: list[float] = field(default_factory=list)  # MMCL+SSL
    imputed: list[tuple[int, str]] = field(default_factory=list)  # (seed, objective) that were imputed
    unexplored: list[tuple[int, str]] = field(default_factory=list)  # left out: pruning hid the answer
    differences: list[float] = field(default_factory=list)  # the paper's way is positive
    test: PairedTest | None = None
    status: str = "cannot be tested"  # established | not established | cannot be tested
    reason: str = ""

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def wins(self) -> int:
        """Seeds where the difference points the paper's way."""
        return sum(d > 0 for d in self.differences)


def _rows_by_seed(per_seed: Sequence[dict], objective: str, rule: str, selected_on: str,
                  method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in per_seed
            if r["pretrain"] == objective and r["method"] == method and r["k"] == 0 and r["rule"] == rule
            and r["selected_on"] == selected_on}


def compare(rows: Sequence[dict], *, confidence: float = select.DEFAULT_CONFIDENCE,
            tau: float = select.HEADLINE_TAU, kind: str = "tau", method: str = METHOD,
            objectives: tuple[str, str] = OBJECTIVES) -> Comparison:
    """The paired comparison of ``kind`` ("tau" or "threshold-free") of ``method`` over the study's seeds,
    between two pre-trainings (default MMCL, MMCL+SSL; a dose-response passes λ2 = 0 and another λ2)."""
    rows = select.typed_rows(rows)
    per_seed = select.select_per_seed(rows, taus=(tau,))
    selected_on = "validation" if any(r["selected_on"] == "validation" for r in per_seed) else "test"
    rule = select.tau_rule(tau) if kind == "tau" else select.KEEP_RULE
    out = Comparison(kind, selected_on, method, objectives)
    first, second = (_rows_by_seed(per_seed, o, rule, selected_on, method) for o in objectives)
    if not first or not second:
        missing = [select.objective_label(o) for o, got in zip(objectives, (first, second)) if not got]
        out.reason = (f"the study has no {select.method_label(method)} runs (k = 0) on the "
                      f"{' and '.join(missing)} model{'s' if len(missing) > 1 else ''}")
        return out
    for seed in sorted(set(first) & set(second)):
        values = []
        for objective, r in zip(objectives, (first[seed], second[seed])):
            value = _value(r, kind)
            if value is None:
                if r["status"] == "not-explored":  # nothing found, but a pruned run might have found it
                    out.unexplored.append((seed, objective))
                break
            if r["status"] != "ok":
                out.imputed.append((seed, objective))
            values.append(value)
        if len(values) < 2:  # not run yet, no ASR, no poisoned model: this seed says nothing
            continue
        out.seeds.append(seed)
        out.first.append(values[0])
        out.second.append(values[1])
        # τ rule: MMCL's change minus MMCL+SSL's; threshold-free: MMCL+SSL's ASR minus MMCL's.
        out.differences.append(values[0] - values[1] if kind == "tau" else values[1] - values[0])
    alpha = 1.0 - confidence
    if out.n == 0:
        out.reason = (_unexplored_note(out, tau, kind) if out.unexplored
                      else "no seed has evaluated checkpoints of both models yet")
        return out
    if out.n < MIN_SEEDS:
        out.status = "not established"
        out.reason = (f"too few seeds: {out.n} with both models cleaned, a paired test here needs at least "
                      f"{MIN_SEEDS}")
        return out
    out.test = paired_t(out.differences, confidence)
    if out.test.p < alpha and out.test.mean > 0:
        out.status = "established"
    else:
        out.status = "not established"
        out.reason = ("the difference points the other way" if out.test.mean <= 0 and out.test.p < alpha
                      else f"p = {_p(out.test.p)} is not below {alpha:g}")
    return out


def _unexplored_note(c: Comparison, tau: float, kind: str) -> str:
    """Which seeds pruning left out of the comparison, and how to get them back."""
    what = (f"reached ASR ≤ {tau * 100:g}%" if kind == "tau"
            else f"kept ≥ {select.KEEP_ACCURACY * 100:g}% of the accuracy")
    seeds = ", ".join(f"seed {seed} ({select.objective_label(o)})" for seed, o in c.unexplored)
    return (f"left out as not explored: {seeds}; no trained checkpoint {what} and some learning rates "
            "were pruned, which might have (`study run --no-prune` finishes them)")


def _value(r: dict, kind: str) -> float | None:
    """A seed's number for the comparison, imputed where the rule found no checkpoint (see above)."""
    if kind == "tau":
        if r["status"] == "ok":
            return r["rel_change"]
        return DESTROYED if r["status"] == "none" and r["poisoned_acc1"] else None
    if r["status"] == "ok":
        return r["asr1"]
    return r["poisoned_asr1"] if r["status"] == "none" else None


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def _pct(x: float, signed: bool = False) -> str:
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def sentence(c: Comparison, *, confidence: float = select.DEFAULT_CONFIDENCE,
             tau: float = select.HEADLINE_TAU) -> str:
    level = f"{(1 - confidence) * 100:g}%"
    a, b = (select.objective_label(o) for o in c.objectives)
    how = ("validation-selected, test-reported" if c.selected_on == "validation"
           else "oracle selection on the test split")
    method = select.method_label(c.method)
    whose = "The paper's finding" if c.method == METHOD else f"The paper's finding, asked of {method}"
    if c.kind == "tau":
        claim = (f"{whose} ({method} cleans an {a}-pretrained model at a smaller relative "
                 f"accuracy cost than an {b}-pretrained one, at ASR ≤ {tau * 100:g}%)")
    else:
        of = "" if c.method == METHOD else f", {method}"
        claim = (f"Threshold-free{of} (minimum ASR keeping ≥ {select.KEEP_ACCURACY * 100:g}% of the poisoned "
                 f"accuracy lower on {a} than on {b})")
    if c.n == 0:
        why = c.reason or "no seed has both models cleaned yet"
        return f"{claim}: cannot be tested — {why}."
    star = "*"
    per_seed = "; ".join(
        f"seed {seed}: {_fmt(x, c.kind)}{star if (seed, c.objectives[0]) in c.imputed else ''} vs "
        f"{_fmt(y, c.kind)}{star if (seed, c.objectives[1]) in c.imputed else ''}"
        for seed, x, y in zip(c.seeds, c.first, c.second))
    what = "accuracy change" if c.kind == "tau" else "minimum ASR"
    direction = f"{a} lost less accuracy" if c.kind == "tau" else f"{a} reached the lower ASR"
    text = (f"{claim}: {c.status} at the {level} level "
            f"({how}). {method}'s {what} on {a} vs {b}, per seed: {per_seed}; {direction} in {c.wins} of "
            f"{c.n} seeds")
    if c.test is not None:
        interval = f" ± {c.test.half_width * 100:.1f}" if c.test.half_width is not None else ""
        unit = "points of relative change" if c.kind == "tau" else "points of ASR"
        text += (f"; paired difference {c.test.mean * 100:+.1f}{interval} {unit} ({confidence * 100:g}% CI), "
                 f"two-sided paired t-test t({c.test.df}) = {c.test.t:.2f}, p = {_p(c.test.p)}")
        text += _power(c, confidence)
    if c.reason:
        text += f" — {c.reason}"
    if c.unexplored:
        text += f"; {_unexplored_note(c, tau, c.kind)}"
    text += "."
    if c.imputed:
        text += (f" (* no checkpoint reached ASR ≤ {tau * 100:g}%: counted as −100%, cleaning needed the "
                 "model destroyed.)" if c.kind == "tau" else
                 f" (* no checkpoint kept ≥ {select.KEEP_ACCURACY * 100:g}% of the accuracy: counted with "
                 "the poisoned model's ASR.)")
    return text


def _power(c: Comparison, confidence: float) -> str:
    """A planning estimate: the test's power if the true differences had the observed mean and spread."""
    sd = statistics.stdev(c.differences)
    if not sd > 0 or c.test.mean == 0:
        return ""
    power = paired_t_power(c.test.mean, sd, c.n, confidence)
    needed = seeds_for_power(c.test.mean, sd, 0.8, confidence)
    need = f"{needed} seeds reach 80%" if needed else "no feasible number of seeds reaches 80%"
    return f"; power at the observed mean and spread {power * 100:.0f}% with {c.n} seeds, {need}"


def _fmt(x: float, kind: str) -> str:
    return _pct(x, signed=True) if kind == "tau" else _pct(x)


def finding_text(rows: Sequence[dict], *, confidence: float = select.DEFAULT_CONFIDENCE,
                 tau: float = select.HEADLINE_TAU) -> str:
    """The two sentences (τ rule, threshold-free) as printed under the headline: for CleanCLIP, and
    for each other method of ``FINDING_METHODS`` the study cleans with (k = 0)."""
    rows = select.typed_rows(rows)
    present = {r.get("method") for r in select.clean_rows(rows) if not r.get("k")}
    methods = [METHOD, *(m for m in FINDING_METHODS if m != METHOD and m in present)]
    comparisons = [compare(rows, confidence=confidence, tau=tau, kind=kind, method=method)
                   for method in methods for kind in ("tau", "threshold-free")]
    return "\n\n".join(sentence(c, confidence=confidence, tau=tau) for c in comparisons)
