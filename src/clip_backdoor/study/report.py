"""The study report: tables (Markdown + CSV), figures (PNG + SVG) and ``index.html``, from local files.

``write_report(study_dir)`` reads ``<study_dir>/results.csv`` (and ``study.yaml`` for the page) and
writes everything into ``<study_dir>/report/``. It reports what exists and says what is missing, so
it can run on a study that is still going. Output files are byte-identical across reruns on the same
results (fixed SVG hash salt, no dates in metadata, no timestamps in the page).

The environment the runs ran in (each run's ``environment.json``, see ``clip_backdoor.environment``)
is shown once, with every field on which runs of the study differ and which runs those are;
``report/environment.json`` holds the common fingerprint and the differences.

The figures (acc_vs_asr, trajectories, pretraining, k_poisons) are drawn in ``study/figures.py``,
the tables' records in ``study/tables.py``, the headline in ``study/headline.py``; this module reads
the study, says what is missing, renders the page and writes the report directory.
"""

from __future__ import annotations

import html
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import yaml

from clip_backdoor import environment
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_write_text, write_json
from clip_backdoor.study import headline, select
from clip_backdoor.study.defense_effects import (
    defense_display,
    defense_effects,
    defense_records,
    defense_sentences,
)
from clip_backdoor.study.figures import FIGURES, STYLE, StudyData, save_figure
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
)
from clip_backdoor.study.tables import (
    detection_display,
    final_metrics,
    poisoned_display,
    read_detection,
    runs_display,
    selection_display,
    write_csv,
)

log = logging.getLogger(__name__)

REPORT_FILES = ("headline.md", "selection.csv", "selection.md", "selection_per_seed.csv", "poisoned.csv",
                "runs.csv", "runs.md", "environment.json", "../results.csv")


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
    cleans = _has_cleaning_stage(study_yaml)
    if not data.clean:
        notes.append("No cleaning runs in the results yet: selection and cleaning figures are empty."
                     if cleans else "The study has no cleaning stage: it compares pre-trainings only.")
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
        if cleans and not is_defended(objective) and not any(r["pretrain"] == objective for r in data.clean):
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


def _has_cleaning_stage(study_yaml: Path) -> bool:
    """Whether the study's config asks for cleaning runs (True when it cannot be read: say less)."""
    try:
        spec = yaml.safe_load(study_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return True
    cleaning = spec.get("cleaning") if isinstance(spec, dict) else None
    if not isinstance(cleaning, dict) or "methods" not in cleaning:
        return True  # the spec's default methods
    return bool(cleaning["methods"])


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
                detection: tuple[list[dict], list[dict]] = ([], []),
                defenses: Sequence[dict] = ()) -> str:
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
    if defenses:
        parts += ["<h2>Defences against the same objective undefended</h2>",
                  "<p class=\"how\">Per seed, the defended model minus the same objective's undefended "
                  "poisoned model (last pre-training epoch), in percentage points: mean ± half-width of the "
                  "t interval over seeds, two-sided paired t-test. A lower ASR at an accuracy near chance "
                  "is a model that learned little, not a clean one.</p>", html_table(defenses)]
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

    # only for a study over several SSL weights λ2
    write_dose_response(study_dir, rows, out, tau=tau, confidence=confidence)

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

    effects = defense_effects(rows, tau=tau, confidence=confidence)
    defenses = defense_display(effects, tau=tau)
    if effects:
        write_csv(out / "defenses.csv", defense_records(effects))
        atomic_write_text(out / "defenses.md", "# Defences against the same objective undefended\n\n"
                          + headline.markdown_table(defenses) + "\n"
                          + defense_sentences(effects, tau=tau, confidence=confidence) + "\n")
    else:  # files of an earlier report must not outlive their data
        for stale in ("defenses.csv", "defenses.md"):
            (out / stale).unlink(missing_ok=True)
    detection = detection_display(read_detection(study_dir / "detection.csv"))
    if detection[0] or detection[1]:
        atomic_write_text(out / "detection.md", "# Poisoned-sample detection\n\n"
                          + headline.markdown_table(detection[0])
                          + ("\n" + headline.markdown_table(detection[1]) if detection[1] else ""))
    config_path = study_dir / "study.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    page = render_html(name=_study_name(study_dir, config_text), data=data,
                       notes=study_notes(data, config_path),
                       headline=headline.headline_rows(rows, tau, confidence=confidence),
                       headline_note=headline.headline_note(rows, tau, confidence), figures=skipped,
                       selection=selection_display(table),
                       poisoned=poisoned_display(poisoned) + poisoned_display(baselines, "clean, no poisons"),
                       runs=runs_display(runs), config_text=config_text,
                       finding=headline.conclusions(rows, tau=tau, confidence=confidence),
                       environment_summary=summary, detection=detection, defenses=defenses)
    index = out / "index.html"
    atomic_write_text(index, page)
    log.info("report: %s", index)
    return index
