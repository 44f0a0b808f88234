"""A study spec expanded into runs: names, directories, the order of stages and every run's
TrainConfig. Expansion is a pure function of the spec, so run names and their order never change
between invocations (the layout is in ``study/spec.py``'s docstring).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from clip_backdoor.config import DataConfig, EvalConfig, ObjectiveConfig, OptimConfig, TrainConfig
from clip_backdoor.study.spec import (
    FILTER,
    OBJECTIVES,
    Defense,
    Method,
    PretrainSpec,
    StudySpec,
    defenses,
    methods,
    objective_names,
    pretrain_objectives,
    short_number,
)


@dataclass(frozen=True)
class Run:
    """One training run of the study; ``name`` is its directory relative to the study directory."""

    name: str
    stage: str  # pretrain | baseline (pre-training without poisons) | clean
    seed: int
    pretrain: str  # the pre-training objective
    method: str | None  # the method's label (clean runs)
    lr: float | None  # the cleaning learning rate (clean runs)
    k: int | None  # poisons in the cleaning set (clean runs)
    cfg: TrainConfig
    depends_on: str | None = None  # the pre-training run a cleaning (or filtered) run starts from
    start_epoch: int | None = None  # the pre-training epoch whose checkpoint a cleaning run starts from
    # data steps outside the training loop (clip_backdoor.study.steps): "filter" makes the filtered
    # manifest before training, "detect" scores the run's training pairs after it
    before: dict | None = None
    after: dict | None = None


@dataclass(frozen=True)
class DataStage:
    """A dataset the runs read: the poisoning manifest, or a cleaning set (k poisons)."""

    name: str  # directory relative to the study directory
    k: int | None  # None: the poisoning manifest


@dataclass
class StudyPlan:
    spec: StudySpec
    root: Path
    poison: DataStage
    cleaning_sets: list[DataStage]
    runs: list[Run]

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)


def format_lr(lr: float) -> str:
    """Learning rates in run names: 1e-5, 2.5e-4, 1e-3 (a pure function of the value)."""
    return short_number(lr)


def pretrain_name(objective: str, seed: int) -> str:
    return f"pretrain/{objective},seed={seed}"


def baseline_name(objective: str, seed: int) -> str:
    """The clean baseline sorts right before its poisoned twin: ``pretrain/mmcl,clean,seed=0``."""
    return f"pretrain/{objective},clean,seed={seed}"


def defended_name(objective: str, label: str) -> str:
    """The pre-training label of a defended run (its ``pretrain`` in results.csv)."""
    return f"{objective},defense={label}"


def clean_name(objective: str, seed: int, method: str, lr: float, k: int) -> str:
    tail = f"lr={format_lr(lr)}" + (f",k={k}" if k else "")
    return f"clean/{objective},seed={seed}/{method}/{tail}"


def cleaning_set_name(k: int) -> str:
    return f"data/clean,k={k}"


POISON_DIR = "data/poisoned"
FILTERED_DIR = "data/filtered"  # data/filtered/<objective>,defense=<label>,seed=<s>/manifest.csv
MANIFEST = "manifest.csv"
DETECTION_DIR = "detection"  # inside an undefended pre-training run: scores.csv, detection.json


def model_image_size(model: str) -> int:
    from clip_backdoor.models import get_model_config

    return int(get_model_config(model)["vision_cfg"]["image_size"])


def expand(spec: StudySpec, root: str | Path) -> StudyPlan:
    """All runs of the study in a fixed order: per seed, the pre-training runs (objectives in file
    order), then per seed x objective x method x lr x k the cleaning runs."""
    root = Path(root).absolute()
    grid = methods(spec.cleaning)
    objectives = list(pretrain_objectives(spec.pretrain))
    guards = defenses(spec.pretrain)
    ks = sorted({k for m in grid for k in m.ks})
    runs: list[Run] = []
    for seed in spec.seeds:
        for objective in objectives:
            cfg = _pretrain_config(spec, root, objective, seed)
            runs.append(Run(pretrain_name(objective, seed), "pretrain", seed, objective, None, None, None,
                            cfg, after=_detect_step(spec, cfg)))
            if pretrain_objectives(spec.pretrain)[objective].clean_baseline:
                runs.append(Run(baseline_name(objective, seed), "baseline", seed, objective, None, None, None,
                                _pretrain_config(spec, root, objective, seed, poisoned=False)))
        for objective in objectives:  # then each defence of each objective
            for defense in guards:
                label = defended_name(objective, defense.label)
                cfg = _pretrain_config(spec, root, objective, seed, defense)
                before, parent = None, None
                if defense.name == FILTER:
                    parent = pretrain_name(objective, seed)
                    before = {"kind": "filter", **defense.params,
                              "manifest": str(root / POISON_DIR / MANIFEST),
                              "scores": str(root / parent / DETECTION_DIR / "scores.csv"),
                              "out": str(Path(cfg.data.poison_manifest).parent)}
                runs.append(Run(pretrain_name(label, seed), "pretrain", seed, label, None, None, None, cfg,
                                depends_on=parent, before=before))
    for seed in spec.seeds:
        for objective in objectives:
            parent = pretrain_name(objective, seed)
            for method in grid:
                for lr in method.lrs:
                    for k in method.ks:
                        name = clean_name(objective, seed, method.label, lr, k)
                        cfg = _clean_config(spec, root, objective, method, lr, k, seed)
                        runs.append(Run(name, "clean", seed, objective, method.label, lr, k, cfg, parent,
                                        start_epoch(spec.pretrain, objective)))
    cleaning_sets = [DataStage(cleaning_set_name(k), k) for k in ks]
    return StudyPlan(spec, root, DataStage(POISON_DIR, None), cleaning_sets, runs)


def _data_config(spec: StudySpec, manifest: Path | None) -> DataConfig:
    d = spec.data
    return DataConfig(kind=d.kind, path=d.path, num_samples=d.num_samples, world=dict(d.world),
                      image_key=d.image_key, caption_key=d.caption_key, separator=d.separator,
                      poison_manifest=str(manifest) if manifest else None, workers=d.workers)


def _eval_config(spec: StudySpec, every: int) -> EvalConfig:
    a, e = spec.attack, spec.eval
    return EvalConfig(kind=e.kind, path=e.path, n=e.n, target=a.target, trigger=a.trigger,
                      trigger_params=dict(a.trigger_params), seed=e.seed, every=every,
                      batch_size=e.batch_size, val_n=e.val_n, val_start=e.val_start, val_path=e.val_path,
                      val_fraction=e.val_fraction, split_seed=e.split_seed)


def start_epoch(pretrain: PretrainSpec, objective: str) -> int:
    """The pre-training epoch the cleaning runs of ``objective`` start from."""
    p = pretrain_objectives(pretrain)[objective]
    return p.clean_from if p.clean_from is not None else p.epochs


def _start_checkpoint(spec: StudySpec, root: Path, objective: str, seed: int) -> Path:
    p = pretrain_objectives(spec.pretrain)[objective]
    folder = root / pretrain_name(objective, seed) / "checkpoints"
    return folder / (f"epoch_{p.clean_from}.pt" if p.clean_from is not None else "latest.pt")


def _pretrain_config(spec: StudySpec, root: Path, objective: str, seed: int,
                     defense: Defense | None = None, poisoned: bool = True) -> TrainConfig:
    """A pre-training run, with a defence if given; ``poisoned=False`` is its clean baseline (the same
    rows, none poisoned)."""
    p = pretrain_objectives(spec.pretrain)[objective]
    l1, l2 = OBJECTIVES[objective_names(spec.pretrain)[objective]]
    l2 *= float(p.ssl_weight)  # scales an SSL term where the objective has one; mmcl stays 0
    eval_cfg = _eval_config(spec, p.eval_every)
    also = [p.clean_from] if p.clean_from is not None else []
    eval_cfg.epochs = list(also)
    name, manifest = objective, root / POISON_DIR / MANIFEST
    if defense is not None:
        name = defended_name(objective, defense.label)
        if defense.name == FILTER:  # the same poisoned rows, minus those the detector flagged
            manifest = root / FILTERED_DIR / f"{name},seed={seed}" / MANIFEST
    run_dir = root / (pretrain_name(name, seed) if poisoned else baseline_name(objective, seed))
    cfg = TrainConfig(
        run_dir=str(run_dir), model=p.model, epochs=p.epochs,
        batch_size=p.batch_size, precision=p.precision, device=spec.run.device, threads=spec.run.threads,
        checkpoint_interval_s=spec.run.checkpoint_interval_s, save_every_steps=p.save_every_steps,
        seed=seed, save_every=p.save_every, save_epochs=list(also), report_to=spec.run.report_to,
        data=_data_config(spec, manifest if poisoned else None), eval=eval_cfg,
        objective=ObjectiveConfig(mmcl_weight=l1, ssl_weight=l2, eda=p.eda, image_policy=p.image_policy),
        optim=OptimConfig(lr=p.lr, weight_decay=p.weight_decay, warmup_steps=p.warmup_steps,
                          grad_clip=p.grad_clip))
    if defense is not None and defense.name != FILTER:
        from clip_backdoor.defenses import build_defense

        cfg = build_defense(defense.name, defense.params).apply_to_config(cfg)
    return cfg


def detectors_needed(spec: StudySpec) -> list[str]:
    """The detection's detectors plus those a filter defence ranks by."""
    names = list(spec.detection.detectors)
    names += [d.params["detector"] for d in defenses(spec.pretrain) if d.name == FILTER]
    return list(dict.fromkeys(names))


