"""The study report: tables (Markdown + CSV), figures (PNG + SVG) and ``index.html``, from local files.

``write_report(study_dir)`` reads ``<study_dir>/results.csv`` (and ``study.yaml`` for the page) and
writes everything into ``<study_dir>/report/``. It reports what exists and says what is missing, so
it can run on a study that is still going. Output files are byte-identical across reruns on the same
results (fixed SVG hash salt, no dates in metadata, no timestamps in the page).

The environment the runs ran in (each run's ``environment.json``, see ``clip_backdoor.environment``)
is shown once, with every field on which runs of the study differ and which runs those are;
``report/environment.json`` holds the common fingerprint and the differences.

Figures (matplotlib, Agg, no pyplot state):
  acc_vs_asr     every cleaning checkpoint (lr × epoch ≥ 1) in (ASR, accuracy), a panel per objective
  trajectories   the selected run of each method, epoch 0 → E, in the same plane
  pretraining    accuracy and ASR per pre-training epoch, a line per objective
  k_poisons      cleaning with 0 vs k poisons in the cleaning set (only when k > 0 runs exist)
"""

from __future__ import annotations

import csv
import html
import io
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from clip_backdoor import environment
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_write_bytes, atomic_write_text, write_json
from clip_backdoor.study import headline, select
from clip_backdoor.study.headline import format_change, format_pct
from clip_backdoor.study.select import (
    DEFAULT_CONFIDENCE,
    DEFAULT_TAUS,
    HEADLINE_TAU,
    format_lr,
    is_defended,
    method_key,
    method_label,
    objective_key,
    objective_label,
    rule_label,
    split_pretrain,
    tau_rule,
)

log = logging.getLogger(__name__)

# Okabe–Ito (colour-blind safe); a method keeps its colour in every figure. Yellow is left out:
# it disappears on white.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000")
METHOD_COLOURS = {"cleanclip": "#0072B2", "mmcl": "#D55E00", "ssl": "#009E73", "heavy-wd": "#E69F00",
                  "shrink-perturb": "#CC79A7", "deep-clustering": "#56B4E9"}
EXTRA_COLOURS = ("#000000", "#7F7F7F", "#8C564B", "#17BECF", "#BCBD22", "#9467BD")
OBJECTIVE_STYLES = {"mmcl": ("#000000", "-"), "mmcl+ssl": ("#E69F00", "--"), "ssl": ("#56B4E9", ":")}
# a defended pre-training run: its objective's line style, the defence's colour
DEFENSE_COLOURS = {"safeclip": "#009E73", "roclip": "#CC79A7"}
FILTER_COLOUR = "#0072B2"
K_MARKERS = ("^", "s", "D", "v", "P")  # k > 0 points, hollow; k = 0 is a filled circle

STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12,
    "axes.spines.top": False, "axes.spines.right": False,
    "svg.hashsalt": "clip-backdoor", "svg.fonttype": "path",
}
PNG_DPI = 130
REPORT_FILES = ("headline.md", "selection.csv", "selection.md", "selection_per_seed.csv", "poisoned.csv",
                "runs.csv", "runs.md", "environment.json", "../results.csv")
FIGURE_NAMES = ("acc_vs_asr", "trajectories", "pretraining", "k_poisons")
ACC_LABEL = "zero-shot accuracy, top-1 (%)"
ASR_LABEL = "attack success rate, top-1 (%)"


# ------------------------------------------------------------------------------------------------
# What the figures and tables draw from
# ------------------------------------------------------------------------------------------------
@dataclass
class StudyData:
    rows: list[dict]
    tau: float
    taus: tuple[float, ...]
    clean: list[dict] = field(init=False)
    pretrain: list[dict] = field(init=False)
    objectives: list[str] = field(init=False)
    methods: list[str] = field(init=False)
    ks: list[int] = field(init=False)
    seeds: list[int] = field(init=False)
    has_asr: bool = field(init=False)
    poisoned: dict[tuple, dict] = field(init=False)
    per_seed: list[dict] = field(init=False)
    colours: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.clean = select.clean_rows(self.rows)
        self.pretrain = [r for r in self.rows if r["stage"] == "pretrain"]
        self.objectives = sorted({r["pretrain"] for r in self.rows}, key=objective_key)
        self.methods = sorted({r["method"] or "" for r in self.clean}, key=method_key)
        self.ks = sorted({r["k"] or 0 for r in self.clean})
        self.seeds = sorted({r["seed"] for r in self.rows})
        self.has_asr = any(select.finite(r.get("asr1")) is not None for r in self.rows)
        self.poisoned = select.poisoned_models(self.rows)
        self.per_seed = select.select_per_seed(self.rows, self.taus)
        spare = [c for c in dict.fromkeys(EXTRA_COLOURS + OKABE_ITO) if c not in METHOD_COLOURS.values()]
        unknown = iter(spare)  # methods outside the known list, in sorted order
        self.colours = {m: METHOD_COLOURS.get(m) or next(unknown, "#7F7F7F") for m in self.methods}

    def cleaned_points(self, objective: str) -> list[dict]:
        """Rows of cleaned checkpoints (epoch ≥ 1) with both accuracy and ASR."""
        return [r for r in self.clean if r["pretrain"] == objective and r["epoch"] >= 1
                and _pct(r.get("acc1")) is not None and _pct(r.get("asr1")) is not None]


