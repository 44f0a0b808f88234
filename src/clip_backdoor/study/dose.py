"""Dose-response over the pre-training SSL weight λ2: is there a threshold where cleaning starts to fail?

A study whose ``pretrain.objectives`` list MMCL (λ2 = 0) and MMCL+SSL entries with several
``ssl_weight`` values (each with its own ``label``) gets, per λ2, from ``results.csv``:

* the poisoned model's accuracy and ASR (the cleaning runs' epoch 0);
* the cleaning method's best accuracy at ASR ≤ τ and its relative change, and the minimum ASR
  reached, each as mean ± the t interval over seeds, with the number of seeds where a point reached
  ASR ≤ τ at all — selected as the headline selects (validation → test with a validation split, else
  the oracle on the test split);
* against λ2 = 0, paired by seed, the finding's two tests (``study.finding.compare`` with the two
  pre-trainings): the relative accuracy change at ASR ≤ τ (a seed that never got there enters as
  −100%) and the minimum ASR keeping ≥ 90% of the accuracy; the turn of the dose-response is the
  smallest λ2 whose difference is established;
* one figure, ``dose_response.png``/``.svg``: the cleaning cost (relative accuracy change of the
  best point at ASR ≤ τ; seeds that never got there are drawn as crosses below the axis) and the
  minimum ASR, against λ2.

Written into ``<study>/report/`` by :func:`clip_backdoor.study.report.write_report` whenever the
study has at least three values of λ2; :func:`write_dose_response` can also be called directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from clip_backdoor.study import finding, headline, select
from clip_backdoor.study.figures import STYLE, save_figure
from clip_backdoor.study.stats import t_half_width
from clip_backdoor.study.tables import write_csv

MIN_DOSES = 3  # fewer values of λ2 are not a dose-response


def ssl_weights(study_yaml: Path) -> dict[str, float]:
    """Objective label -> λ2 for the MMCL / MMCL+SSL entries of a study file (λ1 = 1 for both)."""
    from clip_backdoor.config import from_dict
    from clip_backdoor.study.spec import OBJECTIVES, PretrainSpec, _objective_entries

    data = yaml.safe_load(study_yaml.read_text(encoding="utf-8")) or {}
    pretrain = from_dict(PretrainSpec, data.get("pretrain") or {}, "pretrain")
    out = {}
    for label, (name, settings) in _objective_entries(pretrain).items():
        if name in ("mmcl", "mmcl+ssl"):
            out[label] = OBJECTIVES[name][1] * float(settings.ssl_weight)
    return out


def dose_table(rows: Sequence[dict], weights: dict[str, float], *, method: str = "cleanclip",
               tau: float = select.HEADLINE_TAU, confidence: float = select.DEFAULT_CONFIDENCE) -> list[dict]:
    """One row per λ2 (ascending): poisoned acc/ASR, best acc at ASR ≤ τ, its relative change, min ASR,
    and the paired tests against λ2 = 0."""
    rows = select.typed_rows(rows)
    per_seed = select.select_per_seed(rows, (tau,))
    rule = select.tau_rule(tau)
    selected_on = "validation" if select.has_validation(rows) else "test"
    chosen: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in per_seed:
        if (r["method"] == method and r["k"] == 0 and r["pretrain"] in weights
                and r["selected_on"] == selected_on):
            chosen[r["pretrain"]][r["rule"]].append(r)
    labels = sorted(chosen, key=lambda lab: (weights[lab], lab))
    zero = next((lab for lab in labels if weights[lab] == 0), None)
    out = []
    for label in labels:
        at_tau, lowest, kept = chosen[label][rule], chosen[label]["min-asr"], chosen[label][select.KEEP_RULE]
        found = [r for r in at_tau if r["status"] == "ok"]
        row: dict = {"label": label, "ssl_weight": weights[label], "method": method, "tau": tau,
                     "selected_on": selected_on, "confidence": confidence,
                     "n_seeds": len(at_tau), "n_cleaned": len(found)}
        for key, values in (
                ("poisoned_acc1", [r["poisoned_acc1"] for r in at_tau]),
                ("poisoned_asr1", [r["poisoned_asr1"] for r in at_tau]),
                ("best_acc1", [r["acc1"] for r in found]),
                ("rel_change", [r["rel_change"] for r in found]),
                ("min_asr1", [r["asr1"] for r in lowest if r["status"] == "ok"]),
                ("kept_asr1", [r["asr1"] if r["status"] == "ok" else r["poisoned_asr1"] for r in kept
                               if r["status"] in ("ok", "none")])):
            row[f"{key}_mean"], row[f"{key}_std"] = select.mean_std(values)
            row[f"{key}_ci"] = t_half_width(values, confidence) if len(values) > 1 else None
        for kind, name in (("tau", "cost"), ("threshold-free", "kept_asr")):
            c = (finding.compare(rows, confidence=confidence, tau=tau, kind=kind, method=method,
                                 objectives=(zero, label)) if zero is not None and label != zero else None)
            test = c.test if c is not None else None
            row[f"vs0_{name}_n"] = c.n if c is not None else None
            row[f"vs0_{name}_diff"] = test.mean if test else None
            row[f"vs0_{name}_ci"] = test.half_width if test else None
            row[f"vs0_{name}_p"] = test.p if test else None
            row[f"vs0_{name}_status"] = c.status if c is not None else None
        row["per_seed_rel_change"] = ";".join("" if r["status"] != "ok" or r["rel_change"] is None
                                              else f"{r['rel_change']:.4f}" for r in at_tau)
        row["per_seed_min_asr1"] = ";".join("" if r["asr1"] is None else f"{r['asr1']:.4f}" for r in lowest)
        # the threshold-free value per seed; "none" (nothing kept the accuracy): the poisoned model's ASR
        row["per_seed_kept_asr1"] = ";".join(_kept_text(r) for r in kept)
        out.append(row)
    return out


def _kept_text(r: dict) -> str:
    """A seed's threshold-free value; ``none:<poisoned ASR>`` when no checkpoint kept the accuracy."""
    if r["status"] == "ok":
        return f"{r['asr1']:.4f}"
    if r["status"] == "none" and r["poisoned_asr1"] is not None:
        return f"none:{r['poisoned_asr1']:.4f}"
    return ""


