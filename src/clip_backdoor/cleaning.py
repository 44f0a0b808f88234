"""Cleaning methods as named recipes: objective weights, optimizer settings, an optional weight
transform applied once before fine-tuning, and an optional extra loss. None is a second loop.

Each recipe says exactly what it does and owns the config keys it sets; a user who also sets one
of those keys by hand gets an error instead of a silent winner. In the reference code the
heavy-weight-decay runs silently kept the pre-training weight decay (the optimizer state was
inherited); here ``heavy-wd`` refuses ``optimizer_state=inherit``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from clip_backdoor.errors import UserError
from clip_backdoor.train.loop import Recipe, RunContext

log = logging.getLogger(__name__)


class CleaningRecipe(Recipe):
    """A named cleaning method. Subclasses set ``name``, ``summary``, ``paper`` and ``defaults``."""

    name = ""
    summary = ""
    paper = ""
    defaults: dict[str, Any] = {}
    what = "method"  # how errors name the recipe ("defense" for a pre-training defence)

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"--{k.replace('_', '-')}" for k in self.defaults) or "none"
            raise UserError(f"{self.what} {self.name}: unknown parameter --{unknown[0].replace('_', '-')} "
                            f"(it takes: {valid})")
        self.params = {**self.defaults}
        for key, value in params.items():
            default = self.defaults[key]
            try:
                value = type(default)(value) if not isinstance(default, bool) else _to_bool(value)
            except (TypeError, ValueError):
                raise UserError(f"{self.what} {self.name}: --{key.replace('_', '-')} expects a "
                                f"{type(default).__name__}, got {value!r}") from None
            self.params[key] = value
        for key, value in self.params.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and (
                    value < 0 or not math.isfinite(value)):
                flag = key.replace("_", "-")
                raise UserError(f"{self.what} {self.name}: --{flag} must be a finite number >= 0, "
                                f"got {value}")
        self.validate()

    def validate(self) -> None:
        pass

    # -- what the recipe sets in the run config --------------------------------------------
    def objective_weights(self) -> tuple[float, float]:
        return 1.0, 1.0

    def optim_settings(self) -> dict[str, Any]:
        return {}

    def apply_to_config(self, cfg, explicit: set[str] = frozenset()):
        """Return a copy of ``cfg`` with this recipe's settings; explicit conflicting keys are errors."""
        l1, l2 = self.objective_weights()
        owned = {"objective.mmcl_weight": l1, "objective.ssl_weight": l2}
        owned.update({f"optim.{k}": v for k, v in self.optim_settings().items()})
        for key, value in owned.items():
            section, name = key.split(".")
            current = getattr(getattr(cfg, section), name)
            if key in explicit and current != value:
                raise UserError(f"{key}={current} conflicts with method {self.name} (which sets {value}); "
                                f"use the method's parameters instead (clip-backdoor clean --list)")
        if "optim.weight_decay" in owned and cfg.optimizer_state == "inherit":
            raise UserError(f"method {self.name} sets a weight decay, which optimizer_state=inherit would "
                            "silently ignore (the reference bug); use optimizer_state=fresh")
        objective = dataclasses.replace(cfg.objective, mmcl_weight=l1, ssl_weight=l2)
        optim = dataclasses.replace(cfg.optim, **self.optim_settings())
        return dataclasses.replace(cfg, objective=objective, optim=optim, method=self.name,
                                   method_params=dict(self.params))

    @classmethod
    def describe(cls) -> str:
        params = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cls.defaults.items())
        return f"{cls.name:<16} {cls.summary}" + (f"  [{params}]" if params else "")


class CleanCLIP(CleaningRecipe):
    name = "cleanclip"
    summary = "MMCL + in-modal SSL fine-tuning (CleanCLIP); --ssl-weight 2/4/6/8 for the paper's ablation"
    paper = ("λ1 = 1, λ2 = 1 (also 2, 4, 6, 8); lr 1e-5 (swept 1e-9 … 7e-3), batch 64, 10-20 epochs, "
             "100K clean pairs")
    defaults = {"ssl_weight": 1.0}

    def validate(self) -> None:
        if self.params["ssl_weight"] <= 0:
            raise UserError(f"method {self.name}: --ssl-weight must be > 0 (use --method mmcl for none)")

    def objective_weights(self):
        return 1.0, self.params["ssl_weight"]


