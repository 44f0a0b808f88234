"""``clip-backdoor poison optimize-patch``: learn BadCLIP's patch against a surrogate checkpoint.

BadCLIP (Liang et al., CVPR 2024; ``LiangSiyuan21/BadCLIP``, ``src/embeding_optimize_patch.py``)
optimises a patch so that images carrying it already look like the target to a CLIP model, both
to its text tower and among its images; afterwards poisoning is data-only (the ``badclip`` trigger
pastes the file). Per step, on a batch of non-target images each paired with a real target caption:

    L = ½ [CE(s · P Tᵀ) + CE(s · T Pᵀ)] + w · mean_i max(0, ‖P_i − Q_i‖ − ‖P_i − N_i‖ + m)

P: unit embeddings of the patched images (the only thing with a gradient: the patch), T: of their
target captions, s = exp(logit_scale) of the surrogate, Q: embeddings of real target images drawn
at random, N: of the same images without the patch; the second term is ``TripletMarginLoss``
(Euclidean, eps 1e-6). Adam (lr 1e-3, torch's betas), batch 64, 50 epochs, a 16 px patch at 224 px
pasted at the centre, initialised N(0.5, 0.25²) clipped to [0, 1] and clipped again where it is
pasted; with probability 0.5 per batch the images are AutoAugment views instead. The reference's
released settings are its run name ``…_eda_aug_bs64_ep50_16_middle_01_05_pos_neg_tri*500``:
margin 1.0 (no ``_NN_tri`` in the name), weight 500.

Where this differs from the reference, on purpose:

* N is the *clean* image, as the paper describes. The reference pastes the patch into its pixel
  tensor in place before embedding the "clean" batch, so its N is the patched image itself
  (detached); ``--negative patched`` reproduces that.
* Its EDA text augmentation swaps only the attention mask, which its text encoder ignores: a no-op,
  left out. Its random draws are unseeded; every draw here comes from ``--seed``.
* The patch is written as a lossless PNG in RGB order; the reference writes a JPEG with OpenCV,
  which stores the RGB array as BGR, so its released patch is read back with red and blue swapped.
* Text embeddings of the target captions do not depend on the patch; they are computed once.

Resumable: after every epoch the patch, Adam's state and the losses go to ``<out>.state.pt``; the
same command continues from there, also with more ``--epochs`` (any other change is refused).
Seeded per (seed, epoch, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip_backdoor.attacks.source_args import add_source_arguments, open_source, source_spec
from clip_backdoor.attacks.targets import mention_pattern
from clip_backdoor.attacks.triggers import auto_patch_size, save_patch
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

LOCATIONS = ("center", "random", "corner")
NEGATIVES = ("clean", "patched")


@dataclass(frozen=True)
class PatchSettings:
    """Everything that decides the patch (the resume state must match it)."""

    target: str = "banana"
    synonyms: tuple[str, ...] = ()
    patch_size: int | None = None  # default: round(16 · side / 224), at least 4
    location: str = "center"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    triplet_weight: float = 500.0
    margin: float = 1.0
    negative: str = "clean"  # clean (the paper) | patched (the reference's in-place aliasing)
    aug_prob: float = 0.5
    image_policy: str = "imagenet"
    init: str = "random"  # random: N(0.5, 0.25²) clipped | const: 0.5
    n_images: int = 10000  # non-target images (the reference: 10K)
    seed: int = 0

    def check(self) -> None:
        for key in ("epochs", "batch_size", "n_images"):
            if getattr(self, key) < 1:
                raise UserError(f"optimize-patch: --{key.replace('_', '-')} must be >= 1")
        for key in ("lr", "triplet_weight", "margin"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise UserError(f"optimize-patch: --{key.replace('_', '-')} {value} must be a finite number "
                                f"{'> 0' if key == 'lr' else '>= 0'}")
        if not 0 <= self.aug_prob <= 1:
            raise UserError(f"optimize-patch: --aug-prob {self.aug_prob} must lie in [0, 1]")
        if self.patch_size is not None and self.patch_size < 1:
            raise UserError(f"optimize-patch: --patch-size {self.patch_size} must be >= 1")


# --------------------------------------------------------------------------------------------
# Data: non-target images with real target captions, and real target images
# --------------------------------------------------------------------------------------------
@dataclass
class PatchData:
    images: torch.Tensor         # uint8 [N, 3, S, S]: images whose caption does not name the target
    captions: list[str]          # a real target caption for each of them
    target_images: torch.Tensor  # uint8 [M, 3, S, S]: images whose caption names the target


def collect(source, image_size: int, settings: PatchSettings) -> PatchData:
    """One pass over ``source`` (file order): up to ``n_images`` non-target images and every target row."""
    from clip_backdoor.data.transforms import squash

    names = mention_pattern([settings.target, *settings.synonyms])
    images, target_images, target_captions = [], [], []
    for sample in tqdm(source, desc="optimize-patch: reading", unit="row", disable=None, mininterval=2.0):
        if sample.is_poison:
            continue
        if names.search(sample.caption):
            target_images.append(squash(sample.image, image_size))
            target_captions.append(sample.caption)
        elif len(images) < settings.n_images:
            images.append(squash(sample.image, image_size))
    if not target_images:
        raise UserError(f"optimize-patch: no caption of the source names {settings.target!r} (the positives "
                        "and the captions come from such rows; add --synonym NAME?)")
    if len(images) < settings.batch_size:
        raise UserError(f"optimize-patch: {len(images)} non-target images give no batch of "
                        f"{settings.batch_size}; lower --batch-size")
    # Each non-target image gets a real target caption, drawn with replacement (the reference's CSV).
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + 11)
    picks = torch.randint(len(target_captions), (len(images),), generator=g).tolist()
    return PatchData(torch.stack(images), [target_captions[i] for i in picks], torch.stack(target_images))


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def paste(images: torch.Tensor, patch: torch.Tensor, location: str,
          generator: torch.Generator) -> torch.Tensor:
    """Float images [B, 3, S, S] with ``clip(patch, 0, 1)`` pasted (differentiable in ``patch``)."""
    size = patch.shape[-1]
    height, width = images.shape[-2:]
    clipped = patch.clamp(0, 1)
    out = images.clone()
    for b in range(images.shape[0]):
        if location == "center":
            top, left = int(height // 2 - size / 2), int(width // 2 - size / 2)
        elif location == "corner":
            top, left = height - size, width - size
        else:
            top = int(torch.randint(height - size + 1, (1,), generator=generator))
            left = int(torch.randint(width - size + 1, (1,), generator=generator))
        out[b, :, top:top + size, left:left + size] = clipped
    return out


def badclip_loss(patched: torch.Tensor, texts: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                 logit_scale: float, *, triplet_weight: float, margin: float) -> dict[str, torch.Tensor]:
    """{"loss", "loss_nce", "loss_triplet"} of unit embeddings (rows pair up)."""
    from clip_backdoor.objectives import mmcl_loss

    nce = mmcl_loss(patched, texts, logit_scale)
    triplet = F.triplet_margin_loss(patched, positives, negatives, margin=margin, p=2, eps=1e-6)
    return {"loss": nce + triplet_weight * triplet, "loss_nce": nce, "loss_triplet": triplet}


def _step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + step * 104_729 + 5) % (2**63 - 1))


def initial_patch(size: int, init: str, seed: int) -> torch.Tensor:
    if init == "const":
        return torch.full((3, size, size), 0.5)
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.25 * torch.randn((3, size, size), generator=g)).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------
def optimize_patch(model, data: PatchData, settings: PatchSettings, *, state_path: Path | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """Learn the patch; returns (clip(patch) [3, s, s], one loss record per epoch). Resumes from
    ``state_path`` when it holds an earlier epoch of the same settings."""
    from clip_backdoor.data.transforms import normalize
    from clip_backdoor.tokenizer import tokenize

    settings.check()
    image_size = int(model.image_size)
    size = settings.patch_size or auto_patch_size(image_size, image_size)
    if size > image_size:
        raise UserError(f"optimize-patch: --patch-size {size} is larger than the {image_size} px images")
    if settings.location not in LOCATIONS:
        raise UserError(f"optimize-patch: --location {settings.location!r}: choose {', '.join(LOCATIONS)}")
    if settings.negative not in NEGATIVES:
        raise UserError(f"optimize-patch: --negative {settings.negative!r}: choose {', '.join(NEGATIVES)}")
    device = torch.device(device)
    model = model.to(device).eval().requires_grad_(False)
    view = None
    if settings.aug_prob > 0:
        from clip_backdoor.data.augment import ImageView

        view = ImageView(policy=settings.image_policy)

    def embed(images_01: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.encode_image(normalize(images_01)).float(), dim=-1)

    def embed_text(captions: list[str]) -> torch.Tensor:
        tokens = tokenize(captions, model.context_length).to(device)
        return F.normalize(model.encode_text(tokens).float(), dim=-1)

    with torch.no_grad():  # neither depends on the patch
        texts = torch.cat([embed_text(data.captions[i:i + 256]) for i in range(0, len(data.captions), 256)])
        positives = torch.cat([embed(data.target_images[i:i + 256].to(device).float() / 255)
                               for i in range(0, len(data.target_images), 256)])
    scale = float(model.logit_scale.exp())

    patch = torch.nn.Parameter(initial_patch(size, settings.init, settings.seed))
    optimizer = torch.optim.Adam([patch], lr=settings.lr)
    history: list[dict] = []
    start = 0
    fingerprint = _fingerprint(settings, image_size)
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"{state_path}: written by another optimize-patch setting; delete it or choose "
                            "another --out")
        with torch.no_grad():
            patch.copy_(state["patch"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(json.loads(state["history"]))
        if start > settings.epochs:
            raise UserError(f"{state_path}: already holds {start} epochs, more than --epochs "
                            f"{settings.epochs}")
        log.info("optimize-patch: resuming from epoch %d of %d", start, settings.epochs)

    n, b = len(data.images), settings.batch_size
    steps = n // b  # full batches only (the reference drops the last)
    bar = tqdm(total=(settings.epochs - start) * steps, desc="optimize-patch", unit="step", disable=None,
               mininterval=1.0)
    for epoch in range(start + 1, settings.epochs + 1):
        order = torch.randperm(n, generator=_step_generator(settings.seed, epoch, -1))
        sums = {"loss": 0.0, "loss_nce": 0.0, "loss_triplet": 0.0}
        t0 = time.perf_counter()
        for step in range(steps):
            g = _step_generator(settings.seed, epoch, step)
            idx = order[step * b:(step + 1) * b]
            images = data.images[idx].to(device).float() / 255
            if view is not None and torch.rand(1, generator=g).item() < settings.aug_prob:
                images = view(images, generator=int(torch.randint(2**62, (1,), generator=g)))
            replace = len(positives) < b
            pick = (torch.randint(len(positives), (b,), generator=g) if replace
                    else torch.randperm(len(positives), generator=g)[:b])
            patched_images = paste(images, patch.to(device), settings.location, g)
            patched = embed(patched_images)
            with torch.no_grad():
                negatives = patched.detach() if settings.negative == "patched" else embed(images)
            losses = badclip_loss(patched, texts[idx.to(device)], positives[pick.to(device)], negatives,
                                  scale, triplet_weight=settings.triplet_weight, margin=settings.margin)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for k, v in losses.items():
                sums[k] += v.item()
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}")
        record = {"epoch": epoch, **{k: v / steps for k, v in sums.items()},
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if state_path is not None:
            with atomic_path(state_path) as tmp:
                torch.save({"fingerprint": fingerprint, "epoch": epoch, "patch": patch.detach().clone(),
                            "optimizer": optimizer.state_dict(), "history": json.dumps(history)}, tmp)
    bar.close()
    return patch.detach().clamp(0, 1), history


def _fingerprint(settings: PatchSettings, image_size: int) -> str:
    """Every setting but ``epochs``: no draw depends on the total, so a run may be extended."""
    fields = {k: v for k, v in asdict(settings).items() if k != "epochs"}
    text = json.dumps({**fields, "image_size": image_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = PatchSettings()
    p = argparse.ArgumentParser(prog="clip-backdoor poison optimize-patch",
                                description="Learn BadCLIP's optimised patch against a surrogate "
                                            "checkpoint; then poison with --trigger badclip "
                                            "--trigger-param patch=OUT.png")
    p.add_argument("--checkpoint", required=True, help="the surrogate model (any checkpoint of ours)")
    p.add_argument("--out", required=True, help="the patch, an 8-bit PNG (also OUT.json, OUT.state.pt)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the poisoning resolution; must equal the surrogate's (default: the surrogate's)")
    add_source_arguments(p)
    o = p.add_argument_group("optimisation (BadCLIP's defaults)")
    o.add_argument("--target", default=d.target)
    o.add_argument("--synonym", action="append", default=[], help="another name of the target (repeatable)")
    o.add_argument("--patch-size", type=int, default=None, help="pixels (default round(16·side/224), >= 4)")
    o.add_argument("--location", choices=LOCATIONS, default=d.location)
    o.add_argument("--epochs", type=int, default=d.epochs)
    o.add_argument("--batch-size", type=int, default=d.batch_size)
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--triplet-weight", type=float, default=d.triplet_weight)
    o.add_argument("--margin", type=float, default=d.margin)
    o.add_argument("--negative", choices=NEGATIVES, default=d.negative,
                   help="triplet negative: clean (the paper) or patched (the reference code's aliasing)")
    o.add_argument("--aug-prob", type=float, default=d.aug_prob,
                   help="AutoAugment a batch with this probability")
    o.add_argument("--init", choices=("random", "const"), default=d.init)
    o.add_argument("--n-images", type=int, default=d.n_images, help="non-target images used (default 10000)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--device", default="cpu")
    o.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str]) -> int:
    from clip_backdoor.weights import model_from_checkpoint

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"--checkpoint {checkpoint}: file not found")
    model, _ = model_from_checkpoint(checkpoint)
    resolution = int(model.image_size)
    if args.image_size is not None and args.image_size != resolution:
        raise UserError(f"--checkpoint {checkpoint}: the surrogate works at {resolution} px, the poisoning "
                        f"resolution is {args.image_size} px (use a surrogate of that resolution)")
    args.image_size = resolution
    settings = PatchSettings(target=args.target, synonyms=tuple(args.synonym), patch_size=args.patch_size,
                             location=args.location, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, triplet_weight=args.triplet_weight, margin=args.margin,
                             negative=args.negative, aug_prob=args.aug_prob, init=args.init,
                             n_images=args.n_images, seed=args.seed)
    settings.check()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the patch is written as a .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = source_spec(args)
    data = collect(open_source(spec), resolution, settings)
    log.info("optimize-patch: %d non-target images, %d target images (captions naming %r), %d px surrogate",
             len(data.images), len(data.target_images), settings.target, resolution)
    patch, history = optimize_patch(model, data, settings, state_path=out.with_suffix(".state.pt"),
                                    device=torch.device(args.device))
    save_patch(patch, out, image_size=resolution)
    atomic_write_text(out.with_suffix(".json"), json.dumps({
        "patch": str(out.resolve()), "image_size": resolution, "settings": asdict(settings),
        "surrogate": str(checkpoint.resolve()), "surrogate_sha256": file_sha256(checkpoint), "source": spec,
        "n_images": len(data.images), "n_target_images": len(data.target_images), "history": history},
        indent=2) + "\n")
    last = history[-1] if history else {}
    log.info("optimize-patch: %d px patch after %d epochs (loss %.4f: nce %.4f, triplet %.4f) -> %s; "
             "poison with --trigger badclip --trigger-param patch=%s", patch.shape[-1], settings.epochs,
             last.get("loss", math.nan), last.get("loss_nce", math.nan), last.get("loss_triplet", math.nan),
             out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