def _pct(x: float | None) -> float | None:
    x = select.finite(x)
    return None if x is None else 100 * x


def _seed_alpha(n_seeds: int) -> float:
    """Overlapping seeds darken where they agree."""
    return 0.75 if n_seeds == 1 else max(0.35, 0.75 / n_seeds ** 0.5)


# ------------------------------------------------------------------------------------------------
# Figures: each returns a Figure, or a sentence saying why it was skipped
# ------------------------------------------------------------------------------------------------
def _panels(n: int, width: float, height: float, sharey: bool = True, rows: int = 1):
    fig = Figure(figsize=(width * n + 2.4, height * rows), layout="constrained")
    axes = fig.subplots(rows, n, sharey=sharey, squeeze=False)
    return fig, axes


def _poisoned_stars(ax, data: StudyData, objective: str) -> None:
    """One star per seed: each seed pre-trained its own poisoned model."""
    for seed in data.seeds:
        base = data.poisoned.get((seed, objective))
        if base and _pct(base.get("asr1")) is not None and _pct(base.get("acc1")) is not None:
            ax.scatter(_pct(base["asr1"]), _pct(base["acc1"]), marker="*", s=260, color="#000000",
                       edgecolors="white", linewidths=0.8, zorder=5)


def _asr_band(ax, tau: float) -> None:
    ax.axvspan(0, tau * 100, color="#DDDDDD", zorder=0, lw=0)
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3, lw=0.6)


def _accuracy_axis(axes, data: StudyData, objectives: Sequence[str]) -> None:
    """From 0 to a little above the highest point, so the poisoned model's star is not cut off."""
    values = [_pct(r.get("acc1")) for r in data.clean if r["pretrain"] in objectives]
    values += [_pct(v.get("acc1")) for (_, o), v in data.poisoned.items() if o in objectives]
    top = max((v for v in values if v is not None), default=100.0)
    for ax in axes:
        ax.set_ylim(0, min(100.0, top * 1.07) + 1)


def _method_handles(data: StudyData, methods: Sequence[str]) -> list:
    return [Line2D([], [], marker="o", ls="", color=data.colours[m], markersize=7, label=method_label(m))
            for m in methods]


def _band_and_star_handles(tau: float) -> list:
    return [Line2D([], [], marker="*", ls="", color="#000000", markersize=13, label="poisoned model"),
            Patch(color="#DDDDDD", label=f"ASR ≤ {tau * 100:g}%")]


def figure_acc_vs_asr(data: StudyData) -> Figure | str:
    objectives = [o for o in data.objectives if data.cleaned_points(o)]
    if not objectives:
        return ("no cleaning checkpoint with both accuracy and ASR yet" if data.has_asr
                else "the results have no ASR (was the study run without an attack?)")
    fig, axes = _panels(len(objectives), 4.6, 4.4)
    alpha = _seed_alpha(len(data.seeds))
    for ax, objective in zip(axes[0], objectives):
        _asr_band(ax, data.tau)
        points = data.cleaned_points(objective)
        for method in data.methods:
            for k in data.ks:
                mine = [r for r in points if (r["method"] or "") == method and (r["k"] or 0) == k]
                if not mine:
                    continue
                x = [_pct(r["asr1"]) for r in mine]
                y = [_pct(r["acc1"]) for r in mine]
                colour = data.colours[method]
                if k == 0:
                    ax.scatter(x, y, s=22, color=colour, alpha=alpha, lw=0, zorder=3)
                else:
                    ax.scatter(x, y, s=26, marker=_k_marker(data, k), facecolors="none", edgecolors=colour,
                               alpha=alpha, lw=1.0, zorder=3)
        _poisoned_stars(ax, data, objective)
        ax.set_title(f"pre-trained with {objective_label(objective)}")
        ax.set_xlabel(ASR_LABEL)
    _accuracy_axis(axes[0], data, objectives)
    axes[0][0].set_ylabel(ACC_LABEL)
    handles = _method_handles(data, data.methods)
    handles += [Line2D([], [], marker=_k_marker(data, k), ls="", markerfacecolor="none", color="#555555",
                       markersize=7, label=f"k = {k} poisons in cleaning set") for k in data.ks if k]
    handles += _band_and_star_handles(data.tau)
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="cleaning method")
    seeds = f", {len(data.seeds)} seeds" if len(data.seeds) > 1 else ""
    fig.suptitle(f"Every cleaning checkpoint: all learning rates, epochs ≥ 1{seeds}")
    return fig


