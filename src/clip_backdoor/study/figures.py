"""The study's figures (matplotlib, Agg, no pyplot state), drawn from :class:`StudyData`, and
:func:`save_figure`, which writes each as PNG + SVG, byte-identical across reruns.

  acc_vs_asr     every cleaning checkpoint (lr × epoch ≥ 1) in (ASR, accuracy), a panel per objective
  trajectories   the selected run of each method, epoch 0 → E, in the same plane
  pretraining    accuracy and ASR per pre-training epoch, a line per objective
  k_poisons      cleaning with 0 vs k poisons in the cleaning set (only when k > 0 runs exist)

``report.py`` puts them on the report page; ``dose.py`` draws its dose-response in the same style.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from clip_backdoor.fileio import atomic_write_bytes
from clip_backdoor.study import select
from clip_backdoor.study.select import (
    format_lr,
    method_key,
    method_label,
    objective_key,
    objective_label,
    split_pretrain,
    tau_rule,
)

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
