"""Zero-shot accuracy and attack success rate: one definition of each, used by training and the CLI.

Definitions (REFERENCE.md, "Evaluation"):

- **Classifier.** For each class, every template is filled with the class name and encoded; each text
  embedding is L2-normalised, the class's embeddings are averaged and the mean re-normalised. The
  columns of ``W [D, C]`` are these class embeddings. A prediction is the argmax of the normalised
  image embedding times ``W``. The same ``W`` serves the clean and the triggered pass.
- **Accuracy@k** = fraction of clean images whose true class is among the top-k logits (k is clamped
  to the number of classes, so top-5 of a 3-class set is 1.0).
- **ASR@k** = |{x : y(x) != t and t in top-k(f(trigger(x)))}| / |{x : y(x) != t}|, t the target
  class. Images of the target class are left out: for them "predicted t" is not an attack. The
  denominator is reported as ``n_asr``. (The reference code's "ASR" compared triggered predictions
  with the *true* labels, i.e. it printed accuracy under the trigger; that number is ``ra1`` here.)
- **Robust accuracy** ``ra1`` = among the same non-target triggered images, the fraction still
  classified (top-1) as their true class.

With two evaluation splits (``eval_set.val_from``, see ``data.classification.EvalSplits``) one pass
through the model yields both: the test split's metrics under their plain names and the validation
split's prefixed ``val_`` (``val_acc1``, ``val_asr1``, ``val_n``, ...).

The test-time trigger is applied exactly as at poisoning time: the image is squashed to the model
resolution (clean images are resized and centre-cropped instead), then triggered as uint8 in, float
trigger, quantised back to uint8 (``apply_trigger_uint8``), with a generator seeded from
``(seed, image index)``: a checkpoint's
ASR is the same on every run and for every batch size or worker count (the reference redrew its
triggers on every run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clip_backdoor.data.transforms import normalize
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Metrics on logits (pure functions)
# --------------------------------------------------------------------------------------------
def _topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Number of rows whose label is among the row's top-k logits (k clamped to the class count)."""
    return int((_topk_indices(logits, k) == labels.unsqueeze(-1)).any(dim=-1).sum())


def attack_success(logits_triggered: torch.Tensor, labels: torch.Tensor, target_index: int,
                   k: int) -> tuple[int, int]:
    """(hits, denominator) of ASR@k: among rows whose true label is not the target, those with the
    target among their top-k logits."""
    non_target = labels != target_index
    hits = (_topk_indices(logits_triggered[non_target], k) == target_index).any(dim=-1).sum()
    return int(hits), int(non_target.sum())


# An ASR at or below this is what a model without the backdoor scores (a clean model sends a few
# non-target images to the target by mistake): the backdoor was not learned. The study report's
# warning and the line that ends `pretrain` / `clean` share this one rule.
NOT_LEARNED_ASR = 0.05
_ASR_SLACK = 1e-9  # ASR is a ratio of counts: keep "exactly the threshold" inside despite rounding


def backdoor_not_learned(asr1: float, threshold: float = NOT_LEARNED_ASR) -> bool:
    """True when a (poisoned) model's top-1 ASR is no higher than a clean model's rate."""
    return asr1 <= threshold + _ASR_SLACK