def _k_marker(data: StudyData, k: int) -> str:
    positive = [x for x in data.ks if x]
    return "o" if not k else K_MARKERS[positive.index(k) % len(K_MARKERS)]


def selected_runs(data: StudyData) -> dict[tuple, tuple[float | None, int]]:
    """(seed, objective, method) -> (lr, epoch) of the k = 0 point chosen at ASR ≤ τ, or of the
    minimum-ASR point when no point qualifies."""
    wanted = {tau_rule(data.tau): 0, "min-asr": 1}
    best: dict[tuple, tuple[int, float | None, int]] = {}
    for r in data.per_seed:
        if r["k"] == 0 and r["rule"] in wanted and r["status"] == "ok" and r["selected_on"] == "test":
            key = (r["seed"], r["pretrain"], r["method"])
            if key not in best or wanted[r["rule"]] < best[key][0]:
                best[key] = (wanted[r["rule"]], r["lr"], r["epoch"])
    return {key: (lr, epoch) for key, (_, lr, epoch) in best.items()}


def figure_trajectories(data: StudyData) -> Figure | str:
    chosen = selected_runs(data)
    objectives = [o for o in data.objectives if any(key[1] == o for key in chosen)]
    if not objectives:
        return ("no cleaning run with ASR at k = 0 yet" if data.has_asr
                else "the results have no ASR (was the study run without an attack?)")
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in data.clean:
        if (r["k"] or 0) == 0 and _pct(r.get("acc1")) is not None and _pct(r.get("asr1")) is not None:
            runs[select.run_key(r)].append(r)
    max_epoch = max(r["epoch"] for rs in runs.values() for r in rs) or 1
    fig, axes = _panels(len(objectives), 4.6, 4.4)
    alpha = 0.9 if len(data.seeds) == 1 else 0.65
    methods_drawn: list[str] = []
    for ax, objective in zip(axes[0], objectives):
        _asr_band(ax, data.tau)
        for method in data.methods:
            lrs = []
            for seed in data.seeds:
                if (seed, objective, method) not in chosen:
                    continue
                lr, epoch = chosen[(seed, objective, method)]
                trajectory = sorted(runs[(seed, objective, method, 0, lr)], key=lambda r: r["epoch"])
                x = [_pct(r["asr1"]) for r in trajectory]
                y = [_pct(r["acc1"]) for r in trajectory]
                sizes = [8 + 70 * r["epoch"] / max_epoch for r in trajectory]
                colour = data.colours[method]
                ax.plot(x, y, color=colour, lw=1.4, alpha=alpha, zorder=3)
                ax.scatter(x, y, s=sizes, color=colour, alpha=alpha, lw=0, zorder=4)
                pick = [r for r in trajectory if r["epoch"] == epoch]
                if pick:
                    ax.scatter(_pct(pick[0]["asr1"]), _pct(pick[0]["acc1"]), s=170, facecolors="none",
                               edgecolors=colour, lw=1.6, zorder=4)
                if format_lr(lr) not in lrs:
                    lrs.append(format_lr(lr))
            if lrs:
                ax.plot([], [], color=data.colours[method], lw=1.6, marker="o",
                        label=f"{method_label(method)}, lr {', '.join(lrs)}")
                methods_drawn.append(method)
        _poisoned_stars(ax, data, objective)
        ax.set_title(f"pre-trained with {objective_label(objective)}")
        ax.set_xlabel(ASR_LABEL)
        ax.legend(loc="best", frameon=True, framealpha=0.85, fontsize=8, title_fontsize=8,
                  title=f"lr selected at ASR ≤ {data.tau * 100:g}%\n(else the lowest ASR)")
    _accuracy_axis(axes[0], data, objectives)
    axes[0][0].set_ylabel(ACC_LABEL)
    handles = [Line2D([], [], marker="o", ls="", color="#555555", markersize=3, label="epoch 1"),
               Line2D([], [], marker="o", ls="", color="#555555", markersize=9, label=f"epoch {max_epoch}"),
               Line2D([], [], marker="o", ls="", markerfacecolor="none", color="#555555", markersize=12,
                      label="selected checkpoint")]
    handles += _band_and_star_handles(data.tau)
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="marker size = epoch")
    fig.suptitle(f"Cleaning trajectories of the selected runs, epoch 0 → {max_epoch}")
    return fig


