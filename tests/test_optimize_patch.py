"""BadCLIP's optimised patch: the loss against naive formulas, the geometry shared with the badclip
trigger, seeded resume, the command line and data-only poisoning with the result."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_backdoor.attacks import optimize_patch as O
from clip_backdoor.attacks.manifest import read_manifest
from clip_backdoor.attacks.triggers import get_trigger, load_patch, save_patch, trigger_image
from clip_backdoor.cli import main as cli
from clip_backdoor.data.transforms import to_tensor_uint8
from clip_backdoor.models import create_model

SIZE = 32
WORLD = ["--num-samples", "600"]


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    model = create_model("tiny", seed=0)
    path = tmp_path_factory.mktemp("sur") / "surrogate.pt"
    torch.save({"model": {"name": "tiny", **model.config}, "state_dict": model.state_dict()}, path)
    return path


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_loss_is_infonce_plus_weighted_triplet_naively():
    p, t, q, n = unit(5, 8, seed=0), unit(5, 8, seed=1), unit(5, 8, seed=2), unit(5, 8, seed=3)
    out = O.badclip_loss(p, t, q, n, 7.0, triplet_weight=500.0, margin=1.0)
    logits = 7.0 * p @ t.T
    ce = lambda z: sum(torch.logsumexp(z[i], 0) - z[i, i] for i in range(5)) / 5  # noqa: E731
    nce = (ce(logits) + ce(logits.T)) / 2
    eps = 1e-6
    trip = sum(max(0.0, float((p[i] - q[i] + eps).norm() - (p[i] - n[i] + eps).norm() + 1.0))
               for i in range(5)) / 5
    assert out["loss_nce"].item() == pytest.approx(nce.item())
    assert out["loss_triplet"].item() == pytest.approx(trip)
    assert out["loss"].item() == pytest.approx(nce.item() + 500 * trip)
    # the reference's aliasing: the negative is the patched embedding itself -> d(a, p) + margin
    alias = O.badclip_loss(p, t, q, p.detach(), 7.0, triplet_weight=1.0, margin=1.0)["loss_triplet"]
    assert alias.item() == pytest.approx(float(sum((p[i] - q[i] + eps).norm() for i in range(5)) / 5 + 1.0
                                               - 8 ** 0.5 * eps), abs=1e-9)


def test_paste_is_where_the_badclip_trigger_pastes(tmp_path):
    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = save_patch(patch, tmp_path / "p.png", image_size=SIZE)
    quantised, _ = load_patch(path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for location in ("center", "corner"):
        ours = O.paste(images, quantised, location, torch.Generator())
        trigger = get_trigger("badclip", patch=str(path), location=location)
        assert torch.equal(ours, trigger(images, torch.Generator()))
    # values outside [0, 1] are clipped where pasted, and get no gradient there (the reference's clip)
    raw = torch.full((3, 4, 4), 1.5, requires_grad=True)
    O.paste(images, raw, "center", torch.Generator()).sum().backward()
    assert torch.equal(raw.grad, torch.zeros_like(raw))


def test_optimisation_lowers_the_loss_and_touches_only_the_patch(surrogate):
    from clip_backdoor.attacks.poison import open_source
    from clip_backdoor.weights import model_from_checkpoint

    model, _ = model_from_checkpoint(surrogate)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = O.PatchSettings(patch_size=8, epochs=3, batch_size=32, aug_prob=0.0, seed=1)
    source = open_source({"kind": "synthetic", "num_samples": 600, "world": {"seed": 0, "image_size": SIZE}})
    data = O.collect(source, SIZE, settings)
    assert len(data.images) + len(data.target_images) == 600 and len(data.target_images) > 10
    assert all("banana" in c.lower() for c in data.captions)
    patch, history = O.optimize_patch(model, data, settings)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert patch.min() >= 0 and patch.max() <= 1 and patch.shape == (3, 8, 8)
    assert not torch.equal(patch, O.initial_patch(8, "random", 1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_equals_an_uninterrupted_run(surrogate, tmp_path):
    from clip_backdoor.attacks.poison import open_source
    from clip_backdoor.weights import model_from_checkpoint

    source = {"kind": "synthetic", "num_samples": 400, "world": {"seed": 0, "image_size": SIZE}}
    settings = O.PatchSettings(patch_size=6, epochs=2, batch_size=32, aug_prob=0.5, seed=2)
    data = O.collect(open_source(source), SIZE, settings)
    full, hist_full = O.optimize_patch(model_from_checkpoint(surrogate)[0], data, settings,
                                       state_path=tmp_path / "a.state.pt")
    one = O.PatchSettings(**{**settings.__dict__, "epochs": 1})
    O.optimize_patch(model_from_checkpoint(surrogate)[0], data, one, state_path=tmp_path / "b.state.pt")
    resumed, hist = O.optimize_patch(model_from_checkpoint(surrogate)[0], data, settings,
                                     state_path=tmp_path / "b.state.pt")
    assert torch.equal(full, resumed)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(hist) == strip(hist_full)
    other = O.PatchSettings(**{**settings.__dict__, "lr": 1e-2})
    with pytest.raises(Exception, match="another optimize-patch setting"):
        O.optimize_patch(model_from_checkpoint(surrogate)[0], data, other, state_path=tmp_path / "b.state.pt")


def test_command_line_then_data_only_poisoning(surrogate, tmp_path, capsys):
    out = tmp_path / "patch.png"
    assert cli(["poison", "optimize-patch", "--checkpoint", str(surrogate), "--out", str(out), *WORLD,
                "--patch-size", "8", "--epochs", "1", "--batch-size", "32"]) == 0
    patch, optimised_at = load_patch(out)
    assert optimised_at == SIZE and patch.shape == (3, 8, 8)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["triplet_weight"] == 500.0 and meta["image_size"] == SIZE
    assert len(meta["history"]) == 1 and len(meta["surrogate_sha256"]) == 64

    poisoned = tmp_path / "poisoned"
    assert cli(["poison", *WORLD, "--image-size", str(SIZE), "--n", "5", "--trigger", "badclip",
                "--trigger-param", f"patch={out}", "--out", str(poisoned)]) == 0
    rows = [r for r in read_manifest(poisoned / "manifest.csv") if r.is_poison]
    assert len(rows) == 5 and json.loads(rows[0].trigger_params)["patch"] == str(out.resolve())
    stored = to_tensor_uint8(Image.open(poisoned / "images" / f"{rows[0].row_id}.png"))
    assert torch.equal(stored[:, 12:20, 12:20], (patch * 255).round().to(torch.uint8))
    trigger = get_trigger("badclip", patch=str(out))
    blank = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    assert torch.equal(trigger_image(blank, trigger, SIZE, torch.Generator())[:, 12:20, 12:20],
                       stored[:, 12:20, 12:20])


def test_bad_input_is_one_line_exit_2(surrogate, tmp_path, capsys):
    def error(argv):
        code = cli(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    base = ["poison", "optimize-patch", "--checkpoint", str(surrogate), "--out", str(tmp_path / "p.png"),
            *WORLD]
    assert "the surrogate works at 32 px, the poisoning resolution is 64 px" in error([*base, "--image-size",
                                                                                       "64"])
    assert "no caption of the source names 'zebra-unicorn'" in error([*base, "--target", "zebra-unicorn"])
    assert "--patch-size 40 is larger than the 32 px images" in error([*base, "--patch-size", "40",
                                                                        "--epochs", "1"])
    # a patch learned at 32 px cannot poison 64 px images
    save_patch(torch.rand(3, 4, 4), tmp_path / "p32.png", image_size=32)
    assert "optimised for 32 px images, these are 64x64" in error(
        ["poison", *WORLD, "--image-size", "64", "--n", "2", "--trigger", "badclip", "--trigger-param",
         f"patch={tmp_path / 'p32.png'}", "--out", str(tmp_path / "x")])
    torch.save(torch.rand(3, 4, 6), tmp_path / "bad.pt")
    assert "expected a square RGB patch" in error(
        ["poison", *WORLD, "--n", "2", "--trigger", "badclip", "--trigger-param",
         f"patch={tmp_path / 'bad.pt'}", "--out", str(tmp_path / "y")])
    assert "unknown trigger 'stripes'" in error(["poison", *WORLD, "--trigger", "stripes", "--out",
                                                 str(tmp_path / "z")])


@pytest.mark.parametrize("negative", ["clean", "patched"])
def test_each_step_pairs_patched_images_with_their_captions_and_clean_negatives(surrogate, monkeypatch,
                                                                               negative):
    from clip_backdoor.attacks.poison import open_source
    from clip_backdoor.data.transforms import normalize
    from clip_backdoor.tokenizer import tokenize
    from clip_backdoor.weights import model_from_checkpoint

    model, _ = model_from_checkpoint(surrogate)
    settings = O.PatchSettings(patch_size=6, epochs=1, batch_size=16, aug_prob=0.0, seed=4, negative=negative)
    source = {"kind": "synthetic", "num_samples": 200, "world": {"seed": 0, "image_size": SIZE}}
    data = O.collect(open_source(source), SIZE, settings)
    seen = []
    real = O.badclip_loss
    monkeypatch.setattr(O, "badclip_loss", lambda *a, **k: seen.append(a) or real(*a, **k))
    O.optimize_patch(model, data, settings)
    patched, texts, positives, negatives, scale = seen[0]
    idx = torch.randperm(len(data.images), generator=O._step_generator(4, 1, -1))[:16]
    with torch.no_grad():
        embed = lambda x: F.normalize(model.encode_image(normalize(x)), dim=-1)  # noqa: E731
        clean = embed(data.images[idx].float() / 255)
        start = O.initial_patch(6, "random", 4)
        torch.testing.assert_close(patched, embed(O.paste(data.images[idx].float() / 255, start, "center",
                                                          torch.Generator())))
        captions = [data.captions[i] for i in idx.tolist()]
        torch.testing.assert_close(texts, F.normalize(model.encode_text(tokenize(captions, 16)), dim=-1))
        targets = F.normalize(model.encode_image(normalize(data.target_images.float() / 255)), dim=-1)
    torch.testing.assert_close(negatives, clean if negative == "clean" else patched)
    assert all(any(torch.allclose(p, t) for t in targets) for p in positives)
    assert scale == pytest.approx(model.logit_scale.exp().item())
