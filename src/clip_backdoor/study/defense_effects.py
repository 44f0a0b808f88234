"""What each pre-training defence did to its objective: defended minus undefended, paired by seed.

Per (objective, defence): the defended model's accuracy and ASR minus those of the same objective's
undefended poisoned model of the same training seed (both as ``select.poisoned_models`` takes them:
the last evaluated pre-training epoch), mean ± t interval over seeds and a two-sided paired t-test;
and in how many seeds the defended model stayed at ASR ≤ τ (the backdoor kept out). Only seeds with
both models enter. A lower ASR bought with accuracy near chance is no clean model: the sentence puts
the two changes side by side so that neither is read alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from clip_backdoor.study import select
from clip_backdoor.study.stats import PairedTest, paired_t


def _p(test: PairedTest | None) -> str:
    if test is None:
        return "no test (fewer than 2 seeds)"
    return "p < 0.001" if test.p < 0.001 else f"p = {test.p:.3f}"


def _points(test: PairedTest | None, values: Sequence[float]) -> str:
    """``−81.9 ± 40.3`` percentage points (a single seed: its value, no ±)."""
    if not values:
        return ""
    mean = test.mean if test is not None else values[0]
    spread = f" ± {test.half_width * 100:.1f}" if test is not None and test.half_width is not None else ""
    return f"{mean * 100:+.1f}{spread}".replace("-", "−")


def defense_effects(rows: Sequence[dict], *, tau: float = select.HEADLINE_TAU,
                    confidence: float = select.DEFAULT_CONFIDENCE) -> list[dict]:
    """One record per defended pre-training: per-seed values and the paired tests (fractions)."""
    from clip_backdoor.evaluate import backdoor_not_learned

    models = select.poisoned_models(rows)
    out = []
    defended = sorted({p for _, p in models if select.is_defended(p)}, key=select.objective_key)
    for name in defended:
        objective, defense = select.split_pretrain(name)
        seeds = sorted(s for s, p in models if p == name and (s, objective) in models
                       and models[(s, name)].get("asr1") is not None
                       and models[(s, objective)].get("asr1") is not None)
        record = {"pretrain": name, "objective": objective, "defense": defense, "seeds": seeds}
        for metric in ("acc1", "asr1"):
            before = [models[(s, objective)][metric] for s in seeds]
            after = [models[(s, name)][metric] for s in seeds]
            record[f"{metric}_undefended"], record[f"{metric}_defended"] = before, after
            differences = [a - b for a, b in zip(after, before, strict=True)]
            record[f"{metric}_change"] = differences
            record[f"{metric}_test"] = paired_t(differences, confidence)
        record["kept_out"] = sum(backdoor_not_learned(a, tau) for a in record["asr1_defended"])
        out.append(record)
    return out


def defense_records(effects: Sequence[dict]) -> list[dict]:
    """``report/defenses.csv``: the numbers behind the table (fractions; ``*_ci``: interval half-widths)."""
    out = []
    for e in effects:
        record = {"pretrain": e["pretrain"], "objective": e["objective"], "defense": e["defense"],
                  "n_seeds": len(e["seeds"]), "seeds": " ".join(map(str, e["seeds"]))}
        for metric in ("acc1", "asr1"):
            test = e[f"{metric}_test"]
            values = e[f"{metric}_change"]
            record |= {f"{metric}_undefended": _mean(e[f"{metric}_undefended"]) if values else None,
                       f"{metric}_defended": _mean(e[f"{metric}_defended"]) if values else None,
                       f"{metric}_change": test.mean if test else (values[0] if values else None),
                       f"{metric}_change_ci": test.half_width if test else None,
                       f"{metric}_p": test.p if test else None}
        record["seeds_kept_out"] = e["kept_out"]
        out.append(record)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def defense_display(effects: Sequence[dict], *, tau: float = select.HEADLINE_TAU) -> list[dict]:
    """The table: one row per defended pre-training, changes in percentage points."""
    pct = f"{tau * 100:g}%"
    table = []
    for e in effects:
        if not e["seeds"]:
            continue
        table.append({
            "pre-training": select.objective_label(e["pretrain"]),
            "seeds": len(e["seeds"]),
            "acc: undefended → defended (%)": (f"{_mean(e['acc1_undefended']) * 100:.1f} → "
                                               f"{_mean(e['acc1_defended']) * 100:.1f}"),
            "acc change (points)": _points(e["acc1_test"], e["acc1_change"]),
            "acc p": _p(e["acc1_test"]),
            "ASR: undefended → defended (%)": (f"{_mean(e['asr1_undefended']) * 100:.1f} → "
                                               f"{_mean(e['asr1_defended']) * 100:.1f}"),
            "ASR change (points)": _points(e["asr1_test"], e["asr1_change"]),
            "ASR p": _p(e["asr1_test"]),
            f"seeds at ASR ≤ {pct}": f"{e['kept_out']} / {len(e['seeds'])}",
            "defended ASR per seed (%)": ", ".join(f"{a * 100:.1f}" for a in e["asr1_defended"]),
        })
    return table


def defense_sentences(effects: Sequence[dict], *, tau: float = select.HEADLINE_TAU,
                      confidence: float = select.DEFAULT_CONFIDENCE) -> str:
    """One computed sentence per defended pre-training (the headline's, for a defences study)."""
    level = f"{confidence * 100:g}%"
    pct = f"{tau * 100:g}%"
    out = []
    for e in effects:
        label = select.objective_label(e["pretrain"])
        if not e["seeds"]:
            out.append(f"{label}: no seed has both the defended and the undefended model evaluated yet.")
            continue
        n = len(e["seeds"])
        out.append(
            f"{label} against {select.objective_label(e['objective'])} undefended, paired over {n} "
            f"seed{'s' if n != 1 else ''}: ASR {_mean(e['asr1_undefended']) * 100:.1f}% → "
            f"{_mean(e['asr1_defended']) * 100:.1f}% ({_points(e['asr1_test'], e['asr1_change'])} points, "
            f"{_p(e['asr1_test'])}), accuracy {_mean(e['acc1_undefended']) * 100:.1f}% → "
            f"{_mean(e['acc1_defended']) * 100:.1f}% ({_points(e['acc1_test'], e['acc1_change'])} points, "
            f"{_p(e['acc1_test'])}); the backdoor was kept out (ASR ≤ {pct}) in {e['kept_out']} of {n} "
            f"seed{'s' if n != 1 else ''}.")
    if out:
        out.append(f"Defence changes are in percentage points, ± the half-width of the {level} t interval "
                   "over seeds; p: two-sided paired t-tests.")
    return "\n\n".join(out)