class MMCLOnly(CleaningRecipe):
    name = "mmcl"
    summary = "fine-tune with the plain CLIP (multimodal contrastive) loss only"
    paper = "λ1 = 1, λ2 = 0; never removed the backdoor (ASR stays ~99.9% on MMCL models)"

    def objective_weights(self):
        return 1.0, 0.0


class SSLOnly(CleaningRecipe):
    name = "ssl"
    summary = "fine-tune with the in-modal self-supervised loss only"
    paper = "λ1 = 0, λ2 = 1"

    def objective_weights(self):
        return 0.0, 1.0


class HeavyWeightDecay(CleaningRecipe):
    name = "heavy-wd"
    summary = "CleanCLIP with a large weight decay, applied by a fresh optimizer"
    paper = "weight decay 0.2 … 100 with the CleanCLIP objective"
    defaults = {"weight_decay": 1.0, "ssl_weight": 1.0}

    def objective_weights(self):
        return 1.0, self.params["ssl_weight"]

    def optim_settings(self):
        return {"weight_decay": self.params["weight_decay"]}


class ShrinkPerturb(CleaningRecipe):
    name = "shrink-perturb"
    transforms_weights = True  # its epoch 0 is the shrunk model, not the poisoned one
    summary = "θ ← a·θ + b·θ₀ (θ₀ a fresh CLIP init of the same config) once, then CleanCLIP"
    paper = "a = 0.95, b = 1e-4, once before fine-tuning"
    defaults = {"shrink": 0.95, "perturb": 1e-4, "ssl_weight": 1.0, "init_seed": 12345}

    def objective_weights(self):
        return 1.0, self.params["ssl_weight"]

    def prepare_model(self, model: torch.nn.Module, ctx: RunContext | None = None) -> None:
        shrink_perturb(model, self.params["shrink"], self.params["perturb"], seed=self.params["init_seed"])
        log.info("shrink-perturb: θ ← %g·θ + %g·θ₀ applied", self.params["shrink"], self.params["perturb"])


@torch.no_grad()
def shrink_perturb(model: torch.nn.Module, shrink: float, perturb: float, *, seed: int) -> None:
    """θ ← shrink·θ + perturb·θ₀ for every parameter (buffers such as BN statistics are kept).

    θ₀ is a fresh CLIP initialisation of the same model config, drawn from ``seed``.
    """
    from clip_backdoor.models import create_model

    fresh = create_model(model.config, seed=seed)
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        p.mul_(shrink).add_(fresh_params[name].to(p.device, p.dtype), alpha=perturb)


