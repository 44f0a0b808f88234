"""Poisoned-sample detection: k-distance, LID and DAO scores of every training pair, and how well they
find the poisons (AUROC, precision and recall at the true poison count).

Huang et al., *Detecting Backdoor Samples in Contrastive Language Image Pretraining* (ICLR 2025;
``HanxunH/Detect-CLIP-Backdoor-Samples``: ``backdoor_sample_detector/{k_distance,lid_detection,dao}.py``
and ``extract_bd_scores.py``). A higher score means more likely poisoned. Per batch of B pairs:

- features: the model's **unnormalised** image and caption embeddings (``encode_image`` /
  ``encode_text`` without normalisation), Euclidean distances computed exactly (torch's
  ``donot_use_mm_for_euclid_dist``, as ``extract_bd_scores.py`` asks);
- the reference set of sample i (``reference="pairs"``, as ``extract_bd_scores.py`` runs CLIP): the
  other B − 1 images *and* the other B − 1 captions of the batch — its own image and its own caption
  are left out; ``reference="images"`` (the README's usage): the other B − 1 images only;
- a = the distances from image i to its reference set, sorted ascending (0-based), so a[k] is the
  (k + 1)-th nearest reference: self-exclusion plus the reference's index k is an off-by-one kept
  here on purpose, these are its definitions;
- **k-dist** = a[k] (``KDistanceDetector``, k = 16);
- **LID** = −k / Σ_{j<k} log(a[j] / a[k] + 1e-4) (``LIDDetector``, MLE; ``extract_bd_scores.py`` builds it
  with k = 64 whatever ``--k`` says: ``lid_k`` here);
- **DAO** = mean over the k nearest references n of LID(n) · log(a[k] / d_k(n)), where a neighbour's
  d_k(n) and LID(n) come from its sorted distances to all 2B points of the batch (images and
  captions) *including itself* (distance 0 at position 0, as the reference computes them:
  d_k(n) = F[n, k], LID(n) = −k / Σ_{j<k} log(F[n, j] / F[n, k] + 1e-4)); NaN and +inf become 1000,
  −inf 0 (``torch.nan_to_num`` as in ``dao.py``).

One reference bug is not copied: ``dao.py`` takes the neighbours' positions in the self-excluded,
image-then-caption distance list and uses them as rows of the full [images; captions] matrix, so
every neighbour after sample i (and every caption) is shifted by one row; here neighbour n is the
point it is.

Memory stays bounded by the batch: scores need only the batch (a 2B × 2B matrix at most), so
``detect`` streams batches (the last short one joins its predecessor, so every batch has at least B
pairs) and keeps three numbers per row. The batch order is a seeded shuffle, as the reference's
``RandomSampler`` (the paper: "the larger the batch, the better"); with dataloader workers each reads
its share of the shuffled rows, so the batches (and scores) are repeatable for the same seed and
number of workers.

``clip-backdoor detect --checkpoint CKPT`` scores the data the checkpoint was trained on (its saved
config), or any data given like a training config; it writes ``scores.csv`` (``row_id, is_poison,
kdist, lid, dao``) and ``detection.json``; when the data marks poisons (``data.poison_manifest``, or
an ``is_poison`` column) it reports AUROC and precision and recall at the true poison count P (the
top-P rows flagged; with exactly P flagged, precision and recall are the same number).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

DETECTORS = ("kdist", "lid", "dao")
REFERENCES = ("pairs", "images")
EPS = 1e-4  # inside the log of LID, as the reference
DAO_NAN = 1000.0


# ------------------------------------------------------------------------------------------------
# The scores of one batch
# ------------------------------------------------------------------------------------------------
def check_detectors(names: Iterable[str], where: str = "--detectors") -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise UserError(f"{where}: give at least one of {', '.join(DETECTORS)}")
    for name in names:
        if name not in DETECTORS:
            raise UserError(f"{where}: unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    return tuple(dict.fromkeys(names))


def n_references(batch: int, reference: str = "pairs") -> int:
    """How many reference points a sample of a batch of ``batch`` pairs has."""
    return (2 if reference == "pairs" else 1) * (batch - 1)


def check_k(k: int, batch: int, reference: str = "pairs", where: str = "--k") -> None:
    """k needs k + 1 reference points (a[k] is the (k+1)-th nearest)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"{where}: {k!r} must be an integer >= 1")
    have = n_references(batch, reference)
    if k + 1 > have:
        raise UserError(f"{where}={k} needs {k + 1} reference points, but a batch of {batch} pairs gives "
                        f"{have} ({reference}); lower it, or score more pairs per batch")


