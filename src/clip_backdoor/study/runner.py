"""``clip-backdoor study run|report|list``: execute a study, resumably, and collect its results.

1. **Data**: the poisoning manifest (``data/poisoned``), then the cleaning sets (``data/clean,k=<k>``),
   both manifests over the pre-training source (WebDataset cleaning sets are written as shards).
   An existing one is reused after checking it was made with the same settings.
2. **Runs**: pre-training runs, then the cleaning runs that start from them. A run whose directory
   holds ``finished.json`` for at least its number of epochs is skipped; an interrupted one resumes
   from its ``latest.pt`` (the training loop does that). With ``--jobs N`` runs go to N spawned
   worker processes (torch threads per job = cores // N), or one per listed CUDA device; a cleaning
   run waits for its pre-training run. A failed run is reported in one line (traceback in its
   ``error.log``) and the rest go on; the exit code says whether any failed.
3. **Results**: every ``metrics.jsonl`` is flattened into ``results.csv`` (columns below), then the
   report (tables, figures, ``index.html``) is written and the headline table printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clip_backdoor.config import TrainConfig, to_dict
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_write_text, read_jsonl, remove_stale_temps, write_json
from clip_backdoor.study.select import COLUMNS, interval_cells
from clip_backdoor.study.spec import (
    MANIFEST,
    DataStage,
    Run,
    StudyPlan,
    StudySpec,
    expand,
    load_spec,
    model_image_size,
    resolved_yaml,
)

log = logging.getLogger(__name__)

RESULT_COLUMNS = COLUMNS  # one schema, defined beside the code that reads it
METRIC_COLUMNS = RESULT_COLUMNS[RESULT_COLUMNS.index("epoch"):-1]
FINISHED = "finished.json"
# Settings that change how fast a run goes, not what it computes; a finished run ignores them.
VOLATILE_KEYS = ("threads", "device", "resume", "allow_epochs_change", "data.workers", "eval.workers",
                 "eval.batch_size", "report_to", "checkpoint_interval_s")


# --------------------------------------------------------------------------------------------
# 1. Data: the poisoning manifest and the cleaning sets
# --------------------------------------------------------------------------------------------
def base_source_spec(plan: StudyPlan) -> dict:
    """The pre-training source exactly as the training loop builds it, read in file order."""
    from clip_backdoor.train.loop import _source_spec

    first = next(r for r in plan.runs if r.stage == "pretrain")
    spec = _source_spec(first.cfg, model_image_size(plan.spec.pretrain.model))
    spec.pop("seed", None)  # a training seed only shuffles; the poisons must not depend on it
    spec.pop("cache", None)  # how the loader keeps pixels, not which pixels
    return spec


def _attack(spec: StudySpec):
    from clip_backdoor.attacks.poison import Attack
    from clip_backdoor.attacks.triggers import get_trigger

    a = spec.attack
    trigger = get_trigger(a.trigger, **a.trigger_params)
    return Attack(trigger, a.target, a.mode, a.poison_seed, tuple(a.synonyms))


def _reuse(out: Path, expected: dict, what: str) -> bool:
    """True when ``out`` already holds this dataset; an incompatible one is an error, not a silent reuse."""
    from clip_backdoor.attacks.manifest import read_info

    if not out.exists():
        return False
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out}: exists but holds no {MANIFEST} (an interrupted {what}?); "
                        "delete it and rerun")
    recorded = json.loads(json.dumps(read_info(out / MANIFEST)))
    for key, value in json.loads(json.dumps(expected)).items():
        if recorded.get(key) != value:
            raise UserError(f"{out} was made with {key}={recorded.get(key)!r}, the study now asks for "
                            f"{value!r}; delete it (and the runs that used it) or use another --out")
    log.info("%s: reusing (%s poisons in %s rows)", out.name, recorded.get("n_poison"),
             recorded.get("n_rows"))
    return True


def make_poison(plan: StudyPlan) -> None:
    """``data/poisoned``: which rows are poisoned, triggered on the fly by every pre-training run."""
    from clip_backdoor.attacks.poison import RowSpool, open_source, plan_poisons, write_plan
    from clip_backdoor.data.captions import CsvSource

    spec, out = plan.spec, plan.root / plan.poison.name
    attack, source_spec = _attack(spec), base_source_spec(plan)
    info = {"kind": "poison", "base_source": source_spec, **attack.describe()}
    expected = dict(info)
    if spec.attack.n is not None:
        expected["n_poison"] = spec.attack.n
    if _reuse(out, expected, "poisoning"):
        return
    started = time.perf_counter()
    source = open_source(source_spec)
    spool_rows = not isinstance(source, CsvSource)  # keep the scan, so the source is read only once
    with RowSpool() if spool_rows else _nothing() as spool:
        chosen = plan_poisons(source, attack, n=spec.attack.n, fraction=spec.attack.fraction,
                              on_row=spool.append if spool else None)
        summary = write_plan(source, chosen, out, fmt="manifest",
                             image_size=model_image_size(spec.pretrain.model), info=info,
                             rows=spool.replay() if spool else None)
    log.info("data/poisoned: %d poisons among %d rows (%s -> %r) in %.0fs", summary["n_poison"],
             summary["n_rows"], attack.trigger.name, attack.target, time.perf_counter() - started)


def make_cleaning_set(plan: StudyPlan, stage: DataStage) -> None:
    """``data/clean,k=<k>``: ``cleaning.size`` rows outside the poisons, then k of them poisoned."""
    from clip_backdoor.attacks.poison import excluded_keys, open_source, plan_cleaning_set, write_plan

    spec, out, k = plan.spec, plan.root / stage.name, stage.k
    c, attack, source_spec = spec.cleaning, _attack(spec), base_source_spec(plan)
    info = {"kind": "cleaning_set", "base_source": source_spec, "size": c.size, "pick": c.pick, "k": k,
            "cleaning_seed": c.seed, **(attack.describe() if k else {})}
    if _reuse(out, info, "cleaning set"):
        return
    started = time.perf_counter()
    manifest = plan.root / plan.poison.name / MANIFEST
    exclude = excluded_keys(manifest)
    source = open_source(source_spec)
    chosen = plan_cleaning_set(source, c.size, pick=c.pick, exclude=exclude, seed=c.seed,
                               attack=attack if k else None, k=k)
    info.update(exclude_manifest=str(manifest), n_excluded=len(exclude))
    summary = write_plan(source, chosen, out, fmt="wds" if spec.data.kind == "wds" else "manifest",
                         image_size=model_image_size(spec.pretrain.model), info=info)
    log.info("%s: %d rows, %d poisons injected, in %.0fs", stage.name, summary["n_rows"], summary["n_poison"],
             time.perf_counter() - started)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        pass


def check_inputs(spec: StudySpec) -> None:
    """Every input path exists; a missing one says which stage needs it."""
    d, e = spec.data, spec.eval
    if d.kind == "csv" and not Path(d.path).is_file():
        raise UserError(f"data.path {d.path}: file not found (the poison stage, the cleaning sets and every "
                        "pre-training run read it)")
    if d.kind == "wds":
        from clip_backdoor.data.captions import expand_shards

        try:
            expand_shards(d.path)
        except UserError as err:
            raise UserError(f"data.path: {err} (the poison stage, the cleaning sets and every pre-training "
                            "run read it)") from None
    if e.kind == "imagefolder" and not Path(e.path).is_dir():
        raise UserError(f"eval.path {e.path}: folder not found (every run's evaluation reads it)")
    if e.kind == "labels_csv" and not Path(e.path).is_file():
        raise UserError(f"eval.path {e.path}: file not found (every run's evaluation reads it)")


# --------------------------------------------------------------------------------------------
# 2. Runs: one in a worker (or in this process)
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {"device": None}


class _NotATerminal:
    """stderr as seen by a worker: progress bars of parallel runs would interleave on one terminal,
    so the runner prints one line per finished run instead."""

    def __init__(self, stream: Any):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _init_worker(devices: Any) -> None:
    # A spawned process inherits "spawn" as its start method, which would make every run's dataloader
    # workers fresh interpreters (seconds each); they get the platform default, as from the shell.
    multiprocessing.set_start_method(None, force=True)
    real_stderr = sys.stderr
    sys.stderr = _NotATerminal(real_stderr)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(real_stderr)
    handler.setLevel(logging.WARNING)  # epoch lines go to each run's train.log
    handler.setFormatter(logging.Formatter("%(run_name)s: %(message)s"))
    handler.addFilter(_RunNameFilter())
    root.addHandler(handler)
    _WORKER["device"] = devices.get() if devices is not None else None


class _RunNameFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_name = _WORKER.get("run", "study")
        return True


def execute(name: str, cfg: TrainConfig, keep_checkpoints: bool = True,
            steps: tuple[dict | None, dict | None] = (None, None)) -> dict:
    """Train one run (with its data steps before / after, see ``study.steps``); returns {"ok",
    "seconds", "row"} or {"ok": False, "error"} (never raises, except on Ctrl-C). Writes
    ``finished.json`` when done, and ``error.log`` on failure."""
    from clip_backdoor.cleaning import build_recipe
    from clip_backdoor.defenses import build_defense
    from clip_backdoor.study.steps import run_step
    from clip_backdoor.train.loop import train

    if _WORKER.get("device"):
        cfg = dataclasses.replace(cfg, device=_WORKER["device"])
    _WORKER["run"] = name
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FINISHED).unlink(missing_ok=True)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)  # the epoch lines reach train.log whatever the console shows
    started = time.perf_counter()
    try:
        recipe = build_recipe(cfg.method, cfg.method_params) if cfg.method else None
        if cfg.defense:
            recipe = build_defense(cfg.defense, cfg.defense_params)
        run_step(steps[0], cfg)
        row = train(cfg, recipe)
        run_step(steps[1], cfg)
        seconds = time.perf_counter() - started
        write_json(run_dir / FINISHED, {"epochs": cfg.epochs, "seconds": seconds, "last": row,
                                        "config": to_dict(cfg)})
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return {"ok": True, "seconds": seconds, "row": row}
    except Exception as e:  # one run's failure must not stop the study
        (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return {"ok": False, "seconds": time.perf_counter() - started,
                "error": (message.splitlines() or [type(e).__name__])[0]}
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        _WORKER["run"] = "study"


def _steps(run: Run) -> dict:
    """``execute``'s data steps, passed only when a run has some (a plain run's call is unchanged)."""
    return {"steps": (run.before, run.after)} if run.before or run.after else {}


class InProcess:
    """Runs one at a time in this process (``--jobs 1``): simplest, and the epoch lines stay visible."""

    capacity = 1

    def submit(self, run: Run, keep: bool) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(execute(run.name, run.cfg, keep, **_steps(run)))
        return future

    def restart(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class WorkerPool:
    """``jobs`` spawned worker processes (fresh interpreters: no forked torch or CUDA state), each
    optionally pinned to one CUDA device."""

    def __init__(self, jobs: int, devices: list[str]):
        self.capacity, self.devices = jobs, devices
        self._manager = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        queue = None
        if self.devices:  # each worker takes one device as it starts
            self._manager = self._manager or ctx.Manager()
            queue = self._manager.Queue()
            for device in self.devices:
                queue.put(device)
        self._pool = cf.ProcessPoolExecutor(self.capacity, mp_context=ctx, initializer=_init_worker,
                                            initargs=(queue,))

    def submit(self, run: Run, keep: bool) -> cf.Future:
        return self._pool.submit(execute, run.name, run.cfg, keep, **_steps(run))

    def restart(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._start()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._manager is not None:
            self._manager.shutdown()


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
# Scheduling: dependencies, progress, ETA
# --------------------------------------------------------------------------------------------
class Progress:
    """One line per finished run, with an ETA from the durations of finished runs of the same kind."""

    def __init__(self, total: int, jobs: int, known: dict[str, list[float]]):
        self.total, self.jobs, self.done = total, jobs, 0
        self.durations = known  # kind -> seconds of finished runs (earlier invocations included)
        self.started = time.perf_counter()

    @staticmethod
    def kind(run: Run) -> str:
        return f"{run.stage}:{run.pretrain}:{run.method}"

    def estimate(self, run: Run) -> float | None:
        same = self.durations.get(self.kind(run))
        if not same:
            same = [s for k, v in self.durations.items() if k.startswith(run.stage + ":") for s in v]
        return sum(same) / len(same) if same else None

    def record(self, run: Run, result: dict, remaining: list[Run], running: dict) -> None:
        self.done += 1
        if result["ok"]:
            self.durations.setdefault(self.kind(run), []).append(result["seconds"])
            row = result.get("row") or {}
            metrics = "  ".join(f"{k} {100 * row[k]:.1f}%" for k in ("acc1", "asr1")
                                if isinstance(row.get(k), float) and not math.isnan(row[k]))
            what = f"done in {_duration(result['seconds'])}" + (f"  {metrics}" if metrics else "")
        else:
            what = f"FAILED after {_duration(result['seconds'])}: {result['error']}"
        log.info("[%*d/%d] %s %s  %s", len(str(self.total)), self.done, self.total, run.name, what,
                 self._eta(remaining, running))

    def _eta(self, remaining: list[Run], running: dict) -> str:
        now, work = time.perf_counter(), 0.0
        for run in remaining:
            guess = self.estimate(run)
            if guess is None:
                return "ETA ?"
            work += guess
        for run, started in running.values():
            guess = self.estimate(run)
            if guess is None:
                return "ETA ?"
            work += max(0.0, guess - (now - started))
        return f"ETA {_duration(work / self.jobs)}" if remaining or running else ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def schedule(plan: StudyPlan, todo: list[Run], executor: Any, prepare_clean: Callable[[], None],
             finished: set[str], progress: Progress) -> dict[str, str]:
    """Run ``todo`` (cleaning runs after their pre-training run); returns {run name: error}."""
    keep = plan.spec.cleaning.keep_checkpoints
    pending, running = list(todo), {}  # running: future -> (run, start time)
    failed: dict[str, str] = {}
    ok = set(finished)
    clean_prepared = False
    todo_names = {r.name for r in todo}

    def dependency(run: Run) -> str | None:
        """None: can start; "wait"; or why it cannot run."""
        parent = run.depends_on
        if parent is None or parent in ok:
            return None
        if parent in failed:
            return f"not run: its pre-training run {parent} failed"
        if parent in todo_names:
            return "wait"
        return f"needs {parent}, which has not finished (run the study without --only clean first)"

    while pending or running:
        for run in list(pending):
            if len(running) >= executor.capacity:
                break
            state = dependency(run)
            if state == "wait":
                continue
            pending.remove(run)
            if state is not None:
                failed[run.name] = state
                progress.record(run, {"ok": False, "seconds": 0.0, "error": state}, pending, running)
                continue
            if run.stage == "clean" and not clean_prepared:
                prepare_clean()
                clean_prepared = True
            running[executor.submit(run, keep or run.stage != "clean")] = (run, time.perf_counter())
        if not clean_prepared and executor.capacity > 1 and any(r.stage == "clean" for r in pending):
            prepare_clean()  # while the workers pre-train
            clean_prepared = True
        if not running:
            continue
        done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        broken = False
        for future in done:
            run, _started = running.pop(future)
            try:
                result = future.result()
            except cf.process.BrokenProcessPool:
                broken = True
                result = {"ok": False, "seconds": time.perf_counter() - _started,
                          "error": "its worker process died (killed, or out of memory); rerun to resume it"}
            if result["ok"]:
                ok.add(run.name)
            else:
                failed[run.name] = result["error"]
            progress.record(run, result, pending, running)
        if broken:
            for future, (run, started) in list(running.items()):  # the pool took these down with it
                running.pop(future)
                failed[run.name] = "its worker pool broke while it ran; rerun to resume it"
                progress.record(run, {"ok": False, "seconds": time.perf_counter() - started,
                                      "error": failed[run.name]}, pending, running)
            executor.restart()
    return failed


# --------------------------------------------------------------------------------------------
# 3. Results
# --------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "" if value is None else str(int(value))
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def results_rows(plan: StudyPlan) -> list[dict[str, str]]:
    """Every (run, epoch) point of the study, as results.csv holds it (strings; empty = absent)."""
    rows = []
    for run in plan.runs:
        path = Path(run.cfg.run_dir) / "metrics.jsonl"
        if not path.is_file():
            continue
        for metrics in read_jsonl(path):
            row = {"seed": str(run.seed), "stage": run.stage, "pretrain": run.pretrain,
                   "method": run.method or "", "lr": _cell(run.lr), "k": _cell(run.k),
                   "start_epoch": _cell(run.start_epoch)}
            row.update({key: _cell(metrics.get(key)) for key in METRIC_COLUMNS})
            row.update({key: _cell(v) for key, v in interval_cells(metrics, plan.spec.confidence).items()})
            row["run"] = run.name
            rows.append(row)
    return rows


def write_results(plan: StudyPlan) -> tuple[Path, list[dict[str, str]]]:
    rows = results_rows(plan)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = plan.root / "results.csv"
    atomic_write_text(path, buffer.getvalue())
    _write_detection(plan)
    return path, rows


def _write_detection(plan: StudyPlan) -> None:
    """``detection.csv`` (only in a study with detection or filter-then-retrain runs)."""
    from clip_backdoor.study.steps import DETECTION_COLUMNS, detection_rows

    path = plan.root / "detection.csv"
    if not any(r.after or r.before for r in plan.runs):
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DETECTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in detection_rows(plan.runs))
    atomic_write_text(path, buffer.getvalue())


def report(plan: StudyPlan) -> Path:
    """results.csv, then the report; prints the headline table. Returns the report's index.html."""
    from clip_backdoor.study.report import headline_text, write_report

    path, rows = write_results(plan)
    log.info("%s: %d rows from %d runs", path, len(rows), len({r["run"] for r in rows}))
    if not rows:
        log.warning("no finished epochs yet: nothing to report")
        return path
    index = write_report(plan.root, taus=tuple(plan.spec.thresholds), confidence=plan.spec.confidence)
    print(headline_text(plan.root, confidence=plan.spec.confidence))
    return index


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def run_study(spec: StudySpec, root: Path, *, only: str | None = None) -> int:
    """Everything ``study run`` does after parsing: returns the exit code (1 when a run failed)."""
    plan = expand(spec, root)
    check_inputs(spec)
    remove_stale_temps(plan.root, plan.root / "data", plan.root / "report")  # a killed study's leftovers
    _save_resolved(plan)
    make_poison(plan)

    runs = [r for r in plan.runs  # --only pretrain includes the clean baselines (pre-training runs too)
            if only is None or r.stage == only or (only, r.stage) == ("pretrain", "baseline")]
    markers = {r.name: finished_marker(r) for r in plan.runs}
    finished = {name for name, marker in markers.items() if marker}
    skipped = [r for r in runs if r.name in finished]
    for run in skipped:
        _warn_if_changed(run, markers[run.name], plan.root)
    todo = [r for r in runs if r.name not in finished]
    if skipped:
        log.info("skipping %d finished runs (of %d)", len(skipped), len(runs))

    jobs, devices = _parallelism(spec, len(todo))
    threads = spec.run.threads
    if threads is None and not devices and spec.run.device in ("cpu", "auto"):
        threads = max(1, cpu_cores() // jobs)
    if threads:
        todo = [r if r.cfg.threads else
                dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, threads=threads)) for r in todo]
    known: dict[str, list[float]] = {}
    for run in plan.runs:
        if markers.get(run.name):
            known.setdefault(Progress.kind(run), []).append(float(markers[run.name].get("seconds", 0.0)))
    progress = Progress(len(todo), jobs, known)

    def prepare_clean() -> None:
        for stage in plan.cleaning_sets:
            make_cleaning_set(plan, stage)

    if todo:
        where = f"on {', '.join(devices)}" if devices else f"{threads or 'default'} torch thread(s) each"
        log.info("%d runs to do, %d at a time (%s)", len(todo), jobs, where)
    executor = WorkerPool(jobs, devices) if jobs > 1 or devices else InProcess()
    try:
        failed = schedule(plan, todo, executor, prepare_clean, finished, progress) if todo else {}
    finally:
        executor.shutdown()
    report(plan)
    if failed:
        log.error("%d run(s) failed:\n%s", len(failed), "\n".join(f"  {n}: {e}" for n, e in failed.items()))
        return 1
    return 0


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
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. seeds=[0,1,2] cleaning.epochs=3")
    rep = sub.add_parser("report", help="collect results.csv and write the report of a study directory")
    rep.add_argument("dir")
    sub.add_parser("status", help="finished / running / failed / pending runs, last metrics, ETA "
                   "(read-only: safe while `study run` runs)").add_argument("dir")
    ls = sub.add_parser("list", help="print the study's runs and whether each is finished")
    ls.add_argument("file")
    ls.add_argument("--out", help="study directory (default runs/<name>)")
    ls.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def load_for_command(file: str, overrides: list[str], jobs: int | None = None,
                     devices: str | None = None) -> StudySpec:
    items = list(overrides)
    if jobs is not None:
        items.append(f"run.jobs={jobs}")
    if devices:
        items.append(f"run.devices=[{devices}]")
    return load_spec(file, items)


