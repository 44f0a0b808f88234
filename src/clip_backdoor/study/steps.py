"""Data steps a study run takes outside the training loop (``Run.before`` / ``Run.after``).

- ``detect`` (after an undefended poisoned pre-training run): score its training pairs with its
  final model (``clip_backdoor.detection``) into ``<run>/detection/{scores.csv,detection.json}``;
- ``filter`` (before a filter-then-retrain run): drop the top ``budget`` share of those pairs by one
  detector's score, as a subset manifest ``data/filtered/.../manifest.csv`` the run then trains on.

Both are skipped when their output already exists with the same settings, so a resumed study does
not score twice; a run counts as finished only once its ``after`` step is done.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_backdoor.config import TrainConfig
from clip_backdoor.errors import UserError

DETECT_KEYS = {"detectors": "detection.detectors", "k": "detection.k", "lid_k": "detection.lid_k",
               "batch_size": "detection.batch_size", "reference": "detection.reference"}


def _settings(step: dict, cfg: TrainConfig) -> dict:
    """What a step's output depends on (besides the data, which the study already pins)."""
    out = {k: v for k, v in step.items() if k not in ("kind", "out")}
    if step["kind"] == "detect":
        out["epochs"] = cfg.epochs  # a longer pre-training run is a new model
    else:  # new scores, new filter
        out["detection"] = _recorded({"kind": "detect", "out": str(Path(step["scores"]).parent)})
    return out


def _recorded(step: dict) -> dict | None:
    name = "detection.json" if step["kind"] == "detect" else "poison.json"
    path = Path(step["out"]) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("step")
    except json.JSONDecodeError:
        return None


def is_done(step: dict | None, cfg: TrainConfig) -> bool:
    return step is None or _recorded(step) == json.loads(json.dumps(_settings(step, cfg)))


def run_step(step: dict | None, cfg: TrainConfig) -> None:
    if step is None or is_done(step, cfg):
        return
    if step["kind"] == "detect":
        _detect(step, cfg)
    elif step["kind"] == "filter":
        _filter(step, cfg)
    else:  # pragma: no cover - the spec makes only these two
        raise ValueError(step["kind"])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _detect(step: dict, cfg: TrainConfig) -> None:
    import torch

    from clip_backdoor.detection import detect, open_data
    from clip_backdoor.train.checkpoint import latest_path
    from clip_backdoor.weights import model_from_checkpoint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    checkpoint = latest_path(cfg.run_dir)
    model, _ = model_from_checkpoint(checkpoint, device)
    source = open_data(cfg.data, seed=step["seed"], image_size=model.image_size)
    detect(model, source, step["out"], detectors=step["detectors"], k=step["k"], lid_k=step["lid_k"],
           batch_size=step["batch_size"], reference=step["reference"], workers=cfg.data.workers,
           device=device, manifest=cfg.data.poison_manifest,
           info={"checkpoint": str(checkpoint), "step": _settings(step, cfg)}, keys=DETECT_KEYS)


def _filter(step: dict, cfg: TrainConfig) -> None:
    from clip_backdoor.detection import read_scores, write_filtered_manifest
    from clip_backdoor.train.checkpoint import latest_path

    if _recorded(step) is not None and latest_path(cfg.run_dir).exists():
        raise UserError(f"{step['out']}: made from other detection scores than the study's now, and "
                        f"{cfg.run_dir} already trained on it; delete both to filter and train again")
    scores_path = Path(step["scores"])
    if not scores_path.is_file():
        raise UserError(f"{scores_path}: no detection scores; the undefended pre-training run must finish "
                        "(with its detection) first")
    scores = read_scores(scores_path, step["detector"])
    write_filtered_manifest(step["manifest"], scores, step["budget"], step["out"],
                            info={"step": _settings(step, cfg)})


DETECTION_COLUMNS = ("seed", "pretrain", "kind", "detector", "auroc", "precision_at_p", "recall_at_p",
                     "n_rows", "n_poison", "n_removed", "n_poison_removed", "run")


def detection_rows(runs) -> list[dict]:
    """``detection.csv``: per undefended run and detector, how well the scores find the poisons
    (kind ``scores``); per filter-then-retrain run, what its filter removed (kind ``filter``)."""
    out = []
    for run in runs:
        base = {"seed": run.seed, "pretrain": run.pretrain, "run": run.name}
        if run.after and run.after["kind"] == "detect":
            path = Path(run.after["out"]) / "detection.json"
            if not path.is_file():
                continue
            summary = json.loads(path.read_text(encoding="utf-8"))
            for detector, m in (summary.get("metrics") or {}).items():
                out.append({**base, "kind": "scores", "detector": detector, **m, "n_rows": summary["n_rows"],
                            "n_poison": summary["n_poison"]})
        if run.before and run.before["kind"] == "filter":
            path = Path(run.before["out"]) / "poison.json"
            if not path.is_file():
                continue
            info = json.loads(path.read_text(encoding="utf-8"))
            f = info.get("filtered") or {}
            out.append({**base, "kind": "filter", "detector": run.before["detector"],
                        "n_rows": info["n_rows"], "n_poison": info["n_poison"],
                        "n_removed": f.get("n_removed"), "n_poison_removed": f.get("n_poison_removed")})
    return [{c: r.get(c) for c in DETECTION_COLUMNS} for r in out]
