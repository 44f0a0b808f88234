"""Evaluation sets: shipped ImageNet metadata, ImageFolder, labels.csv, synthetic, the factory, errors."""

import json

import pytest
import torch
from PIL import Image

from clip_backdoor.data.classification import (
    ImageFolderSet,
    LabelsCsvSet,
    SyntheticEvalSet,
    check_classes,
    imagenet_classes,
    imagenet_templates,
    open_eval_set,
    resolve_class,
)
from clip_backdoor.data.world import World
from clip_backdoor.errors import UserError

RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)


def _save(path, colour, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    """root/<dir>/*.png with one solid colour per class; directory names deliberately unsorted on disk."""
    root = tmp_path / "folder"
    for d, colour, n in (("n02", GREEN, 2), ("n01", RED, 3), ("n03", BLUE, 1)):
        for i in range(n):
            _save(root / d / f"{i}.png", colour, size=(40 + i, 30))
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


# ---- shipped metadata ---------------------------------------------------------------------------

def test_imagenet_metadata_is_complete_and_distinct():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len(set(classes)) == 1000  # the reference had 998 (bug 8)
    assert classes[954] == "banana"
    assert {"crane bird", "construction crane", "tights", "one-piece bathing suit"} <= set(classes)
    templates = imagenet_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert "a photo of a {}." in templates


# ---- ImageFolder --------------------------------------------------------------------------------

def test_image_folder_labels_sorted_dirs_and_preprocesses(folder):
    (folder / "classnames.json").write_text(json.dumps(["red thing", "green thing", "blue thing"]))
    (folder / "templates.json").write_text(json.dumps(["a {}.", "art of the {}."]))
    ds = ImageFolderSet(folder, 16)
    assert ds.classes == ["red thing", "green thing", "blue thing"]
    assert ds.templates == ["a {}.", "art of the {}."]
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 2]
    for i, colour in ((0, RED), (3, GREEN), (5, BLUE)):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert torch.equal(image, torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))


def test_image_folder_centre_crops(tmp_path):
    # 64x32 image whose outer quarters are blue: resize keeps 64x32 -> the centre crop has no blue.
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (0, 0, 16, 32))
    img.paste(BLUE, (48, 0, 64, 32))
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "x.png")
    image, _ = ImageFolderSet(tmp_path, 32)[0]
    assert image.shape == (3, 32, 32) and int(image[2].max()) == RED[2]


