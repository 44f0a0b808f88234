"""A study's data stages: the poisoning manifest (``data/poisoned``) and the cleaning sets
(``data/clean,k=<k>``), both manifests over the pre-training source (WebDataset cleaning sets are
written as shards). An existing one is reused after checking it was made with the same settings.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from clip_backdoor.errors import UserError
from clip_backdoor.study.expand import MANIFEST, DataStage, StudyPlan, model_image_size
from clip_backdoor.study.spec import StudySpec

log = logging.getLogger(__name__)


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
