"""``clip-backdoor study run|report|list``: execute a study, resumably, and collect its results.

1. **Data** (``study/data_stages.py``): the poisoning manifest (``data/poisoned``), then the cleaning
   sets (``data/clean,k=<k>``).
2. **Runs**: pre-training runs, then the cleaning runs that start from them. A run whose directory
   holds ``finished.json`` for at least its number of epochs is skipped; an interrupted one resumes
   from its ``latest.pt`` (the training loop does that). Where runs execute is the executor's
   business (``--executor local|slurm|ray``, ``study/executors.py``): locally ``--jobs N`` runs go
   to N spawned worker processes (torch threads per job = cores // N), or one per listed CUDA
   device. When runs start, claims and pruning are the scheduler's (``study/schedule.py``). A failed
   run is reported in one line (traceback in its ``error.log``) and the rest go on; the exit code
   says whether any failed.
3. **Results** (``study/results.py``): every ``metrics.jsonl`` is flattened into ``results.csv``, then
   the report (tables, figures, ``index.html``) is written and the headline table printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from clip_backdoor.config import to_dict
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_write_text, read_jsonl, remove_stale_temps
from clip_backdoor.study import compare
from clip_backdoor.study.data_stages import check_inputs, make_cleaning_set, make_poison
from clip_backdoor.study.expand import MANIFEST, Run, StudyPlan, expand
from clip_backdoor.study.prune import PRUNED
from clip_backdoor.study.results import report
from clip_backdoor.study.spec import StudySpec, load_spec, resolved_yaml
from clip_backdoor.study.worker import FINISHED
from clip_backdoor.train.preempt import REQUEUE_EXIT_CODE, ignore_further_stops

log = logging.getLogger(__name__)

# Settings that change how fast a run goes, not what it computes; a finished run ignores them.
VOLATILE_KEYS = ("threads", "device", "resume", "allow_epochs_change", "data.workers", "eval.workers",
                 "eval.batch_size", "report_to", "checkpoint_interval_s", "save_every_steps", "stop_epoch")


# --------------------------------------------------------------------------------------------
# Runs: where they execute is an executor's business (study/executors.py)
# --------------------------------------------------------------------------------------------
def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def finished_marker(run: Run) -> dict | None:
    """The run's ``finished.json`` if it covers the run's epochs (and its detection), else None."""
    from clip_backdoor.study.steps import is_done

    path = Path(run.cfg.run_dir) / FINISHED
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if not is_done(run.after, run.cfg):
        return None
    return marker if int(marker.get("epochs", 0)) >= run.cfg.epochs else None


def _identity(cfg: dict, root: Path, prefix: str = "") -> dict:
    """A run config without the speed-only settings, with the study directory's path abstracted
    (a moved study directory is still the same study)."""
    out = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted in VOLATILE_KEYS or key == "epochs":
            continue
        if isinstance(value, dict) and key not in ("world", "method_params", "trigger_params"):
            out[key] = _identity(value, root, f"{dotted}.")
        elif isinstance(value, str) and value.startswith(str(root)):
            out[key] = "<study>" + value[len(str(root)):]
        else:
            out[key] = value
    return out


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def _warn_if_changed(run: Run, marker: dict, root: Path) -> None:
    recorded_root = Path(marker.get("config", {}).get("run_dir", run.cfg.run_dir))
    for _ in run.name.split("/"):
        recorded_root = recorded_root.parent
    diff = _first_difference(_identity(marker.get("config", {}), recorded_root),
                             _identity(to_dict(run.cfg), root))
    if diff:
        log.warning("%s finished with other settings (%s); keeping its results -- delete its directory to "
                    "run it again", run.name, diff)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def run_study(spec: StudySpec, root: Path, *, only: str | None = None, dry_run: bool = False,
              prune: bool = True) -> int:
    """Everything ``study run`` does after parsing: returns the exit code (1 when a run failed, 75
    when a signal stopped the study: rerun it to go on). ``dry_run``: print what would be submitted,
    write nothing. ``prune=False`` (``--no-prune``): every cleaning run trains to the end."""
    from clip_backdoor.study.executor_factory import make_executor
    from clip_backdoor.study.prune import parse_prune
    from clip_backdoor.study.schedule import Outcome, Progress, Scheduler

    plan = expand(spec, root)
    runs = [r for r in plan.runs  # --only pretrain includes the clean baselines (pre-training runs too)
            if only is None or r.stage == only or (only, r.stage) == ("pretrain", "baseline")]
    markers = {r.name: finished_marker(r) for r in plan.runs}
    finished = {name for name, marker in markers.items() if marker}
    todo = [r for r in runs if r.name not in finished]
    jobs, devices = _parallelism(spec, len(todo))
    pruning = parse_prune(spec.cleaning.prune, spec.cleaning.epochs, spec.thresholds) if prune else None
    if spec.run.executor == "local":
        threads = spec.run.threads
        if threads is None and not devices and spec.run.device in ("cpu", "auto"):
            threads = max(1, cpu_cores() // jobs)
        if threads:
            todo = [r if r.cfg.threads else
                    dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, threads=threads)) for r in todo]
    executor = make_executor(spec, plan, jobs=jobs, devices=devices, dry_run=dry_run)
    try:
        known: dict[str, list[float]] = {}
        for run in plan.runs:
            if markers.get(run.name):
                known.setdefault(Progress.kind(run), []).append(float(markers[run.name].get("seconds", 0.0)))
        progress = Progress(len(todo), jobs, known)

        def prepare_clean() -> None:
            for stage in plan.cleaning_sets:
                make_cleaning_set(plan, stage)

        scheduler = Scheduler(plan, executor, progress, prepare_clean, finished, pruning,
                              stale_after=spec.run.claim_stale_s)
        if dry_run:
            print(describe_submissions(scheduler.first_runs(todo, write=False), executor,
                                       spec.cleaning.keep_checkpoints, len(runs) - len(todo)))
            return 0
        check_inputs(spec)
        remove_stale_temps(plan.root, plan.root / "data", plan.root / "report")  # a killed study's leftovers
        _save_resolved(plan)
        make_poison(plan)
        skipped = [r for r in runs if r.name in finished]
        for run in skipped:
            _warn_if_changed(run, markers[run.name], plan.root)
        if skipped:
            log.info("skipping %d finished runs (of %d)", len(skipped), len(runs))
        if todo:
            log.info("%d runs to do on %s", len(todo), _where(spec, executor, jobs, devices, todo))
        outcome = scheduler.run(todo, spec.cleaning.keep_checkpoints) if todo else Outcome()
    finally:
        executor.shutdown()
    report(plan)
    if outcome.pruned:
        log.info("%d cleaning run(s) pruned (pruned.json in each; --no-prune finishes them)", outcome.pruned)
    if outcome.claimed:
        log.warning("%d run(s) left to the study run that claimed them (study list shows who)",
                    len(outcome.claimed))
    if outcome.failed:
        log.error("%d run(s) failed:\n%s", len(outcome.failed),
                  "\n".join(f"  {n}: {e}" for n, e in outcome.failed.items()))
    if outcome.preempted:
        log.error("stopped by a signal: rerun the same command to go on (%d run(s) resume from their "
                  "mid-epoch checkpoints)", len(outcome.interrupted))
        return REQUEUE_EXIT_CODE
    return 1 if outcome.failed else 0


def _where(spec: StudySpec, executor: Any, jobs: int, devices: list[str], todo: list[Run]) -> str:
    if spec.run.executor != "local":
        return f"{executor.name} ({'submitted as jobs' if executor.name == 'slurm' else 'Ray tasks'})"
    threads = todo[0].cfg.threads if todo else None
    where = f"on {', '.join(devices)}" if devices else f"{threads or 'default'} torch thread(s) each"
    return f"this machine, {jobs} at a time ({where})"


def describe_submissions(first: list[Run], executor: Any, keep_clean: bool, n_finished: int) -> str:
    """``--dry-run``: the jobs the first submissions would be (pre-training runs; each pre-training
    run's cleaning runs, submitted together once it has finished)."""
    lines = [f"# study run --dry-run ({executor.name}): nothing is submitted or written; "
             f"{n_finished} finished run(s) skipped"]
    pre = [(r, True) for r in first if r.stage != "clean"]
    if pre:
        lines += ["", "## pre-training", executor.describe(pre)]
    by_parent: dict[str, list[tuple[Run, bool]]] = {}
    for run in first:
        if run.stage == "clean":
            by_parent.setdefault(run.depends_on or "", []).append((run, keep_clean))
    for parent, batch in by_parent.items():
        lines += ["", f"## cleaning runs of {parent} (submitted once it has finished)",
                  executor.describe(batch)]
    if len(lines) == 1:
        lines.append("nothing to do: every run is finished")
    return "\n".join(lines)


def _parallelism(spec: StudySpec, n_runs: int) -> tuple[int, list[str]]:
    devices = list(spec.run.devices)
    if devices:
        return max(1, min(len(devices), n_runs)), devices[:max(1, n_runs)]
    return max(1, min(spec.run.jobs, n_runs)), []


def _save_resolved(plan: StudyPlan) -> None:
    path = plan.root / "study.yaml"
    text = resolved_yaml(plan.spec)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        log.warning("%s: the study changed since the last run; finished runs are kept, new ones added", path)
    atomic_write_text(path, text)


def plan_for_dir(study_dir: str | Path) -> StudyPlan:
    root = Path(study_dir)
    if not (root / "study.yaml").is_file():
        raise UserError(f"{root}: no study.yaml here (is it a study directory made by `study run`?)")
    return expand(load_spec(root / "study.yaml"), root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-backdoor study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="run (or resume) a study, then write results.csv and the report")
    r.add_argument("file", help="study YAML (see configs/demo.yaml)")
    r.add_argument("--out", help="study directory (default runs/<name>)")
    r.add_argument("--jobs", type=int, help="runs in parallel on CPU (default: run.jobs in the file)")
    r.add_argument("--devices", help="one run per CUDA device, e.g. cuda:0,cuda:1")
    r.add_argument("--only", choices=("pretrain", "clean"), help="only this stage's runs")
    r.add_argument("--executor", help="where runs execute: local (default), slurm or ray (run.executor)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the jobs (sbatch scripts, Ray task specs) it would submit; write nothing")
    r.add_argument("--no-prune", action="store_true", help="ignore cleaning.prune: finish every run")
    cluster = r.add_argument_group("cluster resources (set for both stages, over the file's settings)")
    for flag, meaning in CLUSTER_FLAGS.items():
        cluster.add_argument(f"--{flag}", metavar=meaning[0], help=meaning[1])
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. seeds=[0,1,2] cleaning.epochs=3")
    rep = sub.add_parser("report", help="collect results.csv and write the report of a study directory")
    rep.add_argument("dir")
    pc = sub.add_parser("prune-check", help="on a finished full grid: the compute cleaning.prune would have "
                        "used and whether it selects the same cells")
    pc.add_argument("dir", help="a study directory whose cleaning runs all finished without pruning")
    pc.add_argument("--eta", type=int, help="default: the study's cleaning.prune.eta, else 3")
    pc.add_argument("--rungs", help="comma-separated epochs, e.g. 1,3 (default: the study's, else 1,3)")
    pc.add_argument("--thresholds", help="comma-separated ASR levels to keep runs for, e.g. 0.05 "
                    "(default: the study's)")
    pc.add_argument("--no-protect", action="store_true",
                    help="replay without the rule that keeps runs more accurate than the incumbent")
    pc.add_argument("--no-keep", action="store_true",
                    help="replay without keeping the best runs by the threshold-free cell")
    sub.add_parser("status", help="finished / running / failed / pending runs, last metrics, ETA "
                   "(read-only: safe while `study run` runs)").add_argument("dir")
    compare.add_parser(sub)
    ls = sub.add_parser("list", help="print the study's runs and whether each is finished")
    ls.add_argument("file")
    ls.add_argument("--out", help="study directory (default runs/<name>)")
    ls.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


# --flag -> (metavar, help, {executor: key in run.<executor>})
CLUSTER_FLAGS = {
    "partition": ("NAME", "SLURM partition", {"slurm": "partition"}),
    "account": ("NAME", "SLURM account", {"slurm": "account"}),
    "time": ("TIME", "SLURM time limit, e.g. 24:00:00 or 2-00:00:00", {"slurm": "time"}),
    "mem": ("SIZE", "SLURM memory per node, e.g. 64G", {"slurm": "mem"}),
    "gpus": ("N", "GPUs per run (SLURM: per node)", {"slurm": "gpus_per_node", "ray": "num_gpus"}),
    "cpus": ("N", "CPUs per run (SLURM: per task)", {"slurm": "cpus_per_task", "ray": "num_cpus"}),
    "ray-address": ("HOST:PORT", "an existing Ray cluster (default: start one here)", {"ray": "address"}),
}


def load_for_command(file: str, overrides: list[str], jobs: int | None = None,
                     devices: str | None = None, executor: str | None = None,
                     cluster: dict[str, str] | None = None) -> StudySpec:
    items = list(overrides)
    if jobs is not None:
        items.append(f"run.jobs={jobs}")
    if devices:
        items.append(f"run.devices=[{devices}]")
    if executor:
        items.append(f"run.executor={executor}")
    spec = load_spec(file, items)
    cluster = {flag: value for flag, value in (cluster or {}).items() if value is not None}
    if cluster:  # set as given (a KEY=VALUE would go through YAML, which reads 24:00:00 as 86400)
        from clip_backdoor.study.spec import _validate_executor

        name = spec.run.executor
        for flag, value in cluster.items():
            key = CLUSTER_FLAGS[flag][2].get(name)
            if key is None:
                raise UserError(f"--{flag}: not an option of the {name} executor (it is one of "
                                f"{' and '.join(CLUSTER_FLAGS[flag][2])}); choose one with --executor")
            if flag in ("gpus", "cpus"):
                try:
                    value = int(value)
                except ValueError:
                    raise UserError(f"--{flag}: {value!r} is not an integer") from None
            settings = getattr(spec.run, name)
            settings[key] = value
            for stage in ("pretrain", "clean"):  # a flag wins over the file's stage sections too
                if isinstance(settings.get(stage), dict) and key in settings[stage]:
                    settings[stage] = {**settings[stage], key: value}
        try:
            _validate_executor(spec.run)
        except UserError as e:
            raise UserError(f"{file} with --{' --'.join(cluster)}: {e}") from None
    return spec


def prune_check(plan: StudyPlan, eta: int | None, rungs: str | None, protect: bool = True,
                thresholds: str | None = None, keep: bool = True) -> str:
    """``study prune-check``: replay successive halving on a finished full grid (exact: a paused
    run's epochs are the full run's) and compare its selections with the full grid's."""
    from clip_backdoor.study.prune import parse_prune, replay_groups
    from clip_backdoor.study.schedule import group_of
    from clip_backdoor.study.select import KEEP_ACCURACY, KEEP_RULE, format_lr, method_label, objective_label

    c = plan.spec.cleaning
    given = dict(c.prune or {"eta": 3, "rungs": [1, 3]})
    if eta is not None:
        given["eta"] = eta
    if rungs is not None:
        try:
            given["rungs"] = [int(r) for r in rungs.split(",")]
        except ValueError:
            raise UserError(f"--rungs {rungs!r}: expected comma-separated epochs, e.g. 1,3") from None
    if not protect:
        given["protect"] = False
    if not keep:
        given["keep"] = False
    if thresholds is not None:
        try:
            given["thresholds"] = [float(t) for t in thresholds.split(",")]
        except ValueError:
            raise UserError(f"--thresholds {thresholds!r}: expected comma-separated fractions, "
                            "e.g. 0.05") from None
    settings = parse_prune(given, c.epochs, plan.spec.thresholds, where="prune-check")
    members: dict[tuple, list[Run]] = {}
    for run in plan.runs:
        if run.stage == "clean":
            members.setdefault(group_of(run), []).append(run)
    groups: dict[tuple, dict[str, list[dict]]] = {}
    incomplete = []  # a replay needs every learning rate of a group, trained to the end
    for key, runs in members.items():
        if all(finished_marker(run) and not (Path(run.cfg.run_dir) / PRUNED).exists() for run in runs):
            groups[key] = {r.name: read_jsonl(Path(r.cfg.run_dir) / "metrics.jsonl") for r in runs}
        else:
            incomplete.append(key)
    if not groups:
        raise UserError(f"{plan.root}: no group whose cleaning runs all finished (run the full grid first)")
    lrs = {r.name: r.lr for r in plan.runs if r.stage == "clean"}
    result = replay_groups(groups, lrs, settings, c.epochs)
    taus = settings.thresholds
    n_runs = sum(len(g) for g in groups.values())
    lines = [f"successive halving eta={settings.eta} rungs={list(settings.rungs)} protect={settings.protect} "
             f"keep={settings.keep} "
             f"thresholds="
             f"{[f'{t:g}' for t in taus]} replayed on {n_runs} finished cleaning runs of {plan.root} "
             f"({c.epochs} epochs each); ranked and selected on the {result['split']} split"
             + (", reported on the test split" if result["split"] == "validation" else ""), "",
             "| group | compute | " + " | ".join(f"ASR ≤ {t * 100:g}%: full → pruned" for t in taus) + " |",
             "|---|---|" + "---|" * len(taus)]

    def cell(point) -> str:
        if point is None:
            return "none"
        return f"{point.acc1 * 100:.1f} (lr {format_lr(point.lr)}, ep {point.epoch})"

    for rec in result["groups"]:
        seed, pretrain, method, k = rec["group"]
        cells = [f"{cell(v['full'])} → {cell(v['pruned'])}{'' if v['same'] else ' **differs**'}"
                 for v in rec["taus"].values()]
        lines.append(f"| seed {seed}, {objective_label(pretrain)}, {method_label(method, k)} | "
                     f"{rec['share'] * 100:.0f}% | " + " | ".join(cells) + " |")
    n = result["n_groups"]
    lines += ["", f"compute: {result['share'] * 100:.1f}% of the full grid's cleaning epochs"]
    lines += [f"same selection (accuracy within 1 point, or both none) at ASR ≤ {t * 100:g}%: "
              f"{result['agree'][t]} of {n} groups ({result['agree'][t] / n * 100:.0f}%)" for t in taus]
    same_keep = result["agree"][KEEP_RULE]
    lines.append(f"same threshold-free cell (lowest ASR keeping ≥ {KEEP_ACCURACY * 100:g}% of the poisoned "
                 f"accuracy, within 1 point, or both none): {same_keep} of {n} groups "
                 f"({same_keep / n * 100:.0f}%)")
    if incomplete:
        lines.append(f"left out: {len(incomplete)} group(s) with unfinished or pruned runs")
    return "\n".join(lines)


def list_runs(plan: StudyPlan) -> str:
    lines = [f"{plan.root}: {len(plan.runs)} runs"]
    for stage in [plan.poison, *plan.cleaning_sets]:
        state = "ready" if (plan.root / stage.name / MANIFEST).is_file() else "to make"
        lines.append(f"  data      {stage.name:<50} {state}")
    for run in plan.runs:
        lines.append(f"  {run.stage:<9} {run.name:<50} {_run_state(run)}")
    return "\n".join(lines)


def _run_state(run: Run) -> str:
    from clip_backdoor.study import claims
    from clip_backdoor.study.prune import PRUNED

    if finished_marker(run):
        return "finished"
    state = "to do"
    path = Path(run.cfg.run_dir) / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if (Path(run.cfg.run_dir) / PRUNED).is_file():
        state = f"pruned at epoch {json.loads((Path(run.cfg.run_dir) / PRUNED).read_text())['epoch']}"
    elif rows:
        state = f"partial (epoch {rows[-1]['epoch']} of {run.cfg.epochs})"
    claim = claims.read(run.cfg.run_dir)
    if claim is not None:
        state += f", claimed by {claims.describe(claim)}"
    return state


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # KEY=VALUE may come after the options too
    unknown = [word for word in rest if args.action in ("report", "status", "prune-check", "compare")
               or "=" not in word
               or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.action == "report":
        report(plan_for_dir(args.dir))
        return 0
    if args.action == "compare":
        return compare.main_compare(args)
    if args.action == "status":
        from clip_backdoor.study.status import main_status

        return main_status(args.dir)
    if args.action == "prune-check":
        print(prune_check(plan_for_dir(args.dir), args.eta, args.rungs, protect=not args.no_protect,
                          thresholds=args.thresholds, keep=not args.no_keep))
        return 0
    cluster = {flag: getattr(args, flag.replace("-", "_"), None) for flag in CLUSTER_FLAGS}
    spec = load_for_command(args.file, args.overrides + rest, getattr(args, "jobs", None),
                            getattr(args, "devices", None), getattr(args, "executor", None), cluster)
    root = Path(args.out or Path("runs") / spec.name)
    if args.action == "list":
        print(list_runs(expand(spec, root)))
        return 0
    # Ctrl-C: cli.main says how to go on, exit 130
    code = run_study(spec, root, only=args.only, dry_run=args.dry_run, prune=not args.no_prune)
    if code == REQUEUE_EXIT_CODE:  # stopped by a signal, state saved: exiting 75, whatever comes now
        ignore_further_stops()
    return code
