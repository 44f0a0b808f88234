"""Labelled evaluation sets for zero-shot classification, and the class names and prompts they carry.

Every set has ``.classes`` (distinct names), ``.templates`` (prompts with ``{}`` for the name),
``__len__``, ``__getitem__(i) -> (uint8 [3, S, S] preprocessed to the model resolution, label)`` and
``views(i) -> (clean uint8 [3, S, S], uint8 [3, S, S] to trigger, label)``: clean images are resized
and centre-cropped, images that get the test-time trigger are squashed to S × S first, exactly as the
poisons were (and as the reference's ``apply_trigger`` does).
Three kinds, built directly or from a config spec by :func:`open_eval_set`:

- ``imagefolder``: ``root/<class_dir>/*.png|jpg|...``; class directories in sorted order, names from
  ``classnames.json`` next to them (a list in that order, or ``{"dir": "name"}``), else the
  directory names; prompts from ``templates.json``, else the 80 OpenAI ImageNet templates.
- ``labels_csv``: CleanCLIP's ``labels.csv`` with columns ``image,label`` (label = class index; image
  paths relative to the CSV); names from ``classnames.json`` next to it or the shipped ImageNet-1K
  list, prompts from ``templates.json`` next to it or the 80 ImageNet templates.
- ``synthetic``: the eval split of the synthetic world (no files).

Held-out selection needs two disjoint splits: a *test* split that reports and a *validation* split
that chooses (learning rate, epoch). :class:`EvalSplits` holds both in one dataset (test images first,
``val_from`` = the number of test images), so one pass through the model evaluates both. From a
spec: ``synthetic`` takes ``val_n`` images of the world's eval split from ``val_start`` (default: right
after the ``n`` test images); the file kinds take ``val_path`` (a second set of the same kind) or
``val_fraction`` (a seeded, per-class partition of the one set by ``split_seed``). Overlapping
splits are an error naming the key.

An evaluation set must be whole: an unreadable image is an error naming its path, never a skip, so
two evaluations of one checkpoint always see the same images.

The shipped ImageNet-1K names are OpenAI's curated list (as in open_clip), with its two duplicates
resolved ("projectile", "sunglass"), so all 1000 names are distinct; the reference code's label
file merged crane and maillot into 998 (REFERENCE.md, bug 8).
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clip_backdoor.data.transforms import preprocess, squash
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASSNAMES_FILE = "classnames.json"
TEMPLATES_FILE = "templates.json"


# --------------------------------------------------------------------------------------------
# Class names and prompt templates
# --------------------------------------------------------------------------------------------

@functools.cache
def _shipped(name: str) -> tuple[str, ...]:
    return tuple(json.loads((ASSETS / name).read_text(encoding="utf-8")))


def imagenet_classes() -> list[str]:
    """OpenAI's 1000 curated ImageNet-1K class names, in label order."""
    return list(_shipped("imagenet_classes.json"))


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates."""
    return list(_shipped("imagenet_templates.json"))


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def check_classes(classes: Any, where: str) -> list[str]:
    """A non-empty list of distinct, non-empty names, or a UserError saying which entry is wrong."""
    if not isinstance(classes, (list, tuple)) or not classes:
        raise UserError(f"{where}: the class list must be a non-empty list of names")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: class {i} is {name!r}, not a non-empty name")
        if name in seen:
            raise UserError(f"{where}: class name {name!r} appears twice (entries {seen[name]} and {i}); "
                            "two classes with one name cannot be told apart")
        seen[name] = i
    return list(classes)


def check_templates(templates: Any, where: str) -> list[str]:
    """A non-empty list of prompts, each with ``{}`` where the class name goes."""
    if not isinstance(templates, (list, tuple)) or not templates:
        raise UserError(f"{where}: the templates must be a non-empty list of prompts")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or "{}" not in template:
            raise UserError(f"{where}: template {i} ({template!r}) has no '{{}}' for the class name")
    return list(templates)


def _load_names(value: Any, folder: Path, filename: str, default, check, what: str) -> list[str]:
    """A list given as is or as a JSON path; else ``folder/filename``; else ``default()``; checked."""
    if value is None:
        if not (folder / filename).is_file():
            return default()
        value = folder / filename
    if isinstance(value, (str, os.PathLike)):
        return check(read_json(value, what), str(value))
    return check(list(value), what)


def load_templates(templates: str | os.PathLike | Sequence[str] | None, folder: Path) -> list[str]:
    """Templates given as a list or a JSON path; else ``folder/templates.json``; else ImageNet's 80."""
    return _load_names(templates, folder, TEMPLATES_FILE, imagenet_templates, check_templates, "templates")