def robust_correct(logits_triggered: torch.Tensor, labels: torch.Tensor,
                   target_index: int) -> tuple[int, int]:
    """(hits, denominator) of robust accuracy: non-target rows still top-1 correct under the trigger."""
    non_target = labels != target_index
    hits = (logits_triggered[non_target].argmax(dim=-1) == labels[non_target]).sum()
    return int(hits), int(non_target.sum())


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def build_classifier(model: torch.nn.Module, classes: Sequence[str], templates: Sequence[str], *,
                     context_length: int, device: str | torch.device = "cpu", batch_size: int = 256,
                     precision: str = "fp32") -> torch.Tensor:
    """Zero-shot weights ``[D, C]`` (float32, on ``device``): per class, the re-normalised mean of the
    normalised embeddings of every template filled with the class name."""
    from clip_backdoor.tokenizer import tokenize

    if not classes or not templates:
        raise UserError(f"a zero-shot classifier needs classes and templates "
                        f"(got {len(classes)} classes, {len(templates)} templates)")
    for template in templates:
        if "{}" not in template:
            raise UserError(f"template {template!r} has no '{{}}' for the class name")
    # Class-major order: texts[c * T + t] is template t filled with class c.
    texts = [template.replace("{}", name) for name in classes for template in templates]
    tokens = tokenize(texts, context_length=context_length)
    chunks = []
    with _inference(model):
        for chunk in tokens.split(batch_size):
            with _autocast(device, precision):
                features = model.encode_text(chunk.to(device))
            chunks.append(F.normalize(features.float(), dim=-1))
    per_template = torch.cat(chunks).view(len(classes), len(templates), -1)
    class_embeddings = F.normalize(per_template.mean(dim=1), dim=-1)
    return class_embeddings.T.contiguous()