def figure_pretraining(data: StudyData) -> Figure | str:
    if not data.pretrain:
        return "no pre-training epochs in the results yet"
    metrics = [("acc1", ACC_LABEL)]
    if any(_pct(r.get("asr1")) is not None for r in data.pretrain):
        metrics.append(("asr1", ASR_LABEL))
    fig, axes = _panels(len(metrics), 4.4, 3.8, sharey=False)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in data.pretrain:
        runs[(r["pretrain"], r["seed"])].append(r)
    alpha = 0.9 if len(data.seeds) == 1 else 0.6
    for ax, (metric, label) in zip(axes[0], metrics):
        for objective in sorted({o for o, _ in runs}, key=objective_key):
            colour, style = _pretrain_style(objective)
            first = True
            for seed in data.seeds:
                points = sorted((r for r in runs.get((objective, seed), [])
                                 if _pct(r.get(metric)) is not None), key=lambda r: r["epoch"])
                if not points:
                    continue
                ax.plot([r["epoch"] for r in points], [_pct(r[metric]) for r in points], color=colour,
                        ls=style, lw=1.6, marker="o", markersize=3, alpha=alpha,
                        label=objective_label(objective) if first else None)
                first = False
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel(label)
        ax.set_ylim(0, 102 if metric.startswith("asr") else None)
        ax.grid(alpha=0.3, lw=0.6)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_title("clean accuracy")
    if len(metrics) > 1:
        axes[0][1].set_title("backdoor (triggered, non-target images)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", frameon=False,
               title="objective")
    seeds = f", {len(data.seeds)} seeds" if len(data.seeds) > 1 else ""
    fig.suptitle(f"Pre-training on the poisoned data{seeds}")
    return fig


def _pretrain_style(pretrain: str) -> tuple[str, str]:
    objective, defense = split_pretrain(pretrain)
    colour, style = OBJECTIVE_STYLES.get(objective, (EXTRA_COLOURS[1], "-."))
    if defense is not None:
        fallback = FILTER_COLOUR if defense.startswith("filter") else "#7F7F7F"
        colour = DEFENSE_COLOURS.get(defense, fallback)
    return colour, style


def figure_k_poisons(data: StudyData) -> Figure | str:
    if not any(data.ks):
        return "the study has no cleaning runs with poisons in the cleaning set (k > 0)"
    if not data.has_asr:
        return "the results have no ASR (was the study run without an attack?)"
    table = [r for r in select.aggregate_per_seed(data.per_seed) if r["selected_on"] == "test"]
    index = {(r["pretrain"], r["method"], r["k"], r["rule"]): r for r in table}
    variants = defaultdict(set)
    for r in table:
        variants[(r["pretrain"], r["method"])].add(r["k"])
    objectives = [o for o in data.objectives if any(len(ks) > 1 for (p, _), ks in variants.items() if p == o)]
    if not objectives:
        return "no cleaning method was run with both k = 0 and k > 0"
    rows = [("min-asr", "minimum ASR (%)"),
            (tau_rule(data.tau), f"best acc at ASR ≤ {data.tau * 100:g}% (%)")]
    fig, axes = _panels(len(objectives), 3.9, 3.2, sharey="row", rows=2)
    positions = {k: i for i, k in enumerate(data.ks)}
    methods = [m for m in data.methods if any(len(variants.get((o, m), ())) > 1 for o in objectives)]
    accuracy_drawn = False
    for col, objective in enumerate(objectives):
        for row, (rule, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for i, method in enumerate(methods):
                ks = sorted(variants.get((objective, method), ()))
                if len(ks) < 2:
                    continue
                dodge = (i - (len(methods) - 1) / 2) * 0.07
                colour = data.colours[method]
                metric = "asr1" if rule == "min-asr" else "acc1"
                found = [index[(objective, method, k, rule)] for k in ks]
                xs = [positions[k] + dodge for k, f in zip(ks, found) if f["n_found"]]
                ys = [100 * f[f"{metric}_mean"] for f in found if f["n_found"]]
                es = [100 * (f[f"{metric}_std"] or 0) for f in found if f["n_found"]]
                ax.errorbar(xs, ys, yerr=es, color=colour, marker="o", markersize=5, lw=1.4, capsize=3)
                accuracy_drawn |= bool(ys) and rule != "min-asr"
                missing = [positions[k] + dodge for k, f in zip(ks, found) if not f["n_found"]]
                ax.scatter(missing, [0] * len(missing), marker="x", s=45, color=colour, lw=1.6, clip_on=False,
                           zorder=4)
            ax.set_xticks(range(len(data.ks)), [str(k) for k in data.ks])
            ax.set_xlim(-0.5, len(data.ks) - 0.5)
            ax.set_ylim(bottom=0, top=105 if rule == "min-asr" else None)
            ax.grid(alpha=0.3, lw=0.6)
            if row == 0:
                ax.set_title(f"pre-trained with {objective_label(objective)}")
                ax.axhspan(0, data.tau * 100, color="#DDDDDD", zorder=0, lw=0)
            else:
                ax.set_xlabel("poisons in the cleaning set (k)")
            if col == 0:
                ax.set_ylabel(ylabel)
    # room for the highest marker (the row shares y); with only x's (none reached ASR ≤ τ), the 0-100%
    # scale, not matplotlib's default 0-0.05 around nothing
    top = axes[1][0].get_ylim()[1] if accuracy_drawn else 100 / 1.08
    axes[1][0].set_ylim(0, min(100.0, top * 1.08))
    handles = _method_handles(data, methods)
    handles.append(Line2D([], [], marker="x", ls="", color="#555555", markersize=7,
                          label=f"no checkpoint at ASR ≤ {data.tau * 100:g}%"))
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="cleaning method")
    seeds = f" (mean ± std over {len(data.seeds)} seeds)" if len(data.seeds) > 1 else ""
    fig.suptitle(f"0 vs k poisons left in the cleaning set{seeds}")
    return fig