def resolve_class(classes: Sequence[str], name: str | int) -> int:
    """The index of class ``name`` (exact, else case-insensitive); a UserError listing close matches."""
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name < len(classes):
            raise UserError(f"class index {name} is out of range for {len(classes)} classes")
        return name
    if name in classes:
        return list(classes).index(name)
    folded = [c.casefold() for c in classes]
    if str(name).casefold() in folded:
        return folded.index(str(name).casefold())
    close = difflib.get_close_matches(str(name), list(classes), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
    raise UserError(f"class {name!r} is not among the {len(classes)} eval classes{hint}")


# --------------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------------

def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for missing or corrupt files
        raise UserError(f"{path}: unreadable image in eval set ({type(e).__name__}: {e})") from None


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """Decode and preprocess one eval image; unreadable is an error: eval sets must be whole."""
    return preprocess(_decode(path), image_size)


def views_of(image: Image.Image | torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean view, view to trigger) of one eval image, both uint8 ``[3, S, S]``.

    The clean view is resized and centre-cropped; the view to trigger is *squashed* to S × S, the
    geometry the poisons were trained on (the reference's ``apply_trigger`` resizes to 224 × 224
    before pasting the patch, and its processor's crop is then a no-op).
    """
    return preprocess(image, image_size), squash(image, image_size)


class _FileSet(torch.utils.data.Dataset):
    """A list of (image path, label) read on demand."""

    classes: list[str]
    templates: list[str]

    def __init__(self, items: list[tuple[Path, int]], image_size: int):
        if image_size < 1:
            raise UserError(f"eval image_size={image_size}: must be positive")
        self.items, self.image_size = items, int(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return load_image(path, self.image_size), label

    def views(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(centre-cropped image, squashed image, label), decoding the file once."""
        path, label = self.items[index]
        return (*views_of(_decode(path), self.image_size), label)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def subset(self, positions: Sequence[int]) -> _FileSet:
        """The same set (classes, templates, resolution) restricted to these positions, in order."""
        part = _FileSet([self.items[i] for i in positions], self.image_size)
        part.classes, part.templates = self.classes, self.templates
        return part


class ImageFolderSet(_FileSet):
    """``root/<class_dir>/<image>``: one directory per class, labels in sorted directory order."""

    def __init__(self, root: str | os.PathLike, image_size: int, *,
                 classnames: str | os.PathLike | Sequence[str] | Mapping[str, str] | None = None,
                 templates: str | os.PathLike | Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder not found: {root}")
        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not dirs:
            raise UserError(f"{root}: no class directories (expected root/<class>/<image files>)")
        self.root = root
        self.classes = self._names(dirs, classnames)
        self.templates = load_templates(templates, root)
        items = []
        for label, d in enumerate(dirs):
            files = sorted(p for p in (root / d).iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
            if not files:
                log.warning("%s: class directory has no images", root / d)
            items += [(p, label) for p in files]
        if not items:
            raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class directories")
        super().__init__(items, image_size)

    def _names(self, dirs: list[str], classnames: Any) -> list[str]:
        where = str(classnames) if isinstance(classnames, (str, os.PathLike)) else f"{self.root} class names"
        if classnames is None and (self.root / CLASSNAMES_FILE).is_file():
            classnames = where = str(self.root / CLASSNAMES_FILE)
        if isinstance(classnames, (str, os.PathLike)):
            classnames = read_json(classnames, "class names")
        if classnames is None:
            return check_classes(dirs, where)
        if isinstance(classnames, Mapping):
            missing = [d for d in dirs if d not in classnames]
            if missing:
                raise UserError(f"{where}: no name for class directories {', '.join(missing[:5])}"
                                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
            return check_classes([classnames[d] for d in dirs], where)
        names = check_classes(classnames, where)
        if len(names) != len(dirs):
            raise UserError(f"{where}: {len(names)} class names for {len(dirs)} class directories in "
                            f"{self.root}; give one name per directory (sorted order) or a dict dir -> name")
        return names


class LabelsCsvSet(_FileSet):
    """CleanCLIP's ``labels.csv``: columns ``image`` (path relative to the CSV) and ``label`` (index)."""

    def __init__(self, csv_path: str | os.PathLike, image_size: int, *,
                 classes: str | os.PathLike | Sequence[str] | None = None,
                 templates: str | os.PathLike | Sequence[str] | None = None,
                 image_column: str = "image", label_column: str = "label"):
        csv_path = Path(csv_path)
        folder = csv_path.parent
        self.classes = self._classes(classes, folder)
        self.templates = load_templates(templates, folder)
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames or []
        except FileNotFoundError:
            raise UserError(f"labels CSV not found: {csv_path}") from None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{csv_path}: cannot read labels CSV ({e})") from None
        if not rows:
            raise UserError(f"{csv_path}: no rows")
        for column in (image_column, label_column):
            if column not in header:
                raise UserError(f"{csv_path}: no column {column!r} (columns: {', '.join(header)})")
        items = []
        for row_number, row in enumerate(rows, start=2):  # line 1 is the header
            text = (row[label_column] or "").strip()
            try:
                label = int(text)
            except ValueError:
                raise UserError(f"{csv_path}, row {row_number}: label {text!r} is not a class index") \
                    from None
            if not 0 <= label < len(self.classes):
                raise UserError(f"{csv_path}, row {row_number}: label {label} is out of range for "
                                f"{len(self.classes)} classes")
            image = (row[image_column] or "").strip()
            if not image:
                raise UserError(f"{csv_path}, row {row_number}: empty image path")
            items.append((folder / image, label))
        self.csv_path = csv_path
        super().__init__(items, image_size)

    @staticmethod
    def _classes(classes: Any, folder: Path) -> list[str]:
        return _load_names(classes, folder, CLASSNAMES_FILE, imagenet_classes, check_classes, "class names")


class SyntheticEvalSet(torch.utils.data.Dataset):
    """``n`` images of the world's eval split from index ``start`` (classes cycle, so n images from a
    multiple of C give every class n/C)."""

    def __init__(self, world: Any, n: int, image_size: int | None = None, start: int = 0):
        if n < 1:
            raise UserError(f"synthetic eval set: n={n}, need at least 1 image")
        if start < 0:
            raise UserError(f"synthetic eval set: start={start} must be >= 0")
        self.world, self.n, self.start = world, int(n), int(start)
        self.image_size = int(image_size or world.image_size)
        self.classes = check_classes(list(world.classes), "synthetic world")
        self.templates = check_templates(list(world.templates), "synthetic world")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic eval index {index} out of range for {self.n} images")
        image, label = self.world.eval_pair(self.start + index)
        if image.shape[-1] != self.image_size:
            image = preprocess(image, self.image_size)
        return image, label

    def views(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(clean, to-trigger, label): the world renders squares, so both are the same image unless
        it is rendered at another size than the model's."""
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic eval index {index} out of range for {self.n} images")
        image, label = self.world.eval_pair(self.start + index)
        if image.shape[-1] == self.image_size:
            return image, image, label
        return (*views_of(image, self.image_size), label)


class EvalSplits(torch.utils.data.Dataset):
    """A test split and a validation split as one dataset: positions ``[0, val_from)`` are the test
    images, ``[val_from, len)`` the validation images (evaluated in the same pass, counted apart)."""

    def __init__(self, test: Any, validation: Any):
        if list(validation.classes) != list(test.classes):
            raise UserError("eval.val_path: the validation set's classes differ from the test set's "
                            f"({len(validation.classes)} vs {len(test.classes)} classes, or another order)")
        self.test, self.validation = test, validation
        self.classes, self.templates = test.classes, test.templates
        self.val_from = len(test)

    def __len__(self) -> int:
        return self.val_from + len(self.validation)

    def _part(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"eval index {index} out of range for {len(self)} images")
        return (self.test, index) if index < self.val_from else (self.validation, index - self.val_from)

    def __getitem__(self, index: int):
        part, i = self._part(index)
        return part[i]

    def views(self, index: int):
        part, i = self._part(index)
        views = getattr(part, "views", None)
        if views is not None:
            return views(i)
        image, label = part[i]
        return image, image, label


def split_positions(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(test, validation) positions: per class, a seeded shuffle of its images gives round(fraction ×
    count) of them to validation, so both splits keep the class balance. Pure in (labels, fraction,
    seed); each list in the original order."""
    import random

    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    validation: set[int] = set()
    for label in sorted(by_class):
        positions = by_class[label]
        random.Random(f"eval-split|{seed}|{label}").shuffle(positions)
        validation.update(positions[:round(fraction * len(positions))])
    test = [p for p in range(len(labels)) if p not in validation]
    return test, sorted(validation)


def check_synthetic_splits(n: int, val_n: int, val_start: int | None) -> int:
    """The validation split's first index; an overlap with the test images [0, n) names the key."""
    start = n if val_start is None else val_start
    if val_n and start < n:
        raise UserError(f"eval.val_start: validation images [{start}, {start + val_n}) overlap the test "
                        f"images [0, {n}); choose val_start >= {n} (eval.n)")
    return start


def with_validation(test: Any, *, val_set: Any = None, val_fraction: float | None = None,
                    split_seed: int = 0) -> Any:
    """``test`` alone, or :class:`EvalSplits` of (test, validation) from a second set or a partition."""
    if val_set is not None and val_fraction is not None:
        raise UserError("eval.val_fraction: give a validation set (val_path) or a fraction, not both")
    if val_fraction is not None:
        if not 0 < val_fraction < 1:
            raise UserError(f"eval.val_fraction: {val_fraction!r} must lie strictly between 0 and 1")
        test_positions, val_positions = split_positions(test.labels, val_fraction, split_seed)
        if not test_positions or not val_positions:
            raise UserError(f"eval.val_fraction: {val_fraction!r} of {len(test)} images leaves one split "
                            "empty")
        return EvalSplits(test.subset(test_positions), test.subset(val_positions))
    if val_set is None:
        return test
    shared = sorted({str(p.resolve()) for p, _ in test.items} & {str(p.resolve()) for p, _ in val_set.items})
    if shared:
        raise UserError(f"eval.val_path: {len(shared)} of its images are also in the test set (e.g. "
                        f"{shared[0]}); the validation and test splits must be disjoint")
    return EvalSplits(test, val_set)


# --------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------

def _synthetic(image_size: int, n: int = 1000, world: Mapping | None = None, val_n: int = 0,
               val_start: int | None = None) -> SyntheticEvalSet | EvalSplits:
    from clip_backdoor.data.world import World

    options = dict(world or {})
    options.setdefault("image_size", image_size)
    start = check_synthetic_splits(n, val_n, val_start)
    the_world = World(**options)
    test = SyntheticEvalSet(the_world, n, image_size)
    return EvalSplits(test, SyntheticEvalSet(the_world, val_n, image_size, start)) if val_n else test


_SPLIT_OPTIONS = ("val_path", "val_fraction", "split_seed")


def _imagefolder(image_size: int, root: str, classnames: Any = None, templates: Any = None,
                 val_path: str | None = None, val_fraction: float | None = None,
                 split_seed: int = 0) -> ImageFolderSet | EvalSplits:
    test = ImageFolderSet(root, image_size, classnames=classnames, templates=templates)
    val = (ImageFolderSet(val_path, image_size, classnames=classnames, templates=templates)
           if val_path else None)
    return with_validation(test, val_set=val, val_fraction=val_fraction, split_seed=split_seed)


def _labels_csv(image_size: int, path: str, classes: Any = None, templates: Any = None,
                image_column: str = "image", label_column: str = "label", val_path: str | None = None,
                val_fraction: float | None = None, split_seed: int = 0) -> LabelsCsvSet | EvalSplits:
    def one(csv_path: str) -> LabelsCsvSet:
        return LabelsCsvSet(csv_path, image_size, classes=classes, templates=templates,
                            image_column=image_column, label_column=label_column)

    return with_validation(one(path), val_set=one(val_path) if val_path else None, val_fraction=val_fraction,
                           split_seed=split_seed)


EVAL_KINDS = {  # {"n": 1000, "world": {"seed": 0, ...}, "val_n": 1000}
    "synthetic": (_synthetic, ("n", "world", "val_n", "val_start")),
    "imagefolder": (_imagefolder, ("root", "classnames", "templates", *_SPLIT_OPTIONS)),
    "labels_csv": (_labels_csv, ("path", "classes", "templates", "image_column", "label_column",
                                 *_SPLIT_OPTIONS)),
}


def open_eval_set(spec: Mapping | str | os.PathLike, image_size: int):
    """An eval set from ``{"kind": "synthetic" | "imagefolder" | "labels_csv", **options}``.

    A plain string is shorthand: ``"synthetic"``, a ``.csv`` file, a folder holding ``labels.csv``,
    or an image folder.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = _spec_from_string(str(spec))
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in EVAL_KINDS:
        raise UserError(f"eval set kind {kind!r}: choose from {', '.join(EVAL_KINDS)}")
    factory, accepted = EVAL_KINDS[kind]
    unknown = sorted(set(spec) - set(accepted))
    if unknown:
        raise UserError(f"eval set {kind!r}: unknown option(s) {', '.join(unknown)} "
                        f"(accepted: {', '.join(accepted)})")
    required = {"imagefolder": "root", "labels_csv": "path"}.get(kind)
    if required and required not in spec:
        raise UserError(f"eval set {kind!r}: missing option {required!r}")
    return factory(image_size, **spec)


def _spec_from_string(text: str) -> dict:
    if text == "synthetic":
        return {"kind": "synthetic"}
    path = Path(text)
    if path.suffix.lower() == ".csv":
        return {"kind": "labels_csv", "path": text}
    if (path / "labels.csv").is_file():
        return {"kind": "labels_csv", "path": str(path / "labels.csv")}
    if path.is_dir():
        return {"kind": "imagefolder", "root": text}
    raise UserError(f"eval set {text!r}: not 'synthetic', a labels .csv, or an existing image folder")


__all__ = ["ImageFolderSet", "LabelsCsvSet", "SyntheticEvalSet", "EvalSplits", "open_eval_set",
           "resolve_class", "imagenet_classes", "imagenet_templates", "check_classes", "check_templates",
           "load_templates", "load_image", "views_of", "EVAL_KINDS", "split_positions", "with_validation"]