def model_inputs(images_uint8: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The image tower's input for a uint8 batch: scaled to [0, 1], normalised, channels-last."""
    x = normalize(images_uint8.to(device, non_blocking=True).float().div_(255))
    # Channels-last input alone makes the tiny ResNet ~1.5x faster on CPU (measured); same maths.
    return x.contiguous(memory_format=torch.channels_last)


def image_logits(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor, *,
                 device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Cosine-similarity logits ``[B, C]`` (float32) of a batch against the classifier: uint8 pixels,
    or float inputs already made by :func:`model_inputs`.

    No logit scale: it does not change the ranking. Call under ``torch.no_grad`` in eval mode.
    """
    if images.dtype == torch.uint8:
        x = model_inputs(images, device)
    else:  # a slice or a masked pick of prepared inputs; a mask's pick comes back NCHW
        x = images.to(device).contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        features = model.encode_image(x)
    return F.normalize(features.float(), dim=-1) @ classifier.float()


# --------------------------------------------------------------------------------------------
# Seeded test-time triggers
# --------------------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for image ``index`` under evaluation seed ``seed`` (splitmix64).

    Mixing matters: torch's CPU generator keeps only the low 32 bits of its seed, so
    ``seed * K + index`` would make neighbouring seeds share most of their draws.
    """
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class TriggeredEvalSet(Dataset):
    """``(clean uint8, triggered uint8, label)`` per image; image i's trigger is drawn from a generator
    seeded by ``image_seed(seed, i)``, so it is independent of batching and worker processes.

    Images labelled ``skip_label`` (the target class, left out of ASR) come back untriggered: drawing
    a trigger for them would be wasted work, and skipping them changes no other image's draw.
    """

    def __init__(self, eval_set: Any, trigger: Any, seed: int, skip_label: int | None = None):
        self.eval_set, self.trigger, self.seed, self.skip_label = eval_set, trigger, seed, skip_label

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        from clip_backdoor.attacks.triggers import apply_trigger_uint8

        views = getattr(self.eval_set, "views", None)
        if views is not None:  # clean: centre crop; triggered: squashed first, like the poisons
            image, to_trigger, label = views(index)
        else:  # a plain (image, label) dataset: already at the model resolution
            image, label = self.eval_set[index]
            to_trigger = image
        if label == self.skip_label:
            return image, image, label
        generator = torch.Generator().manual_seed(image_seed(self.seed, index))
        return image, apply_trigger_uint8(to_trigger, self.trigger, generator), label


class PreparedEval:
    """An evaluation set whose images are decoded (or rendered) and triggered once, as uint8 tensors.

    Evaluation runs after every epoch of every run on the same images with the same seeded triggers,
    so the training loop prepares them once and every evaluation (of this run, and of other runs in
    the same process with the same set) only runs the model. It yields exactly the batches the
    streaming path would (same order, same batch boundaries), so the numbers are bit-identical.
    """

    # Past this the set stays streamed (ImageNet val at 224 px would be ~15 GB of uint8 pixels).
    MAX_BYTES = 512 * 2**20

    def __init__(self, eval_set: Any, trigger: Any = None, seed: int = 0, target: str | int | None = None):
        self.classes, self.templates = list(eval_set.classes), list(eval_set.templates)
        self.val_from = getattr(eval_set, "val_from", None)
        self.trigger, self.seed, self.target = trigger, seed, target
        self.attacked = trigger is not None
        skip = None
        if self.attacked:
            from clip_backdoor.data.classification import resolve_class

            skip = resolve_class(self.classes, target)
            triggered = TriggeredEvalSet(eval_set, trigger, seed, skip_label=skip)
            items = [triggered[i] for i in range(len(eval_set))]
        else:
            items = [eval_set[i] for i in range(len(eval_set))]
        self.images = torch.stack([item[0] for item in items])
        self.triggered = torch.stack([item[1] for item in items]) if self.attacked else None
        self.labels = torch.tensor([int(item[-1]) for item in items], dtype=torch.long)
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}

    @staticmethod
    def fits(eval_set: Any) -> bool:
        """Whether the set is small enough to keep in memory (clean + triggered views)."""
        if len(eval_set) == 0:
            return False
        image = eval_set[0][0]
        return 2 * len(eval_set) * image.numel() * image.element_size() <= PreparedEval.MAX_BYTES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        if self.attacked:
            return self.images[index], self.triggered[index], int(self.labels[index])
        return self.images[index], int(self.labels[index])

    def same_attack(self, trigger: Any, seed: int, target: str | int | None) -> bool:
        same_trigger = trigger is self.trigger or trigger == self.trigger
        return same_trigger and seed == self.seed and target == self.target

    def inputs(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The clean and triggered images as model inputs on ``device`` (``model_inputs``, made once
        and kept), or None when 4-byte floats would not fit in ``MAX_BYTES``: then every evaluation
        converts its own batches, as the streaming path does."""
        key = str(torch.device(device))
        if key not in self._inputs:
            views = (self.images, self.triggered) if self.attacked else (self.images,)
            if sum(v.numel() for v in views) * 4 > self.MAX_BYTES:
                self._inputs[key] = None
            else:
                made = [model_inputs(v, device) for v in views]
                self._inputs[key] = (made[0], made[1] if self.attacked else None)
        return self._inputs[key]

    def batches(self, batch_size: int, device: str | torch.device | None = None) -> Iterator[tuple]:
        """The streaming path's batches; with ``device``, as model inputs on it when they fit (the same
        values as converting each batch: the conversion is element-wise)."""
        made = self.inputs(device) if device is not None else None
        images, triggered = made if made is not None else (self.images, self.triggered)
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            if self.attacked:
                yield images[start:end], triggered[start:end], self.labels[start:end]
            else:
                yield images[start:end], self.labels[start:end]


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------
def evaluate_model(model: torch.nn.Module, eval_set: Any, *, target: str | int | None = None,
                   trigger: Any = None, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device = "cpu", precision: str = "fp32", workers: int = 0,
                   classifier: torch.Tensor | None = None, progress: bool = False,
                   val_from: int | None = None) -> dict:
    """Zero-shot accuracy of ``model`` (already on ``device``) on ``eval_set``, plus ASR and robust
    accuracy when both ``target`` (class name) and ``trigger`` (a Trigger, or a trigger name) are given.

    Returns ``{"acc1", "acc5", "n"}`` and, with a trigger, ``{"asr1", "asr5", "ra1", "n_asr"}``;
    rates are fractions in [0, 1]. ``classifier`` (``[D, C]`` from :func:`build_classifier`) is built
    from ``eval_set.classes`` / ``.templates`` when not given. The model's train/eval mode is restored.
    Images at positions ≥ ``val_from`` (default: ``eval_set.val_from`` when the set has one) are the
    validation split: counted apart and returned with the prefix ``val_``.
    """
    if (target is None) != (trigger is None):
        raise UserError("an attack success rate needs both a target class and a trigger "
                        f"(got target={target!r}, trigger={getattr(trigger, 'name', trigger)!r})")
    if len(eval_set) == 0:
        raise UserError("the evaluation set is empty")
    _autocast(device, precision)  # validates the name before any work
    attacked = trigger is not None
    if attacked:
        from clip_backdoor.data.classification import resolve_class

        target_index = resolve_class(eval_set.classes, target)
        if isinstance(trigger, str):
            from clip_backdoor.attacks.triggers import get_trigger

            trigger = get_trigger(trigger)
        # Fail here in one line, not inside a loader worker (whose errors come back as tracebacks).
        trigger.check_image_size(*eval_set[0][0].shape[-2:])
    if classifier is None:
        classifier = build_classifier(model, eval_set.classes, eval_set.templates,
                                      context_length=model.context_length, device=device,
                                      batch_size=batch_size, precision=precision)
    classifier = classifier.to(device)

    if isinstance(eval_set, PreparedEval):  # rendered and triggered once; only the model runs here
        if not eval_set.same_attack(trigger, seed, target):
            raise ValueError("this prepared evaluation set was triggered with another trigger, seed or "
                             "target")
        loader = eval_set.batches(batch_size, device)
    else:
        from clip_backdoor.data.loader import ignore_stop_signals  # a job's stop signal is the trainer's

        dataset = TriggeredEvalSet(eval_set, trigger, seed, skip_label=target_index) if attacked else eval_set
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=torch.device(device).type == "cuda",
                            worker_init_fn=ignore_stop_signals if workers else None)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluate", unit="batch", leave=False)

    if val_from is None:
        val_from = getattr(eval_set, "val_from", None)
    splits = ("", "val_") if val_from is not None else ("",)
    counts = {split: dict.fromkeys(("acc1", "acc5", "asr1", "asr5", "ra1", "n", "n_asr"), 0)
              for split in splits}
    seen = 0
    with _inference(model):
        for batch in loader:
            images, labels = batch[0], batch[-1]
            logits = image_logits(model, images, classifier, device=device, precision=precision).cpu()
            positions = torch.arange(seen, seen + len(labels))
            seen += len(labels)
            in_split = {"": positions < val_from, "val_": positions >= val_from} if val_from is not None \
                else {"": torch.ones(len(labels), dtype=torch.bool)}
            for split, mask in in_split.items():
                c = counts[split]
                c["n"] += int(mask.sum())
                c["acc1"] += topk_correct(logits[mask], labels[mask], 1)
                c["acc5"] += topk_correct(logits[mask], labels[mask], 5)
            if not attacked:
                continue
            # Only non-target images enter the triggered pass: the target class is not attacked.
            attackable = labels != target_index
            if not attackable.any():
                continue
            logits = image_logits(model, batch[1][attackable], classifier, device=device,
                                  precision=precision).cpu()
            for split, mask in in_split.items():
                mine = mask[attackable]
                split_logits, split_labels = logits[mine], labels[attackable][mine]
                c = counts[split]
                c["asr1"] += attack_success(split_logits, split_labels, target_index, 1)[0]
                c["asr5"] += attack_success(split_logits, split_labels, target_index, 5)[0]
                hits, n_non_target = robust_correct(split_logits, split_labels, target_index)
                c["ra1"] += hits
                c["n_asr"] += n_non_target

    metrics: dict = {}
    for split in splits:
        c = counts[split]
        name = "the validation split" if split else "the evaluation set"
        if c["n"] == 0:
            raise UserError(f"{name} is empty (val_from={val_from} of {seen} images)")
        part = {"acc1": c["acc1"] / c["n"], "acc5": c["acc5"] / c["n"]}
        if attacked:
            if c["n_asr"] == 0:
                raise UserError(f"every image of {name} belongs to the target class {target!r}: "
                                "no image is left to attack")
            part.update({key: c[key] / c["n_asr"] for key in ("asr1", "asr5", "ra1")})
        part["n"] = c["n"]
        if attacked:
            part["n_asr"] = c["n_asr"]
        metrics.update({f"{split}{key}": value for key, value in part.items()})
    return metrics


# --------------------------------------------------------------------------------------------
# Classifier cache for `clip-backdoor evaluate` (fixed weights; the trainer never uses it)
# --------------------------------------------------------------------------------------------
_CLASSIFIER_CACHE: dict[str, torch.Tensor] = {}
_CLASSIFIER_CACHE_SIZE = 8


def classifier_cache_key(checkpoint: str | os.PathLike, classes: Sequence[str], templates: Sequence[str], *,
                         context_length: int, precision: str, model_name: str | None = None) -> str:
    """Identity of a checkpoint's classifier: the file (path, size, mtime), the texts, and how they are
    encoded. A rewritten checkpoint (new mtime or size) gets a new key."""
    stat = Path(checkpoint).stat()
    texts = hashlib.sha256(json.dumps([list(classes), list(templates)]).encode()).hexdigest()
    identity = [str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, model_name, texts,
                context_length, precision]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def cached_classifier(key: str, build: Any, cache_dir: Path | None = None) -> torch.Tensor:
    """``build()``'s classifier, memoised in this process and, with ``cache_dir``, on disk."""
    if key in _CLASSIFIER_CACHE:
        return _CLASSIFIER_CACHE[key]
    path = cache_dir / f"classifier-{key}.pt" if cache_dir is not None else None
    classifier = None
    if path is not None and path.is_file():
        try:
            classifier = torch.load(path, map_location="cpu", weights_only=True)
            log.info("zero-shot classifier read from cache %s", path)
        except Exception as e:  # a torn or foreign cache file is rebuilt, never fatal
            log.warning("ignoring unreadable classifier cache %s (%s)", path, e)
    if not isinstance(classifier, torch.Tensor):
        classifier = build().cpu()
        if path is not None:
            from clip_backdoor.fileio import atomic_path

            with atomic_path(path) as tmp:
                torch.save(classifier, tmp)
    while len(_CLASSIFIER_CACHE) >= _CLASSIFIER_CACHE_SIZE:
        _CLASSIFIER_CACHE.pop(next(iter(_CLASSIFIER_CACHE)))
    _CLASSIFIER_CACHE[key] = classifier
    return classifier


# --------------------------------------------------------------------------------------------
# CLI: clip-backdoor evaluate
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clip-backdoor evaluate",
        description="Zero-shot accuracy, attack success rate (ASR) and robust accuracy of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="clip-backdoor checkpoint, or a plain state dict "
                   "(.pt / .safetensors) together with --model")
    p.add_argument("--model", default=None, help="architecture name or config .json (overrides the "
                   "checkpoint's; required for a plain state dict)")
    p.add_argument("--eval", default="synthetic", metavar="SPEC",
                   help="synthetic | imagefolder:PATH | labels_csv:PATH (default: synthetic)")
    p.add_argument("--eval-n", type=int, default=None, metavar="N", help="synthetic: number of images")
    p.add_argument("--world-seed", type=int, default=None, metavar="S", help="synthetic: world seed")
    p.add_argument("--target", default=None, help="ASR target class name (e.g. banana)")
    p.add_argument("--trigger", default=None, help="test-time trigger name (e.g. badnet)")
    p.add_argument("--trigger-param", action="append", default=[], metavar="KEY=VALUE",
                   help="trigger parameter, repeatable (e.g. size=3)")
    p.add_argument("--seed", type=int, default=0, help="trigger seed: same seed, same ASR (default 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", default=None, metavar="RESULT.json", help="write the result JSON here")
    p.add_argument("--no-cache", action="store_true",
                   help="rebuild the zero-shot classifier instead of reading the cache next to --out")
    return p