def _cdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y, p=2, compute_mode="donot_use_mm_for_euclid_dist")


def _others(b: int, device: torch.device) -> torch.Tensor:
    """[b, b-1]: row i lists every j != i in ascending order."""
    j = torch.arange(b - 1, device=device)
    return j[None, :] + (j[None, :] >= torch.arange(b, device=device)[:, None]).long()


def reference_distances(images: torch.Tensor, texts: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, points): d[i] the distances of image i to its reference set (other images, then other
    captions when ``texts`` is given), points[i] the index of each reference in [images; texts]."""
    b = images.shape[0]
    others = _others(b, images.device)
    d = torch.gather(_cdist(images, images), 1, others)
    points = others
    if texts is not None:
        d = torch.cat([d, torch.gather(_cdist(images, texts), 1, others)], dim=1)
        points = torch.cat([others, others + b], dim=1)
    return d, points


def lid_from_sorted(a: torch.Tensor, k: int) -> torch.Tensor:
    """−k / Σ_{j<k} log(a[:, j] / a[:, k] + 1e-4) over rows of ascending distances."""
    return -k / torch.log(a[:, :k] / a[:, k:k + 1] + EPS).sum(dim=1)


def score_batch(images: torch.Tensor, texts: torch.Tensor | None, *, detectors: Sequence[str] = DETECTORS,
                k: int = 16, lid_k: int = 64) -> dict[str, torch.Tensor]:
    """{detector: [B] scores} of one batch of unnormalised embeddings (``texts=None``: images only)."""
    images = images.float()
    texts = None if texts is None else texts.float()
    d, points = reference_distances(images, texts)
    a, order = torch.sort(d, dim=1, stable=True)
    out: dict[str, torch.Tensor] = {}
    if "kdist" in detectors:
        out["kdist"] = a[:, k]
    if "lid" in detectors:
        out["lid"] = lid_from_sorted(a, lid_k)
    if "dao" in detectors:
        full = images if texts is None else torch.cat([images, texts])
        f = torch.sort(_cdist(full, full), dim=1, stable=True).values  # self at position 0
        neighbours = torch.gather(points, 1, order[:, :k])  # [B, k] rows of `full`
        lid_n = lid_from_sorted(f, k)[neighbours]
        dk_n = f[:, k][neighbours]
        scores = (lid_n * torch.log(a[:, k:k + 1] / dk_n)).mean(dim=1)
        out["dao"] = torch.nan_to_num(scores, nan=DAO_NAN, posinf=DAO_NAN, neginf=0.0)
    return out


# ------------------------------------------------------------------------------------------------
# How well scores find the poisons
# ------------------------------------------------------------------------------------------------
def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (poisons = positives, higher score = more suspicious): the chance
    that a random poison outscores a random clean pair, ties counting one half (Mann–Whitney)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for start, end in zip(starts, ends):  # average rank (1-based) of each tie group
        ranks[order[start:end]] = (start + 1 + end) / 2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores (ties: the earlier row first)."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))[:n]


def at_poison_count(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Precision and recall when the top-P rows are flagged, P the true number of poisons."""
    y = np.asarray(labels, dtype=bool)
    p = int(y.sum())
    if p == 0:
        return {"precision_at_p": float("nan"), "recall_at_p": float("nan")}
    hits = int(y[top_rows(scores, p)].sum())
    return {"precision_at_p": hits / p, "recall_at_p": hits / p}