def test_image_folder_names_from_dict_dirs_or_defaults(folder):
    mapping = {"n01": "apple", "n02": "pear", "n03": "plum", "n99": "unused"}
    assert ImageFolderSet(folder, 8, classnames=mapping).classes == ["apple", "pear", "plum"]
    (folder / "classnames.json").write_text(json.dumps(mapping))
    ds = ImageFolderSet(folder, 8)
    assert ds.classes == ["apple", "pear", "plum"]
    assert ds.templates == imagenet_templates()  # no templates.json
    (folder / "classnames.json").unlink()
    assert ImageFolderSet(folder, 8).classes == ["n01", "n02", "n03"]


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(UserError, match="no name for class directories n03"):
        ImageFolderSet(folder, 8, classnames={"n01": "a", "n02": "b"})
    with pytest.raises(UserError, match="2 class names for 3 class directories"):
        ImageFolderSet(folder, 8, classnames=["a", "b"])
    with pytest.raises(UserError, match="template 1 .* has no"):
        ImageFolderSet(folder, 8, templates=["a {}.", "a photo"])
    (folder / "templates.json").write_text("[not json")
    with pytest.raises(UserError, match="templates.json: cannot read templates"):
        ImageFolderSet(folder, 8)
    with pytest.raises(UserError, match="not found"):
        ImageFolderSet(tmp_path / "missing", 8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageFolderSet(tmp_path / "empty", 8)


def test_unreadable_image_is_an_error_naming_the_file(folder):
    bad = folder / "n03" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = ImageFolderSet(folder, 8)
    index = [str(p) for p, _ in ds.items].index(str(bad))
    with pytest.raises(UserError, match="broken.png: unreadable image"):
        ds[index]


# ---- labels.csv ---------------------------------------------------------------------------------

def _labels_csv(root, rows, header="image,label"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "labels.csv"


def test_labels_csv_with_local_names(tmp_path):
    root = tmp_path / "val"
    _save(root / "images" / "a.png", RED)
    _save(root / "images" / "b.png", BLUE)
    csv_path = _labels_csv(root, ["images/a.png,1", "images/b.png,0"])
    (root / "classnames.json").write_text(json.dumps(["blue", "red"]))
    ds = LabelsCsvSet(csv_path, 8, templates=["a {} image."])
    assert ds.classes == ["blue", "red"] and ds.templates == ["a {} image."]
    assert len(ds) == 2 and [ds[0][1], ds[1][1]] == [1, 0]
    assert ds[0][0].shape == (3, 8, 8) and int(ds[0][0][0, 0, 0]) == RED[0]


def test_labels_csv_defaults_to_imagenet(tmp_path):
    root = tmp_path / "imagenet"
    _save(root / "x.jpg", GREEN)
    ds = LabelsCsvSet(_labels_csv(root, ["x.jpg,954"]), 8)
    assert len(ds.classes) == 1000 and ds.classes[ds[0][1]] == "banana"
    assert len(ds.templates) == 80


def test_labels_csv_errors(tmp_path):
    root = tmp_path / "bad"
    _save(root / "a.png", RED)
    with pytest.raises(UserError, match=r"row 3: label 5 is out of range for 2 classes"):
        LabelsCsvSet(_labels_csv(root, ["a.png,0", "a.png,5"]), 8, classes=["x", "y"])
    with pytest.raises(UserError, match=r"row 2: label 'cat' is not a class index"):
        LabelsCsvSet(_labels_csv(root, ["a.png,cat"]), 8, classes=["x", "y"])
    with pytest.raises(UserError, match="no column 'label'"):
        LabelsCsvSet(_labels_csv(root, ["a.png,0"], header="image,target"), 8, classes=["x"])
    with pytest.raises(UserError, match="not found"):
        LabelsCsvSet(root / "nope.csv", 8)
    with pytest.raises(UserError, match="appears twice"):
        LabelsCsvSet(_labels_csv(root, ["a.png,0"]), 8, classes=["x", "x"])
    ds = LabelsCsvSet(_labels_csv(root, ["missing.png,0"]), 8, classes=["x"])
    with pytest.raises(UserError, match="missing.png: unreadable image"):
        ds[0]


# ---- synthetic ----------------------------------------------------------------------------------

def test_synthetic_eval_set_is_the_world_eval_split():
    world = World(seed=2)
    ds = SyntheticEvalSet(world, 12)
    assert len(ds) == 12 and ds.classes == world.classes and ds.templates == world.templates
    image, label = ds[11]
    assert torch.equal(image, world.eval_pair(11)[0]) and label == 11 % 10
    assert SyntheticEvalSet(world, 3, image_size=24)[0][0].shape == (3, 24, 24)
    with pytest.raises(IndexError):
        ds[12]


# ---- factory and class lookup -------------------------------------------------------------------

def test_open_eval_set_specs(tmp_path, folder):
    synthetic = open_eval_set({"kind": "synthetic", "n": 5, "world": {"seed": 1}}, 32)
    assert len(synthetic) == 5 and torch.equal(synthetic[4][0], World(seed=1).eval_pair(4)[0])
    assert len(open_eval_set("synthetic", 32)) == 1000
    assert isinstance(open_eval_set(str(folder), 8), ImageFolderSet)
    assert isinstance(open_eval_set({"kind": "imagefolder", "root": str(folder)}, 8), ImageFolderSet)
    root = tmp_path / "val"
    _save(root / "a.png", RED)
    csv_path = _labels_csv(root, ["a.png,0"])
    assert isinstance(open_eval_set(str(root), 8), LabelsCsvSet)
    assert isinstance(open_eval_set(str(csv_path), 8), LabelsCsvSet)
    ds = open_eval_set({"kind": "labels_csv", "path": str(csv_path), "classes": ["only"]}, 8)
    assert ds.classes == ["only"]
    with pytest.raises(UserError, match="choose from"):
        open_eval_set({"kind": "imagenet"}, 8)
    with pytest.raises(UserError, match="unknown option.*classnames"):
        open_eval_set({"kind": "labels_csv", "path": str(csv_path), "classnames": ["x"]}, 8)
    with pytest.raises(UserError, match="missing option 'root'"):
        open_eval_set({"kind": "imagefolder"}, 8)
    with pytest.raises(UserError, match="not 'synthetic'"):
        open_eval_set(str(tmp_path / "nowhere"), 8)


def test_resolve_class():
    classes = imagenet_classes()
    assert resolve_class(classes, "banana") == 954
    assert resolve_class(classes, "BANANA") == 954
    assert resolve_class(["a", "b"], 1) == 1
    with pytest.raises(UserError, match="'bananna' is not among the 1000 eval classes; close matches: 'ban"):
        resolve_class(classes, "bananna")
    with pytest.raises(UserError, match="out of range"):
        resolve_class(["a", "b"], 2)


def test_check_classes():
    with pytest.raises(UserError, match="non-empty list"):
        check_classes([], "x.json")
    with pytest.raises(UserError, match="x.json: class 1 is ''"):
        check_classes(["a", ""], "x.json")