def _detect_step(spec: StudySpec, cfg: TrainConfig) -> dict | None:
    """Score the training pairs of an undefended poisoned run with its final model (None: no detection)."""
    names = detectors_needed(spec)
    if not names:
        return None
    d = spec.detection
    return {"kind": "detect", "detectors": names, "k": d.k, "lid_k": d.lid_k, "batch_size": d.batch_size,
            "reference": d.reference, "seed": d.seed, "out": str(Path(cfg.run_dir) / DETECTION_DIR)}


def _clean_config(spec: StudySpec, root: Path, objective: str, method: Method, lr: float, k: int,
                  seed: int) -> TrainConfig:
    from clip_backdoor.cleaning import build_recipe

    c, p = spec.cleaning, pretrain_objectives(spec.pretrain)[objective]
    set_dir = root / cleaning_set_name(k)
    if spec.data.kind == "wds":  # a WebDataset cleaning set is written as shards (poisons baked in)
        data = dataclasses.replace(_data_config(spec, None), path=str(set_dir / "shard-*.tar"),
                                   num_samples=c.size)
    else:  # CSV and synthetic: the manifest selects the rows and triggers its poisons on the fly
        # (a small cleaning set renders its rows as it reads them, not the whole world up front)
        data = dataclasses.replace(_data_config(spec, set_dir / MANIFEST), cache=False)
    cfg = TrainConfig(
        run_dir=str(root / clean_name(objective, seed, method.label, lr, k)), model=p.model,
        init_checkpoint=str(_start_checkpoint(spec, root, objective, seed)),
        optimizer_state=c.optimizer_state, epochs=c.epochs, batch_size=method.batch_size or c.batch_size,
        precision=c.precision or p.precision, device=spec.run.device, threads=spec.run.threads, seed=seed,
        checkpoint_interval_s=spec.run.checkpoint_interval_s,
        eval_at_start=True, save_every=0, data=data, eval=_eval_config(spec, 1), report_to=spec.run.report_to,
        objective=ObjectiveConfig(eda=p.eda),
        optim=OptimConfig(lr=lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                          grad_clip=p.grad_clip))
    return build_recipe(method.name, method.params).apply_to_config(cfg)