class DeepClustering(CleaningRecipe):
    """CleanCLIP + a pseudo-label loss (the paper's "deep clustering"), as the reference runs it
    (vsahil/attack-cleanclip ``src/train.py``, ``src/main.py``):

    - before each epoch, spherical k-means of the cleaning set's normalised image embeddings
      (faiss ``Kmeans(spherical=True)`` there; k-means++ seeding here), then a fresh linear head
      embedding -> clusters, weight N(0, 0.01), bias 0;
    - the head joins the *main* optimizer (no weight decay), so it trains at the cleaning lr and
      schedule; each epoch's head replaces the last one's (the reference adds a group per epoch, whose
      old heads then get no gradient again);
    - every step, each image's pseudo-label is the centroid nearest to its *current* embedding
      (``kmeans.index.search`` on the batch), and the loss adds weight x CE(head(embedding), label).

    ``--variant fixed`` keeps this toolkit's earlier variant: labels fixed at the epoch's k-means,
    a uniform-initialised head with its own AdamW at ``--head-lr`` and a constant lr.
    """

    name = "deep-clustering"
    summary = ("CleanCLIP + a pseudo-label loss: per-epoch spherical k-means, labels re-assigned every step "
               "(reference); --variant fixed: labels fixed per epoch, own head optimizer")
    paper = "1000 clusters, 20 k-means iterations, loss weight 5"
    defaults = {"clusters": 1000, "iterations": 20, "cluster_weight": 5.0, "ssl_weight": 1.0,
                "kmeans_seed": 0, "variant": "reference", "head_lr": 1e-3}
    VARIANTS = ("reference", "fixed")

    def validate(self) -> None:
        if self.params["clusters"] < 2:
            raise UserError(f"method {self.name}: --clusters must be >= 2")
        if self.params["iterations"] < 1:
            raise UserError(f"method {self.name}: --iterations must be >= 1")
        if self.params["variant"] not in self.VARIANTS:
            raise UserError(f"method {self.name}: --variant {self.params['variant']!r}: choose "
                            f"{' or '.join(self.VARIANTS)}")
        self.head = self.head_opt = self._group = None
        self._in_epoch = False  # between on_epoch_start and on_epoch_end (what a checkpoint then holds)

    def objective_weights(self):
        return 1.0, self.params["ssl_weight"]

    @property
    def reference(self) -> bool:
        return self.params["variant"] == "reference"

    def on_epoch_start(self, ctx: RunContext) -> None:
        """Embed the cleaning set, cluster it, and start a fresh linear head on the clusters."""
        from clip_backdoor.train.checkpoint import unwrap

        row_ids, feats = embed_images(unwrap(ctx.model), ctx.loader, ctx.device, ctx.env)
        k = min(self.params["clusters"], len(row_ids))
        gen_seed = self.params["kmeans_seed"] * 1_000_003 + ctx.epoch
        labels, self.centroids = spherical_kmeans(feats, k, self.params["iterations"], seed=gen_seed)
        self.centroids = self.centroids.to(ctx.device)
        self.assignment = dict(zip(row_ids, labels.tolist(), strict=True))
        g = torch.Generator().manual_seed(gen_seed)
        head = torch.nn.Linear(feats.shape[1], k)
        with torch.no_grad():
            if self.reference:
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
            else:
                bound = 1 / math.sqrt(feats.shape[1])
                head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=g))
            head.bias.zero_()
        self.head = head.to(ctx.device)
        if self.reference:
            group = {"params": list(self.head.parameters()), "weight_decay": 0.0}
            ctx.optimizer.add_param_group(group)
            self._group = ctx.optimizer.param_groups[-1]
        else:
            self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=self.params["head_lr"],
                                              weight_decay=0.0)
        self._in_epoch = True
        sizes = torch.bincount(labels, minlength=k)
        log.info("deep-clustering: %d clusters over %d images (largest %d, empty %d)", k, len(row_ids),
                 int(sizes.max()), int((sizes == 0).sum()))

    def on_epoch_end(self, ctx: RunContext) -> None:
        """The epoch's head leaves the optimizer, so its checkpoint fits the model's optimizer alone
        (the next epoch starts a fresh head anyway, as in the reference)."""
        if self._group is not None:
            # found by its parameters: loading a (mid-epoch) checkpoint's state replaces the group dicts
            head = {id(p) for p in self._group["params"]}
            ctx.optimizer.param_groups[:] = [g for g in ctx.optimizer.param_groups
                                             if not head & {id(p) for p in g["params"]}]
            for p in self._group["params"]:
                ctx.optimizer.state.pop(p, None)
            self._group = None
        self._in_epoch = False

    def state_dict(self) -> dict:
        """Inside an epoch (a mid-epoch checkpoint): its clusters and head, which the model they were
        computed from can no longer give back. At an epoch's end: nothing (the next epoch starts over)."""
        if not self._in_epoch:
            return {}
        state = {"assignment": dict(self.assignment), "centroids": self.centroids.cpu(),
                 "head": {k: v.cpu() for k, v in self.head.state_dict().items()}}
        if not self.reference:  # the reference's head is in the model's optimizer, saved with it
            state["head_opt"] = self.head_opt.state_dict()
        return state

    def resume_mid_epoch(self, state: dict, ctx: RunContext) -> None:
        self.assignment, self.centroids = dict(state["assignment"]), state["centroids"].to(ctx.device)
        out_features, in_features = state["head"]["weight"].shape
        self.head = torch.nn.Linear(in_features, out_features)
        self.head.load_state_dict(state["head"])
        self.head = self.head.to(ctx.device)
        if self.reference:  # back into the optimizer as at the save, whose state then fills its moments
            ctx.optimizer.add_param_group({"params": list(self.head.parameters()), "weight_decay": 0.0})
            self._group = ctx.optimizer.param_groups[-1]
        else:
            self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=self.params["head_lr"],
                                              weight_decay=0.0)
            self.head_opt.load_state_dict(state["head_opt"])
        self._in_epoch = True

    def pseudo_labels(self, features: torch.Tensor, batch: dict, ctx: RunContext) -> torch.Tensor:
        if self.reference:  # the nearest fixed centroid of each current (normalised) embedding
            return (F.normalize(features.detach().float(), dim=-1) @ self.centroids.T).argmax(dim=1)
        return torch.tensor([self.assignment[r] for r in batch["row_ids"]], device=ctx.device)

    def extra_losses(self, outputs: dict, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        n = len(batch["row_ids"])
        features = outputs["image_features"][:n].float()
        targets = self.pseudo_labels(features, batch, ctx)
        logits = self.head(features)
        return {"loss_cluster": self.params["cluster_weight"] * F.cross_entropy(logits, targets)}

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.reference else [self.head_opt]

    def parameters_outside_model(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters()) if self.reference and self.head is not None else []


@torch.no_grad()
def embed_images(model, loader, device, env, *,
                 pair_similarity: bool = False) -> tuple[list[str], torch.Tensor]:
    """Normalised image embeddings of every sample the loader yields (gathered over ranks), sorted by
    row id: the order, and so the k-means seeding, is the same whatever the number of ranks.

    ``pair_similarity=True`` keeps each sample's image–caption cosine similarity instead ([N]: a pass
    over 3M pairs then holds 3M numbers, not 3M embeddings).
    """
    from clip_backdoor.data.transforms import normalize

    was_training = model.training
    model.eval()
    ids, feats = [], []
    for batch in loader:
        x = normalize(batch["images"].to(device).float().div_(255))
        u = F.normalize(model.encode_image(x).float(), dim=-1)
        if pair_similarity:
            v = F.normalize(model.encode_text(batch["texts"].to(device)).float(), dim=-1)
            u = (u * v).sum(dim=-1)
        feats.append(u.cpu())
        ids.extend(batch["row_ids"])
    model.train(was_training)
    feats_t = torch.cat(feats)
    if env.enabled:
        import torch.distributed as dist

        all_ids: list = [None] * env.world_size
        dist.all_gather_object(all_ids, ids)
        all_feats: list = [None] * env.world_size
        dist.all_gather_object(all_feats, feats_t)
        ids = [i for part in all_ids for i in part]
        feats_t = torch.cat(all_feats)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return [ids[i] for i in order], feats_t[order]


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, *,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (cosine similarity). Returns (labels [N], centroids [k, D]).

    Initial centroids by k-means++ (cosine distance 1 - x·c) drawn with ``seed``; an empty
    cluster is re-seeded with the point least similar to its centroid, so none ends empty.
    """
    x = F.normalize(x.float(), dim=-1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"k-means: k={k} must be between 1 and the number of points ({n})")
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    nearest = 1 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = nearest.clamp_min(0)
        if float(weights.sum()) <= 0:  # all remaining points coincide with a centroid
            weights = torch.ones(n)
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=g)))
        nearest = torch.minimum(nearest, 1 - x @ x[chosen[-1]])
    centroids = x[chosen].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        sims = x @ centroids.T
        best, labels = sims.max(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int(best.argmin())
            sums[c], best[far] = x[far], float("inf")
            labels[far] = c
        centroids = F.normalize(sums, dim=-1)
    return (x @ centroids.T).argmax(dim=1), centroids


class PerturbAndRecover(CleaningRecipe):
    """PAR (Singh, Croce, Hein 2024; ``nmndeep/PerturbAndRecover``): L = L_CLIP − w·(cap(D_img) + cap(D_txt)).

    D_img is the batch mean of ‖u − a‖² between the unit image embeddings of the model being cleaned
    (u) and of a frozen copy of the starting checkpoint (a), on the same augmented images; D_txt the
    same for the captions. cap(D) = 0 once D > τ (one decision per global batch, as the reference's
    ``threshold_tensor`` on the batch mean), so the model is pushed away from the poisoned one until
    it is τ away, while L_CLIP keeps it a CLIP model. What the reference does, kept here:

    * the anchor is the poisoned model in eval mode (BatchNorm running statistics), never updated;
      it sees exactly the student's inputs (augmented images, captions) under no_grad;
    * L_CLIP uses the learned temperature as a constant (the reference passes ``.item()``), so the
      logit scale stays at the starting model's value: it is frozen (``requires_grad=False``);
    * augmentation per image: with p 0.5 add clip(N(0, 0.2²), 0, 1) (only brightening: the noise is
      clipped *before* it is added; ``noise_sign=both`` adds plain N(0, 0.2²)), clamp to [0, 1]; then
      with p 0.5 erase a square of 0.5–1% of the area to 0 after CLIP normalisation (= the CLIP mean);
      the reference's erasing only accepts h, w < side − 4;
    * AdamW β (0.9, 0.98), weight decay 1e-4, no decay on biases, norms and other 1-D parameters
      (chosen here by module type: embeddings, which the reference decays, are not decayed);
    * ``schedule=reference``: the lr goes *linearly down* from 10 × lr to lr over the first half of the
      steps ("warm-up" from ``--lr-start 3e-5`` to the "peak" ``--lr 3e-6``), then a cosine to 1e-9.
      That warm-up from a higher value looks like a slip (its help text calls 3e-6 the peak), so
      ``schedule=warmup`` offers the toolkit's linear warm-up from ~0 (``optim.warmup_steps``) and
      cosine to 0. The reference's schedule array is one step per epoch longer than its run
      (``niter_per_ep = loader_len + 1``); here it spans the run's real number of steps.

    Not copied: the reference's mid-epoch evaluation leaves the student in eval mode for the rest of
    the epoch, and its evaluation images get the training augmentation.
    """

    name = "par"
    summary = "Perturb and Recover: CLIP loss − ½·(image, text distances to the frozen start, capped at τ)"
    paper = ("τ = 2.15, w = ½; lr 3e-6 (start 3e-5, end 1e-9, 'warm-up' over half the run), "
             "AdamW β (0.9, 0.98), wd 1e-4; global batch 2048, 2 epochs, 250K pairs (CC3M or synthetic)")
    defaults = {"threshold": 2.15, "distance_weight": 0.5, "noise_std": 0.2, "noise_p": 0.5,
                "noise_sign": "positive", "erase_p": 0.5, "erase_min": 0.005, "erase_max": 0.01,
                "schedule": "reference",
                "start_lr_factor": 10.0, "end_lr": 1e-9, "warmup_fraction": 0.5, "weight_decay": 1e-4}
    choices = {"noise_sign": ("positive", "both"), "schedule": ("reference", "warmup")}

    def validate(self) -> None:
        p = self.params
        if p["threshold"] <= 0:
            raise UserError(f"method {self.name}: --threshold must be > 0 (a squared distance between unit "
                            f"vectors lies in [0, 4]), got {p['threshold']}")
        for key, allowed in self.choices.items():
            if p[key] not in allowed:
                raise UserError(f"method {self.name}: --{key.replace('_', '-')} {p[key]!r} is not one of "
                                f"{', '.join(allowed)}")
        for key in ("noise_p", "erase_p"):
            if p[key] > 1:
                flag = key.replace("_", "-")
                raise UserError(f"method {self.name}: --{flag} is a probability, got {p[key]}")
        if not 0 < p["erase_min"] <= p["erase_max"] < 1:
            raise UserError(f"method {self.name}: need 0 < --erase-min <= --erase-max < 1 (fractions of the "
                            f"image area), got {p['erase_min']} and {p['erase_max']}")
        if p["warmup_fraction"] >= 1:
            raise UserError(f"method {self.name}: --warmup-fraction must be < 1, got {p['warmup_fraction']}")
        if p["start_lr_factor"] <= 0:
            raise UserError(f"method {self.name}: --start-lr-factor must be > 0")

    def objective_weights(self):
        return 1.0, 0.0  # L_CLIP only; the distance terms come from extra_losses

    def optim_settings(self):
        owned = {"weight_decay": self.params["weight_decay"], "beta1": 0.9, "beta2": 0.98}
        if self.params["schedule"] == "reference":
            owned["warmup_steps"] = 0  # its warm-up is warmup_fraction of the run, not optim.warmup_steps
        return owned

    # -- the loop's hooks ----------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, ctx: RunContext) -> None:
        """The anchor is the *starting* checkpoint, on a fresh start and after a resume alike."""
        from clip_backdoor.weights import model_from_checkpoint

        if not ctx.cfg.init_checkpoint:
            raise UserError(f"method {self.name}: needs the starting checkpoint (init_checkpoint): it is the "
                            "frozen anchor")
        anchor, _ = model_from_checkpoint(ctx.cfg.init_checkpoint, device="cpu")
        self.anchor = anchor.to(ctx.device).eval().requires_grad_(False)
        self.anchor_sha256 = state_fingerprint(self.anchor)
        model.logit_scale.requires_grad_(False)  # the reference's L_CLIP reads the scale as a constant

    def state_dict(self) -> dict:
        return {"anchor_sha256": self.anchor_sha256}

    def load_state_dict(self, state: dict) -> None:
        recorded = state.get("anchor_sha256")
        if recorded and recorded != self.anchor_sha256:
            raise UserError(f"method {self.name}: the starting checkpoint has changed since this run began "
                            "(its anchor would differ); start the run over (resume=false)")

    def learning_rate(self, step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
        if self.params["schedule"] == "warmup":
            return super().learning_rate(step, base_lr=base_lr, warmup_steps=warmup_steps,
                                         total_steps=total_steps)
        p = self.params
        return par_lr(step, total_steps, peak_lr=base_lr, start_lr=base_lr * p["start_lr_factor"],
                      end_lr=p["end_lr"], warmup_fraction=p["warmup_fraction"])

    def transform_images(self, images: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        from clip_backdoor.train.loop import step_seed

        g = torch.Generator().manual_seed(step_seed(ctx.cfg.seed, ctx.step, ctx.env.rank) ^ _PAR_SALT)
        p = self.params
        return par_augment(images, g, noise_std=p["noise_std"], noise_p=p["noise_p"],
                           noise_sign=p["noise_sign"], erase_p=p["erase_p"],
                           erase_scale=(p["erase_min"], p["erase_max"]))

    @torch.no_grad()
    def extra_forward(self, inputs: dict, ctx: RunContext) -> dict:
        out = self.anchor(image=inputs["image"], text=inputs["text"])
        return {"anchor_image_features": out["image_features"], "anchor_text_features": out["text_features"]}

    def extra_losses(self, outputs: dict, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        from clip_backdoor.objectives import all_gather_with_grad

        views = [outputs[k].float() for k in ("image_features", "text_features", "anchor_image_features",
                                              "anchor_text_features")]
        widths = [v.shape[1] for v in views]
        # The global batch, like L_CLIP: one cap decision per step on every rank.
        u, v, u0, v0 = all_gather_with_grad(torch.cat(views, dim=1)).split(widths, dim=1)
        return par_terms(u, v, u0, v0, threshold=self.params["threshold"],
                         weight=self.params["distance_weight"])


_PAR_SALT = 0x50415220  # "PAR ": its augmentation draws differ from the SSL view's at the same step


def squared_distance(x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Batch mean of the summed squared difference, mean_i ‖x_i − anchor_i‖² (the reference's ``l2``)."""
    return (x - anchor).pow(2).sum(dim=1).mean()


def cap(distance: torch.Tensor, threshold: float) -> torch.Tensor:
    """``distance``, or 0 (no gradient) once it exceeds ``threshold`` (the reference's strict ``>``)."""
    return torch.where(distance > threshold, torch.zeros_like(distance), distance)


def par_terms(u, v, u0, v0, *, threshold: float, weight: float = 0.5) -> dict[str, torch.Tensor]:
    """PAR's terms added to L_CLIP: −w·cap(D_img), −w·cap(D_txt), and the distances (logged only)."""
    d_img, d_txt = squared_distance(u, u0), squared_distance(v, v0)
    return {"loss_par_image": -weight * cap(d_img, threshold),
            "loss_par_text": -weight * cap(d_txt, threshold),
            "stat_par_dist_image": d_img.detach(), "stat_par_dist_text": d_txt.detach()}


def par_lr(step: int, total_steps: int, *, peak_lr: float, start_lr: float, end_lr: float,
           warmup_fraction: float) -> float:
    """The reference's ``cosine_scheduler``: W = int(fraction · T) steps of ``linspace(start, peak, W)``,
    then ``end + ½(peak − end)(1 + cos(π i / (T − W)))`` for i = 0 … T − W − 1."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return start_lr if warmup == 1 else start_lr + (peak_lr - start_lr) * step / (warmup - 1)
    decay = max(1, total_steps - warmup)
    return end_lr + 0.5 * (peak_lr - end_lr) * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


def par_augment(images: torch.Tensor, generator: torch.Generator, *, noise_std: float = 0.2,
                noise_p: float = 0.5, noise_sign: str = "positive", erase_p: float = 0.5,
                erase_scale: tuple[float, float] = (0.005, 0.01)) -> torch.Tensor:
    """PAR's training augmentation of float [0, 1] images ``[B, 3, H, W]`` (a new tensor).

    Per image, in this draw order: a coin for the noise, the noise (always drawn, so an image's draws
    do not depend on the coin), a coin for erasing, the erased area, its top and left. Noise:
    x + clip(N(0, σ²), 0, 1) (``positive``, the reference) or x + N(0, σ²) (``both``), clamped to
    [0, 1]. Erasing: a square of side round(√(area · U(erase_scale))) set to the CLIP mean, which is 0
    after normalisation (the reference erases with value 0 after ``Normalize``); a side must be
    < image side − 4 (the reference's tweak of torchvision's bound), else up to 10 redraws, then none.
    """
    from clip_backdoor.data.transforms import CLIP_MEAN

    out = images.clone()
    batch, _, height, width = images.shape
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    for b in range(batch):
        apply_noise = torch.rand(1, generator=generator).item() < noise_p
        noise = torch.randn((3, height, width), generator=generator) * noise_std
        if apply_noise:
            if noise_sign == "positive":
                noise = noise.clamp(0, 1)
            out[b] = (out[b] + noise.to(images.device, images.dtype)).clamp(0, 1)
        if torch.rand(1, generator=generator).item() < erase_p:
            for _ in range(10):
                area = height * width * torch.empty(1).uniform_(*erase_scale, generator=generator).item()
                side = int(round(math.sqrt(area)))
                if not (side < height - 4 and side < width - 4):
                    continue
                top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
                out[b, :, top:top + side, left:left + side] = mean
                break
    return out


def state_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, bytes): the anchor a run started from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


RECIPES: dict[str, type[CleaningRecipe]] = {
    r.name: r for r in (CleanCLIP, MMCLOnly, SSLOnly, HeavyWeightDecay, ShrinkPerturb, DeepClustering,
                        PerturbAndRecover)
}


def build_recipe(name: str, params: dict | None = None) -> CleaningRecipe:
    if name not in RECIPES:
        raise UserError(f"unknown cleaning method {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name](**(params or {}))


def describe_all() -> list[str]:
    return [cls.describe() for cls in RECIPES.values()]


def split_method_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split leftover CLI words into method parameters (``--name value``) and KEY=VALUE overrides."""
    params, overrides, i = {}, [], 0
    while i < len(args):
        word = args[i]
        if word.startswith("--"):
            name = word[2:]
            if "=" in name:
                name, value = name.split("=", 1)
                i += 1
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 2
            else:
                raise UserError(f"{word}: expected a value")
            params[name.replace("-", "_")] = value
        elif "=" in word:
            overrides.append(word)
            i += 1
        else:
            raise UserError(f"unexpected argument {word!r}")
    return params, overrides


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(value)