FIGURES: dict[str, tuple[str, Callable[[StudyData], Figure | str], str]] = {
    "acc_vs_asr": (
        "Accuracy vs attack success rate of every cleaning checkpoint", figure_acc_vs_asr,
        "Each dot is one (learning rate, epoch) checkpoint of a cleaning run; the star is the poisoned "
        "model. "
        "Good cleaning lands in the grey band (low ASR) near the star's height (accuracy kept); "
        "hollow markers were cleaned on a set with k poisons left in."),
    "trajectories": (
        "Cleaning trajectories of the selected runs", figure_trajectories,
        "Each line follows one cleaning run from the poisoned model (star, epoch 0) through its epochs; "
        "markers grow with the epoch and the ring marks the checkpoint the ASR ≤ {tau} rule selects. "
        "A line that drops left stays usable; one that must fall to get left means cleaning costs accuracy."),
    "pretraining": (
        "Pre-training dynamics", figure_pretraining,
        "Zero-shot accuracy and ASR after every pre-training epoch: the backdoor is learned when the "
        "right panel climbs towards 100%; compare objectives at equal epochs."),
    "k_poisons": (
        "Cleaning with 0 vs k poisons in the cleaning set", figure_k_poisons,
        "Top: the lowest ASR any checkpoint reached; bottom: the best accuracy among checkpoints with "
        "ASR ≤ {tau} (× at the bottom: none got there). A few poisons left in the cleaning set can keep "
        "the backdoor alive."),
}


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """PNG + SVG, written atomically, with no dates or versions that would change between reruns."""
    paths = []
    with matplotlib.rc_context(STYLE):
        for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=ext, dpi=PNG_DPI, metadata=metadata, facecolor="white")
            path = out_dir / f"{name}.{ext}"
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
            fig.set_layout_engine("none")  # the layout is solved; the SVG reuses it (half the cost)
    return paths


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# What is missing
# ------------------------------------------------------------------------------------------------
def study_notes(data: StudyData, study_yaml: Path) -> list[str]:
    notes = []
    if not study_yaml.is_file():
        notes.append(f"{study_yaml.name} not found: the page cannot show the study's configuration.")
    if not data.rows:
        notes.append("results.csv has no rows yet.")
        return notes
    if not data.pretrain:
        notes.append("No pre-training epochs in the results.")
    if not data.clean:
        notes.append("No cleaning runs in the results yet: selection and cleaning figures are empty.")
    if not data.has_asr:
        notes.append("No ASR in the results: oracle selection (ASR ≤ τ, minimum ASR) is not possible.")
    for label in select.unlearned_backdoors(data.rows, data.tau):
        notes.append(f"The poisoned {label} model already has ASR ≤ {data.tau * 100:g}%: the backdoor was "
                     "not learned, so selection at that threshold says nothing about cleaning.")
    uneven = select.uneven_backdoors(data.rows)
    if uneven:
        notes.append(f"The poisoned models learned backdoors of unequal strength (ASR "
                     f"{headline.backdoor_listing(uneven)}): compare their cleaning results with that in "
                     "mind.")
    for objective in data.objectives:
        # a defended model is compared as pre-trained, not cleaned
        if not is_defended(objective) and not any(r["pretrain"] == objective for r in data.clean):
            notes.append(f"Pre-training objective {objective_label(objective)} has no cleaning runs yet.")
        if not any(key[1] == objective for key in data.poisoned):
            notes.append(f"No evaluation of the poisoned {objective_label(objective)} model "
                         "(no cleaning epoch 0, no pre-training epoch): relative changes are missing.")
    last_epoch: dict[tuple, int] = {}
    for r in data.clean:
        key = select.run_key(r)
        last_epoch[key] = max(last_epoch.get(key, -1), r["epoch"])
    longest: dict[tuple, int] = defaultdict(int)
    for (_, objective, method, _, _), epoch in last_epoch.items():
        longest[(objective, method)] = max(longest[(objective, method)], epoch)
    short: dict[tuple, list[str]] = defaultdict(list)
    for (seed, objective, method, k, lr), epoch in sorted(last_epoch.items(), key=lambda kv: str(kv[0])):
        if epoch < longest[(objective, method)]:
            k_text = f", k={k}" if k else ""
            short[(objective, method)].append(f"seed {seed}, lr {format_lr(lr)}{k_text}: epoch {epoch}")
    for (objective, method), runs in sorted(short.items(), key=lambda kv: (objective_key(kv[0][0]),
                                                                            method_key(kv[0][1]))):
        notes.append(f"{objective_label(objective)} / {method_label(method)}: {len(runs)} run(s) stopped "
                     f"before epoch {longest[(objective, method)]} (unfinished or failed; selection uses "
                     "what exists): " + "; ".join(runs[:6]) + (" …" if len(runs) > 6 else ""))
    seeds_per_group: dict[tuple, set] = defaultdict(set)
    for r in data.clean:
        seeds_per_group[(r["pretrain"], r["method"] or "", r["k"] or 0)].add(r["seed"])
    for (objective, method, k), seeds in sorted(seeds_per_group.items(), key=str):
        if len(seeds) < len(data.seeds):
            notes.append(f"{objective_label(objective)} / {method_label(method, k)}: results for "
                         f"{len(seeds)} of {len(data.seeds)} seeds.")
    return notes