def eval_spec(text: str, *, n: int | None = None, world_seed: int | None = None) -> dict | str:
    """``synthetic`` / ``imagefolder:PATH`` / ``labels_csv:PATH`` (or a bare path) -> an
    ``open_eval_set`` spec; ``n`` and ``world_seed`` apply to the synthetic set only."""
    kind, sep, path = text.partition(":")
    if text == "synthetic":
        spec: dict[str, Any] = {"kind": "synthetic"}
        if n is not None:
            spec["n"] = n
        if world_seed is not None:
            spec["world"] = {"seed": world_seed}
        return spec
    if n is not None or world_seed is not None:
        raise UserError(f"--eval-n and --world-seed apply to --eval synthetic only, not {text!r}")
    if sep and kind == "imagefolder":
        return {"kind": "imagefolder", "root": path}
    if sep and kind == "labels_csv":
        return {"kind": "labels_csv", "path": path}
    return text  # open_eval_set's shorthand: a labels .csv, a folder holding labels.csv, an image folder


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def summary_line(result: dict) -> str:
    m = result["metrics"]
    line = (f"{Path(result['checkpoint']).name} on {result['dataset']} (n={m['n']}): "
            f"acc1 {_percent(m['acc1'])}, acc5 {_percent(m['acc5'])}")
    if "asr1" in m:
        line += (f"; {result['trigger']['name']} -> {result['target']}: asr1 {_percent(m['asr1'])}, "
                 f"asr5 {_percent(m['asr5'])}, ra1 {_percent(m['ra1'])} (n_asr={m['n_asr']})")
    return line