def _versus_zero(r: dict, name: str) -> str:
    if r[f"vs0_{name}_status"] is None:
        return "(reference)" if r["ssl_weight"] == 0 else "—"
    if r[f"vs0_{name}_diff"] is None:
        return r[f"vs0_{name}_status"]
    p = r[f"vs0_{name}_p"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    return (f"{headline.format_points(r[f'vs0_{name}_diff'], r[f'vs0_{name}_ci'])} ({p_text}; "
            f"{r[f'vs0_{name}_status']})")


def dose_turn(table: Sequence[dict]) -> str:
    """The sentence saying where the dose-response turns: the smallest λ2 > 0 whose paired difference
    from λ2 = 0 is established, per test."""
    parts = []
    for name, what in (("cost", f"the accuracy cost of reaching ASR ≤ {table[0]['tau'] * 100:g}%"),
                       ("kept_asr", f"the minimum ASR keeping ≥ {select.KEEP_ACCURACY * 100:g}% accuracy")):
        turned = [r for r in table if r[f"vs0_{name}_status"] == "established"]
        tested = [r for r in table if r[f"vs0_{name}_status"] is not None]
        if not tested:
            parts.append(f"{what}: not tested (no λ2 = 0 runs or no other λ2)")
        elif turned:
            first = min(turned, key=lambda r: r["ssl_weight"])
            where = ", ".join(f"{r['ssl_weight']:g}" for r in turned)
            parts.append(f"{what} is established higher than at λ2 = 0 from λ2 = {first['ssl_weight']:g} "
                         f"(established at λ2 ∈ {{{where}}} of {len(tested)} tested)")
        else:
            parts.append(f"{what}: no λ2 differs from λ2 = 0 established (none of {len(tested)} tested)")
    return "Where it turns — " + "; ".join(parts) + "."


def dose_markdown(table: Sequence[dict]) -> str:
    tau = f"{table[0]['tau'] * 100:g}%" if table else "5%"
    keep = f"{select.KEEP_ACCURACY * 100:g}%"
    records = [{
        "λ2": f"{r['ssl_weight']:g}", "objective": r["label"],
        "poisoned acc": headline.format_pct(r["poisoned_acc1_mean"], r["poisoned_acc1_ci"]),
        "poisoned ASR": headline.format_pct(r["poisoned_asr1_mean"], r["poisoned_asr1_ci"]),
        f"best acc at ASR ≤ {tau}": headline.format_pct(r["best_acc1_mean"], r["best_acc1_ci"]),
        "relative change": headline.format_change(r["rel_change_mean"], r["rel_change_ci"]),
        f"seeds reaching ASR ≤ {tau}": f"{r['n_cleaned']}/{r['n_seeds']}",
        "min ASR": headline.format_pct(r["min_asr1_mean"], r["min_asr1_ci"]),
        "extra cost vs λ2 = 0 (points, paired)": _versus_zero(r, "cost"),
        f"extra min ASR keeping ≥ {keep} acc vs λ2 = 0 (points, paired)": _versus_zero(r, "kept_asr"),
    } for r in table]
    method = select.method_label(table[0]["method"]) if table else "?"
    how = ("validation-selected, test-reported" if table and table[0]["selected_on"] == "validation"
           else "oracle selection on the test split")
    level = f"{table[0]['confidence'] * 100:g}%" if table else "95%"
    return (f"# Dose-response over the pre-training SSL weight λ2 ({method})\n\n"
            + headline.markdown_table(records)
            + f"\nMean ± half-width of the {level} t interval over seeds ({how}); the best accuracy and its "
            "relative change are over the seeds that reached the ASR level. Against λ2 = 0, per seed "
            "and paired (the headline's finding tests with λ2 = 0 in place of MMCL): extra cost = the "
            "relative accuracy change at λ2 = 0 minus that at this λ2 (a seed that never reached the ASR "
            f"level enters as −100%); extra minimum ASR = the minimum ASR keeping ≥ {keep} of the "
            "poisoned accuracy at this λ2 minus that at λ2 = 0; two-sided paired t-tests, "
            "\"established\" when p is below 1 − confidence and the difference is positive.\n\n"
            + (dose_turn(table) if table else "") + "\n")


def figure_dose_response(table: Sequence[dict]) -> Figure | str:
    if len(table) < MIN_DOSES:
        return f"needs at least {MIN_DOSES} values of λ2 with cleaning results"
    tau = f"{table[0]['tau'] * 100:g}%"
    fig = Figure(figsize=(11.5, 3.8), layout="constrained")
    cost, asr = fig.subplots(1, 2)
    xs = [r["ssl_weight"] for r in table]
    for ax in (cost, asr):
        ax.set_xlabel("pre-training SSL weight λ2")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    floor = -105.0
    for r in table:
        values = r["per_seed_rel_change"].split(";") if r["n_seeds"] else []
        ok = [100 * float(v) for v in values if v]
        missing = len(values) - len(ok)
        cost.scatter([r["ssl_weight"]] * len(ok), ok, color="#0072B2", alpha=0.6, s=22, zorder=3)
        if missing:
            cost.scatter([r["ssl_weight"]] * missing, [floor] * missing, marker="x", color="#D55E00", s=36,
                         zorder=3)
        lows = [100 * float(v) for v in r["per_seed_min_asr1"].split(";") if v]
        asr.scatter([r["ssl_weight"]] * len(lows), lows, color="#0072B2", alpha=0.6, s=22, zorder=3)
        kept = [v for v in r["per_seed_kept_asr1"].split(";") if v]
        found = [100 * float(v) for v in kept if not v.startswith("none:")]
        none = [100 * float(v[5:]) for v in kept if v.startswith("none:")]
        asr.scatter([r["ssl_weight"]] * len(found), found, color="#CC79A7", alpha=0.7, s=22, zorder=3)
        asr.scatter([r["ssl_weight"]] * len(none), none, color="#CC79A7", marker="x", s=36, zorder=3)
    means = [(r["ssl_weight"], 100 * r["rel_change_mean"]) for r in table if r["rel_change_mean"] is not None]
    if means:
        cost.plot(*zip(*means), color="#0072B2", lw=1.5, label="mean over cleaned seeds")
    cost.axhline(0, color="#7F7F7F", lw=0.8)
    cost.axhline(floor, color="#D55E00", lw=0.6, ls=":")
    cost.scatter([], [], marker="x", color="#D55E00", label=f"seed never reached ASR ≤ {tau}")
    cost.set_ylabel(f"accuracy change at ASR ≤ {tau} (%, relative)")
    cost.set_title("cost of cleaning")
    cost.set_ylim(floor - 8, max([5.0] + [m for _, m in means]) + 5)
    cost.legend(loc="upper right", frameon=False)
    lows = [(r["ssl_weight"], 100 * r["min_asr1_mean"]) for r in table if r["min_asr1_mean"] is not None]
    if lows:
        asr.plot(*zip(*lows), color="#0072B2", lw=1.5, label="minimum ASR reached (mean)")
    keeps = [(r["ssl_weight"], 100 * r["kept_asr1_mean"]) for r in table if r["kept_asr1_mean"] is not None]
    if keeps:
        asr.plot(*zip(*keeps), color="#CC79A7", lw=1.5,
                 label=f"minimum ASR keeping ≥ {select.KEEP_ACCURACY * 100:g}% accuracy (mean)")
        asr.scatter([], [], marker="x", color="#CC79A7", label="no checkpoint kept it: the poisoned ASR")
    poisoned = [(r["ssl_weight"], 100 * r["poisoned_asr1_mean"]) for r in table
                if r["poisoned_asr1_mean"] is not None]
    if poisoned:
        asr.plot(*zip(*poisoned), color="#000000", lw=1, ls="--", marker="*", label="poisoned model")
    asr.axhspan(0, 100 * table[0]["tau"], color="#009E73", alpha=0.12, lw=0)
    asr.set_ylim(-3, 103)
    asr.set_ylabel("attack success rate, top-1 (%)")
    asr.set_title("backdoor left after cleaning")
    asr.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize="small")
    fig.suptitle(f"{select.method_label(table[0]['method'])} against the pre-training SSL weight")
    return fig


def write_dose_response(study_dir: str | Path, rows: Sequence[dict], out_dir: Path, *,
                        tau: float = select.HEADLINE_TAU, method: str = "cleanclip",
                        confidence: float = select.DEFAULT_CONFIDENCE) -> list[Path]:
    """``dose_response.{md,csv,png,svg}`` in ``out_dir`` for a dose-response study; [] otherwise."""
    from clip_backdoor.fileio import atomic_write_text

    study_yaml = Path(study_dir) / "study.yaml"
    if not study_yaml.is_file():
        return []
    weights = ssl_weights(study_yaml)
    if len(set(weights.values())) < MIN_DOSES:
        return []
    table = dose_table(rows, weights, method=method, tau=tau, confidence=confidence)
    if not table:
        return []
    write_csv(out_dir / "dose_response.csv", table)
    atomic_write_text(out_dir / "dose_response.md", dose_markdown(table))
    paths = [out_dir / "dose_response.csv", out_dir / "dose_response.md"]
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = figure_dose_response(table)
        if not isinstance(fig, str):
            paths += save_figure(fig, out_dir, "dose_response")
    return paths