def list_runs(plan: StudyPlan) -> str:
    lines = [f"{plan.root}: {len(plan.runs)} runs"]
    for stage in [plan.poison, *plan.cleaning_sets]:
        state = "ready" if (plan.root / stage.name / MANIFEST).is_file() else "to make"
        lines.append(f"  data      {stage.name:<50} {state}")
    for run in plan.runs:
        lines.append(f"  {run.stage:<9} {run.name:<50} {_run_state(run)}")
    return "\n".join(lines)


def _run_state(run: Run) -> str:
    if finished_marker(run):
        return "finished"
    path = Path(run.cfg.run_dir) / "metrics.jsonl"
    if path.is_file():
        rows = read_jsonl(path)
        if rows:
            return f"partial (epoch {rows[-1]['epoch']} of {run.cfg.epochs})"
    return "to do"


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # KEY=VALUE may come after the options too
    unknown = [word for word in rest if args.action in ("report", "status") or "=" not in word
               or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.action == "report":
        report(plan_for_dir(args.dir))
        return 0
    if args.action == "status":
        from clip_backdoor.study.status import main_status

        return main_status(args.dir)
    spec = load_for_command(args.file, args.overrides + rest, getattr(args, "jobs", None),
                            getattr(args, "devices", None))
    root = Path(args.out or Path("runs") / spec.name)
    if args.action == "list":
        print(list_runs(expand(spec, root)))
        return 0
    return run_study(spec, root, only=args.only)  # Ctrl-C: cli.main says how to go on, exit 130