def main(argv: list[str]) -> int:
    from clip_backdoor.attacks.triggers import get_trigger, parse_trigger_params
    from clip_backdoor.data.classification import open_eval_set
    from clip_backdoor.weights import model_from_checkpoint

    args = _parser().parse_args(argv)
    if (args.target is None) != (args.trigger is None):
        raise UserError("--target and --trigger go together (ASR needs both); give both or neither")
    if args.trigger_param and args.trigger is None:
        raise UserError("--trigger-param given without --trigger")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    trigger = (get_trigger(args.trigger, **parse_trigger_params(args.trigger_param))
               if args.trigger else None)

    spec = eval_spec(args.eval, n=args.eval_n, world_seed=args.world_seed)
    model, _ = model_from_checkpoint(args.checkpoint, device, model_name=args.model)
    eval_set = open_eval_set(spec, model.image_size)

    def build() -> torch.Tensor:
        return build_classifier(model, eval_set.classes, eval_set.templates,
                                context_length=model.context_length, device=device,
                                batch_size=args.batch_size, precision=args.precision)

    if args.no_cache:
        classifier = build()
    else:
        key = classifier_cache_key(args.checkpoint, eval_set.classes, eval_set.templates,
                                   context_length=model.context_length, precision=args.precision,
                                   model_name=args.model)
        cache_dir = Path(args.out).parent / ".classifier-cache" if args.out else None
        classifier = cached_classifier(key, build, cache_dir)

    metrics = evaluate_model(model, eval_set, target=args.target, trigger=trigger, seed=args.seed,
                             batch_size=args.batch_size, device=device, precision=args.precision,
                             workers=args.workers, classifier=classifier, progress=True)
    result = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.eval,
        "target": args.target,
        "trigger": {"name": trigger.name, "params": trigger.params} if trigger else None,
        "seed": args.seed,
        "metrics": metrics,
    }
    if args.out:
        from clip_backdoor.fileio import write_json

        write_json(args.out, result)
    print(summary_line(result))
    return 0