def detection_metrics(scores: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, dict]:
    return {name: {"auroc": auroc(s, labels), **at_poison_count(s, labels)} for name, s in scores.items()}


# ------------------------------------------------------------------------------------------------
# Every pair once, in batches
# ------------------------------------------------------------------------------------------------
class _Samples(torch.utils.data.IterableDataset):
    """A source's samples (this dataloader worker's share), preprocessed and tokenised in chunks."""

    def __init__(self, source: Any, image_size: int, context_length: int, chunk: int):
        super().__init__()
        self.source, self.image_size, self.context_length = source, image_size, context_length
        self.chunk = chunk

    def _collate(self, samples: list) -> dict:
        from clip_backdoor.data.transforms import preprocess
        from clip_backdoor.tokenizer import tokenize

        return {"images": torch.stack([preprocess(s.image, self.image_size) for s in samples]),
                "texts": tokenize([s.caption for s in samples], self.context_length),
                "row_ids": [s.row_id for s in samples],
                "is_poison": torch.tensor([bool(s.is_poison) for s in samples], dtype=torch.bool)}

    def __iter__(self) -> Iterator[dict]:
        samples = []
        for sample in self.source:
            samples.append(sample)
            if len(samples) == self.chunk:
                yield self._collate(samples)
                samples = []
        if samples:
            yield self._collate(samples)


def pair_batches(source: Any, *, image_size: int, context_length: int, batch_size: int,
                 workers: int = 0) -> Iterator[dict]:
    """Every usable pair of ``source`` once (its order: shuffled by its seed), in batches of exactly
    ``batch_size``; the remainder joins the last batch (so a batch holds B to 2B − 1 pairs)."""
    dataset = _Samples(source, image_size, context_length, batch_size)
    chunks = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         persistent_workers=False)
    pending: list[dict] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk["row_ids"])
        while size >= 2 * batch_size:  # keep at least one full batch back for a short remainder
            batch, pending, size = _take(pending, batch_size, size)
            yield batch
    if size > 0:
        if size >= 2 * batch_size:  # pragma: no cover - the loop above emptied it below 2B
            raise AssertionError(size)
        yield _merge(pending)


def _merge(chunks: list[dict]) -> dict:
    return {"images": torch.cat([c["images"] for c in chunks]),
            "texts": torch.cat([c["texts"] for c in chunks]),
            "row_ids": [r for c in chunks for r in c["row_ids"]],
            "is_poison": torch.cat([c["is_poison"] for c in chunks])}


def _take(chunks: list[dict], n: int, size: int) -> tuple[dict, list[dict], int]:
    merged = _merge(chunks)
    head = {k: v[:n] for k, v in merged.items()}
    tail = {k: v[n:] for k, v in merged.items()}
    return head, [tail], size - n