# ------------------------------------------------------------------------------------------------
# The environment the runs ran in
# ------------------------------------------------------------------------------------------------
# The fields of the one-paragraph summary (the page and report/environment.json have every field).
SUMMARY_FIELDS = (("python.version", "Python"), ("torch.version", "torch"),
                  ("torch.cpu_capability", "CPU capability"), ("torch.threads", "torch threads"),
                  ("torch.interop_threads", "inter-op threads"), ("torch.world_size", "processes"),
                  ("cpu.model", "CPU"), ("cpu.logical_cores", "logical cores"), ("os.platform", "OS"),
                  ("cuda.device", "CUDA device"), ("cuda.driver", "NVIDIA driver"), ("cuda.cudnn", "cuDNN"),
                  ("toolkit.version", "clip-backdoor"), ("toolkit.commit", "commit"),
                  ("toolkit.dirty", "uncommitted changes"))


def study_environments(study_dir: Path, rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Run name -> the fingerprints in its ``environment.json`` ([] when it has none), for every run
    in the results, in the results' order."""
    names = dict.fromkeys(str(r["run"]) for r in rows if r.get("run"))
    return {name: environment.read_environment(study_dir / name) for name in names}


def environment_summary(by_run: dict[str, list[dict]]) -> dict:
    """The common fingerprint, the fields on which runs differ (and which runs), and the runs without
    an ``environment.json``."""
    recorded = {run: entries for run, entries in by_run.items() if entries}
    return {"runs": len(by_run), "recorded": len(recorded),
            "missing": [run for run, entries in by_run.items() if not entries],
            "common": environment.common([e for entries in recorded.values() for e in entries]),
            "differences": environment.differences(recorded)}


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "—" if value is None else str(value)


def environment_text(summary: dict, max_runs: int = 4) -> str:
    """The environment in a few lines of Markdown: shown once, then what differs between runs."""
    if not summary["recorded"]:
        return ("**Environment:** not recorded (no run of this study has an environment.json; runs made "
                "before fingerprints were recorded).")
    common, differences = summary["common"], summary["differences"]
    packages = sum(1 for k in common if k.startswith("packages."))
    parts = [f"{label} {_value_text(common[key])}" for key, label in SUMMARY_FIELDS if key in common]
    differing_packages = sum(1 for k in differences if k.startswith("packages."))
    text = (f"**Environment** (recorded by {summary['recorded']} of {summary['runs']} runs): "
            + "; ".join(parts)
            + f"; {packages} installed distributions agree in every run (the list: report/environment.json).")
    if summary["missing"]:
        missing = summary["missing"]
        text += (f" {len(missing)} run(s) have no environment.json: " + ", ".join(missing[:max_runs])
                 + (" …" if len(missing) > max_runs else "") + ".")
    if not differences:
        return text + " All recorded runs ran in this same environment."
    lines = [text, "", f"**Runs differ** in {len(differences)} field(s)"
             + (f" ({differing_packages} of them package versions)" if differing_packages else "") + ":"]
    for name, values in differences.items():
        listing = "; ".join(f"{value}: {len(runs)} run(s) ({', '.join(runs[:max_runs])}"
                            f"{' …' if len(runs) > max_runs else ''})" for value, runs in values.items())
        lines.append(f"- `{name}`: {listing}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------
# Checked in headless Chromium at 1,280 and 390 px (tests/test_report_browser.py): nothing may be wider
# than the page, so wide tables scroll inside their own box and figures scale down.
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.4; overflow-wrap: break-word; }
h1 { font-size: 1.8em; }
.table-box { overflow-x: auto; margin: 0.5em 0 1em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; box-sizing: border-box; }
.how { color: #444; font-style: italic; max-width: 60em; }
.skip { color: #8a4b00; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; max-height: 40em; }
summary { cursor: pointer; }
"""


def html_table(records: Sequence[dict]) -> str:
    if not records:
        return "<p><em>(no rows)</em></p>"
    columns = list(records[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if r.get(c) is None else str(r[c]))}</td>"
                                    for c in columns) + "</tr>\n" for r in records)
    table = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
    return f"<div class=\"table-box\">{table}</div>"  # a wide table scrolls in its box, not the page


def _study_name(study_dir: Path, config_text: str | None) -> str:
    if config_text:
        try:
            config = yaml.safe_load(config_text)
        except yaml.YAMLError:
            config = None
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            return config["name"]
    return study_dir.resolve().name


def _environment_html(summary: dict) -> str:
    parts = []
    for paragraph in environment_text(summary).split("\n\n"):
        lines = paragraph.splitlines()
        items = [line[2:] for line in lines if line.startswith("- ")]
        head = " ".join(line for line in lines if not line.startswith("- "))
        parts.append(f"<p>{html.escape(head.replace('**', ''))}</p>")
        if items:
            parts.append("<ul>" + "".join(f"<li>{html.escape(i.replace('`', ''))}</li>" for i in items)
                         + "</ul>")
    common = [{"field": k, "value": _value_text(v)} for k, v in summary["common"].items()]
    if common:
        parts.append(f"<details><summary>Every field all recorded runs agree on ({len(common)})</summary>"
                     f"{html_table(common)}</details>")
    return "\n".join(parts)


def render_html(*, name: str, data: StudyData, notes: Sequence[str], headline: Sequence[dict],
                headline_note: str, figures: dict[str, str | None], selection: Sequence[dict],
                poisoned: Sequence[dict], runs: Sequence[dict], config_text: str | None,
                finding: str = "", environment_summary: dict | None = None,
                detection: tuple[list[dict], list[dict]] = ([], [])) -> str:
    n_runs = len({(r["stage"], *select.run_key(r)) for r in data.rows})
    objectives = ", ".join(objective_label(o) for o in data.objectives) or "none"
    methods = ", ".join(method_label(m) for m in data.methods) or "none"
    parts = [f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
             f"<title>{html.escape(name)} — study report</title>\n<style>{CSS}</style>\n</head>\n<body>",
             f"<h1>Study report: {html.escape(name)}</h1>",
             f"<p>{len(data.rows)} evaluated checkpoints from {n_runs} runs; "
             f"{len(data.seeds)} seed(s); pre-training objectives: {html.escape(objectives)}; "
             f"cleaning methods: {html.escape(methods)}.</p>",
             "<p>Files: " + " · ".join(f"<a href=\"{f}\">{Path(f).name}</a>" for f in REPORT_FILES) + "</p>"]
    parts.append("<h2>Status</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes
                 else "<p>Every run has results for every epoch the study's longest runs reached.</p>")
    parts += ["<h2>Headline</h2>", html_table(headline), f"<p class=\"how\">{html.escape(headline_note)}</p>"]
    parts += [f"<p><strong>{html.escape(p)}</strong></p>" for p in finding.split("\n\n") if p]
    if environment_summary is not None:
        parts += ["<h2>Environment</h2>", _environment_html(environment_summary)]
    parts.append("<h2>Figures</h2>")
    for key, (title, _, how) in FIGURES.items():
        parts.append(f"<h3>{html.escape(title)}</h3>")
        reason = figures.get(key)
        if reason:
            parts.append(f"<p class=\"skip\">Not drawn: {html.escape(reason)}.</p>")
            continue
        how = how.format(tau=f"{data.tau * 100:g}%")
        parts.append(f"<p class=\"how\">How to read: {html.escape(how)}</p>")
        parts.append(f"<p><a href=\"{key}.png\"><img src=\"{key}.png\" alt=\"{html.escape(title)}\"></a><br>"
                     f"<a href=\"{key}.svg\">{key}.svg</a></p>")  # on a phone, tap the figure for full size
    parts += ["<h2>Selection rules</h2>",
              "<p class=\"how\">Oracle rules (best acc at ASR ≤ τ for each τ, minimum ASR) choose by "
              "looking at ASR, as the paper does; realistic rules choose by accuracy alone and report the "
              "ASR of what they chose. Mean ± half-width of the Student-t interval over the seeds where the "
              "rule found a point; lr and epoch are listed per seed.</p>",
              html_table(selection), "<h2>Poisoned (and clean) models</h2>", html_table(poisoned)]
    scores, filters = detection
    if scores or filters:
        parts += ["<h2>Poisoned-sample detection</h2>",
                  "<p class=\"how\">Each undefended poisoned model scores its own training pairs (k-dist, "
                  "LID, DAO; higher = more suspicious). AUROC: the chance a poison outscores a clean pair; "
                  "precision = recall at P: the share of poisons among the top-P pairs, P the number of "
                  "poisons. Filter-then-retrain removes the top-scored pairs and pre-trains again.</p>",
                  html_table(scores)]
        if filters:
            parts.append(html_table(filters))
    parts += ["<h2>Runs</h2>", f"<details><summary>Final metrics of {len(runs)} runs</summary>",
              html_table(runs), "</details>", "<h2>Study configuration</h2>"]
    parts.append(f"<pre>{html.escape(config_text)}</pre>" if config_text is not None
                 else "<p class=\"skip\">study.yaml not found.</p>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def study_confidence(study_dir: Path) -> float:
    """The study's ``confidence`` key from its study.yaml, else the default (0.95)."""
    try:
        config = yaml.safe_load((study_dir / "study.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return DEFAULT_CONFIDENCE
    value = config.get("confidence") if isinstance(config, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        return DEFAULT_CONFIDENCE
    return float(value)


def headline_text(study_dir: str | Path, *, tau: float = HEADLINE_TAU, confidence: float | None = None,
                  rows: Sequence[dict] | None = None) -> str:
    """What ``study run`` prints and ``report/headline.md`` holds: the headline table, its note, the
    sentences on the paper's finding and the environment."""
    study_dir = Path(study_dir)
    rows = select.read_results(study_dir / "results.csv") if rows is None else rows
    confidence = study_confidence(study_dir) if confidence is None else confidence
    summary = environment_summary(study_environments(study_dir, rows))
    return headline.headline_table(rows, tau, confidence=confidence) + "\n" + environment_text(summary) + "\n"


def write_report(study_dir: str | Path, *, tau: float = HEADLINE_TAU,
                 taus: Sequence[float] = DEFAULT_TAUS, confidence: float | None = None) -> Path:
    """Write tables, figures and index.html into ``<study_dir>/report/``; return index.html's path.
    ``confidence`` (of every interval and test): default the study.yaml's, else 0.95."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir}: study directory not found")
    rows = select.read_results(study_dir / "results.csv")
    confidence = study_confidence(study_dir) if confidence is None else confidence
    taus = tuple(sorted({*taus, tau}))
    data = StudyData(rows, tau, taus)
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    table = select.aggregate_per_seed(data.per_seed, confidence)
    poisoned = select.poisoned_table(rows, confidence)
    baselines = select.baseline_table(rows, confidence)
    runs = final_metrics(rows)
    summary = environment_summary(study_environments(study_dir, rows))
    write_json(out / "environment.json", summary)
    atomic_write_text(out / "headline.md", "# Headline\n\n" + headline_text(study_dir, tau=tau,
                                                                           confidence=confidence, rows=rows))
    write_csv(out / "selection.csv", table)
    write_csv(out / "selection_per_seed.csv", data.per_seed)
    write_csv(out / "poisoned.csv", poisoned)
    if baselines:
        write_csv(out / "clean_models.csv", baselines)
    else:
        (out / "clean_models.csv").unlink(missing_ok=True)
    write_csv(out / "runs.csv", runs)
    atomic_write_text(out / "selection.md",
                      "# Selection rules\n\n" + headline.markdown_table(selection_display(table)))
    atomic_write_text(out / "runs.md",
                      "# Final metrics per run\n\n" + headline.markdown_table(runs_display(runs)))
    from clip_backdoor.study.dose import write_dose_response

    write_dose_response(study_dir, rows, out, tau=tau)  # only for a study over several SSL weights λ2

    skipped: dict[str, str | None] = {}
    with matplotlib.rc_context(STYLE):
        for name, (_, draw, _) in FIGURES.items():
            result = draw(data)
            if isinstance(result, str):
                skipped[name] = result
                for ext in ("png", "svg"):  # a figure from an earlier report must not outlive its data
                    (out / f"{name}.{ext}").unlink(missing_ok=True)
            else:
                save_figure(result, out, name)
                skipped[name] = None

    detection = detection_display(read_detection(study_dir / "detection.csv"))
    if detection[0] or detection[1]:
        atomic_write_text(out / "detection.md", "# Poisoned-sample detection\n\n"
                          + headline.markdown_table(detection[0])
                          + ("\n" + headline.markdown_table(detection[1]) if detection[1] else ""))
    config_path = study_dir / "study.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    from clip_backdoor.study.finding import finding_text

    page = render_html(name=_study_name(study_dir, config_text), data=data,
                       notes=study_notes(data, config_path),
                       headline=headline.headline_rows(rows, tau, confidence=confidence),
                       headline_note=headline.headline_note(rows, tau, confidence), figures=skipped,
                       selection=selection_display(table),
                       poisoned=poisoned_display(poisoned) + poisoned_display(baselines, "clean, no poisons"),
                       runs=runs_display(runs), config_text=config_text,
                       finding=finding_text(rows, confidence=confidence, tau=tau),
                       environment_summary=summary, detection=detection)
    index = out / "index.html"
    atomic_write_text(index, page)
    log.info("report: %s", index)
    return index