# ------------------------------------------------------------------------------------------------
# Scoring a dataset
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_batch(model: torch.nn.Module, batch: dict, device: torch.device | str,
                with_texts: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised image (and caption) embeddings of one batch, as the detectors take them."""
    from clip_backdoor.data.transforms import normalize

    images = normalize(batch["images"].to(device).float().div_(255))
    u = model.encode_image(images).float()
    v = model.encode_text(batch["texts"].to(device)).float() if with_texts else None
    return u, v


def open_data(data: Any, *, seed: int, image_size: int):
    """The training source of a data config (``clip_backdoor.config.DataConfig``), with its poison
    manifest applied, shuffled by ``seed``; a manifest made for other rows is an error."""
    from clip_backdoor.data.captions import make_source, source_spec

    source = make_source(source_spec(data, seed=seed, image_size=image_size))
    if data.poison_manifest:
        from clip_backdoor.attacks.manifest import PoisonedSource, read_info

        info = read_info(data.poison_manifest)
        if not info.get("subset") and info.get("n_rows") not in (None, source.num_samples):
            raise UserError(f"data.poison_manifest {data.poison_manifest}: lists {info['n_rows']} rows but "
                            f"the data has {source.num_samples}; is it the manifest of this data?")
        source = PoisonedSource(source, data.poison_manifest, image_size=image_size)
    return source


def _manifest_poisons(path: str | None) -> int | None:
    if not path:
        return None
    from clip_backdoor.attacks.manifest import read_manifest

    return sum(1 for row in read_manifest(path) if row.is_poison and row.trigger)


CLI_KEYS = {"detectors": "--detectors", "k": "--k", "lid_k": "--lid-k", "batch_size": "--batch-size",
            "reference": "--reference", "data": "data"}


def _check_ks(detectors: Sequence[str], k: int, lid_k: int, batch: int, reference: str, keys: dict) -> None:
    if "kdist" in detectors or "dao" in detectors:
        check_k(k, batch, reference, keys["k"])
    if "lid" in detectors:
        check_k(lid_k, batch, reference, keys["lid_k"])


def detect(model: torch.nn.Module, source: Any, out_dir: str | Path, *, detectors: Sequence[str] = DETECTORS,
           k: int = 16, lid_k: int = 64, batch_size: int = 512, reference: str = "pairs", workers: int = 0,
           device: torch.device | str = "cpu", manifest: str | None = None, info: dict | None = None,
           keys: dict | None = None) -> dict:
    """Score every pair of ``source``; write ``scores.csv`` and ``detection.json`` into ``out_dir``;
    return the summary (metrics per detector when the data marks poisons). ``keys`` names the
    settings in error messages (default: the CLI's flags; a study passes ``detection.k`` etc.)."""
    keys = {**CLI_KEYS, **(keys or {})}
    detectors = check_detectors(detectors, keys["detectors"])
    if reference not in REFERENCES:
        raise UserError(f"{keys['reference']}: {reference!r} is not one of {', '.join(REFERENCES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise UserError(f"{keys['batch_size']}: {batch_size!r} must be an integer >= 2 (a sample's "
                        "references are the other pairs of its batch)")
    # every batch holds >= batch_size pairs (the remainder joins the last), or all n when n < batch_size
    _check_ks(detectors, k, lid_k, min(batch_size, source.num_samples), reference, keys)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    model.eval()
    started = time.perf_counter()
    scores: dict[str, list[np.ndarray]] = {d: [] for d in detectors}
    labels: list[np.ndarray] = []
    n_rows = 0
    batches = pair_batches(source, image_size=model.image_size, context_length=model.context_length,
                           batch_size=batch_size, workers=workers)
    with atomic_path(out_dir / "scores.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["row_id", "is_poison", *detectors])
        bar = tqdm(batches, total=max(1, source.num_samples // batch_size), desc="detect", unit="batch",
                   disable=None, mininterval=2.0)
        for batch in bar:
            _check_ks(detectors, k, lid_k, len(batch["row_ids"]), reference, keys)  # unreadable rows skipped
            u, v = embed_batch(model, batch, device, with_texts=reference == "pairs")
            got = {name: s.cpu().numpy() for name, s in
                   score_batch(u, v, detectors=detectors, k=k, lid_k=lid_k).items()}
            poison = batch["is_poison"].numpy()
            for i, row_id in enumerate(batch["row_ids"]):
                writer.writerow([row_id, int(poison[i]), *(repr(float(got[d][i])) for d in detectors)])
            for d in detectors:
                scores[d].append(got[d])
            labels.append(poison)
            n_rows += len(batch["row_ids"])
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=bool)
    all_scores = {d: np.concatenate(scores[d]) if scores[d] else np.zeros(0) for d in detectors}
    expected = _manifest_poisons(manifest)
    if expected is not None and int(y.sum()) < expected:
        raise UserError(f"data.poison_manifest {manifest}: marks {expected} poisons but only "
                        f"{int(y.sum())} of the data's rows matched it; is it the manifest of this data?")
    summary = {**(info or {}), "n_rows": n_rows, "n_poison": int(y.sum()), "detectors": list(detectors),
               "k": k, "lid_k": lid_k, "batch_size": batch_size, "reference": reference,
               "seconds": time.perf_counter() - started,
               "metrics": detection_metrics(all_scores, y) if y.any() and not y.all() else None}
    write_json(out_dir / "detection.json", summary)
    log.info(summary_line(summary, out_dir))
    return summary


def summary_line(summary: dict, out_dir: Path | str) -> str:
    head = (f"detect: {summary['n_rows']} pairs scored ({summary['n_poison']} marked poisoned) in "
            f"{summary['seconds']:.0f}s -> {Path(out_dir) / 'scores.csv'}")
    metrics = summary.get("metrics")
    if not metrics:
        return head + "; no poisons marked, so no AUROC"
    parts = [f"{name} AUROC {m['auroc']:.3f} P@P {m['precision_at_p']:.3f}" for name, m in metrics.items()]
    return head + "; " + ", ".join(parts)


def read_scores(path: str | Path, detector: str) -> dict[str, float]:
    """{row_id: score} of one detector from a ``scores.csv``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: scores not found (run the detection first)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if detector not in (reader.fieldnames or []):
            columns = ", ".join(reader.fieldnames or [])
            raise UserError(f"{path}: has no {detector!r} scores (columns: {columns})")
        return {row["row_id"]: float(row[detector]) for row in reader}


# ------------------------------------------------------------------------------------------------
# Filter-then-retrain: a subset manifest without the top-scored rows
# ------------------------------------------------------------------------------------------------
def write_filtered_manifest(manifest: str | Path, scores: dict[str, float], budget: float,
                            out_dir: str | Path, info: dict | None = None) -> dict:
    """Copy ``manifest`` (a full poisoning manifest) into ``out_dir`` without the ``round(budget · N)``
    rows with the highest scores (N = scored rows; ties: the earlier manifest row is removed first),
    as a subset manifest the loader honours (``poison.json``: ``"subset": true``). Returns its info."""
    from clip_backdoor.attacks.manifest import (
        INFO_NAME,
        MANIFEST_NAME,
        ManifestWriter,
        read_info,
        read_manifest,
    )
    from clip_backdoor.fileio import atomic_dir

    if not 0 < budget < 1:
        raise UserError(f"budget: {budget!r} must be a fraction of the rows in (0, 1)")
    rows = list(read_manifest(manifest))
    keys = [r.source_key for r in rows]
    missing = [key for key in keys if key not in scores]
    if missing or len(scores) != len(keys):
        raise UserError(f"{manifest}: {len(missing)} of its {len(keys)} rows have no score (scores cover "
                        f"{len(scores)} rows); were the scores computed on this data?")
    values = np.array([scores[key] for key in keys], dtype=np.float64)
    n_remove = int(round(budget * len(keys)))
    removed = set(top_rows(values, n_remove).tolist())
    out_dir = Path(out_dir)
    base_info = read_info(manifest)
    n_poison = sum(r.is_poison for r in rows)
    n_poison_removed = sum(rows[i].is_poison for i in removed)
    summary = {**base_info, **(info or {}), "subset": True, "n_rows": len(rows) - n_remove,
               "n_poison": n_poison - n_poison_removed,
               "filtered": {"from": str(manifest), "budget": budget, "n_removed": n_remove,
                            "n_poison_removed": n_poison_removed, "n_poison_before": n_poison}}
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    with atomic_dir(out_dir) as tmp:
        with ManifestWriter(tmp / MANIFEST_NAME) as writer:
            for i, row in enumerate(rows):
                if i not in removed:
                    writer.write(row)
        write_json(tmp / INFO_NAME, summary)
    log.info("filtered %s: removed %d of %d rows (%d of %d poisons)", out_dir, n_remove, len(rows),
             n_poison_removed, n_poison)
    return summary


# ------------------------------------------------------------------------------------------------
# CLI: clip-backdoor detect
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clip-backdoor detect",
        description="Score every training pair with k-dist, LID and DAO (Huang et al., ICLR 2025); with "
                    "poisons marked (data.poison_manifest), report AUROC and precision/recall at the "
                    "true poison count.",
        epilog="The data default to the checkpoint's own training data (its saved config); change them "
               "like a training config: data.kind=csv data.path=train.csv data.poison_manifest=m.csv")
    p.add_argument("--checkpoint", required=True, help="the (poisoned) model whose embeddings are scored")
    p.add_argument("--config", help="a run's config.yaml (TrainConfig) whose data section to score")
    p.add_argument("--data", metavar="SPEC",
                   help="synthetic | csv:PATH | wds:PATTERN (replaces the kind and path)")
    p.add_argument("--manifest", help="poison manifest (data.poison_manifest): the truth for AUROC")
    p.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated: kdist,lid,dao")
    p.add_argument("--k", type=int, default=16, help="neighbours for k-dist and DAO (default 16)")
    p.add_argument("--lid-k", type=int, default=64, help="neighbours for LID (default 64, as the reference)")
    p.add_argument("--batch-size", type=int, default=512, help="pairs per reference batch (default 512)")
    p.add_argument("--reference", choices=REFERENCES, default="pairs",
                   help="pairs: other images and captions (extract_bd_scores.py); images: other images")
    p.add_argument("--seed", type=int, default=0, help="shuffles the pairs into batches (default 0)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/scores.csv and DIR/detection.json")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.* keys, e.g. data.num_samples=5000")
    return p


def _data_config(args, ckpt: dict):
    """The data to score: the checkpoint's training data, then --config, --data, --manifest, overrides."""
    from clip_backdoor.config import DataConfig, apply_overrides, from_dict, load_yaml

    data = dict((ckpt.get("config") or {}).get("data") or {})
    source = f"checkpoint {args.checkpoint}"
    if args.config:
        data = {**data, **(load_yaml(args.config).get("data") or {})}
        source = args.config
    if args.data:
        kind, _, path = args.data.partition(":")
        if kind not in ("synthetic", "csv", "wds") or (kind != "synthetic" and not path):
            raise UserError(f"--data {args.data!r}: use synthetic, csv:PATH or wds:PATTERN")
        data.update(kind=kind, path=path or None)
    if args.manifest:
        data["poison_manifest"] = args.manifest
    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise UserError(f"{bad[0]}: only data.* keys can be set here")
    data = apply_overrides({"data": data}, args.overrides)["data"]
    if not data:
        raise UserError("the checkpoint records no training data; give --config or --data")
    return from_dict(DataConfig, data, f"data (from {source})")


def main(argv: list[str]) -> int:
    from clip_backdoor.weights import load_checkpoint, model_from_checkpoint

    args = _parser().parse_args(argv)
    detectors = check_detectors([d.strip() for d in args.detectors.split(",") if d.strip()])
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.checkpoint)
    model, _ = model_from_checkpoint(ckpt, device)
    data = _data_config(args, ckpt)
    source = open_data(data, seed=args.seed, image_size=model.image_size)
    info = {"checkpoint": str(args.checkpoint), "data": dataclasses.asdict(data), "seed": args.seed}
    detect(model, source, args.out, detectors=detectors, k=args.k, lid_k=args.lid_k,
           batch_size=args.batch_size, reference=args.reference, workers=args.workers, device=device,
           manifest=data.poison_manifest, info=info)
    return 0


