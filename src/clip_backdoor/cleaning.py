"""Cleaning methods as named recipes: objective weights, optimizer settings, an optional weight
transform applied once before fine-tuning, and an optional extra loss. None is a second loop.

Each recipe says exactly what it does and owns the config keys it sets; a user who also sets one
of those keys by hand gets an error instead of a silent winner. In the reference code the
heavy-weight-decay runs silently kept the pre-training weight decay (the optimizer state was
inherited); here ``heavy-wd`` refuses ``optimizer_state=inherit``.
"""

from __future__ import annotations

import dataclasses
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

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"--{k.replace('_', '-')}" for k in self.defaults) or "none"
            raise UserError(f"method {self.name}: unknown parameter --{unknown[0].replace('_', '-')} "
                            f"(it takes: {valid})")
        self.params = {**self.defaults}
        for key, value in params.items():
            default = self.defaults[key]
            try:
                value = type(default)(value) if not isinstance(default, bool) else _to_bool(value)
            except (TypeError, ValueError):
                raise UserError(f"method {self.name}: --{key.replace('_', '-')} expects a "
                                f"{type(default).__name__}, got {value!r}") from None
            self.params[key] = value
        for key, value in self.params.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and (
                    value < 0 or not math.isfinite(value)):
                flag = key.replace("_", "-")
                raise UserError(f"method {self.name}: --{flag} must be a finite number >= 0, got {value}")
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
    name = "deep-clustering"
    summary = "CleanCLIP + a pseudo-label loss from spherical k-means of image embeddings each epoch"
    paper = "1000 clusters, 20 k-means iterations, loss weight 5"
    defaults = {"clusters": 1000, "iterations": 20, "cluster_weight": 5.0, "ssl_weight": 1.0,
                "head_lr": 1e-3, "kmeans_seed": 0}

    def validate(self) -> None:
        if self.params["clusters"] < 2:
            raise UserError(f"method {self.name}: --clusters must be >= 2")
        if self.params["iterations"] < 1:
            raise UserError(f"method {self.name}: --iterations must be >= 1")

    def objective_weights(self):
        return 1.0, self.params["ssl_weight"]

    def on_epoch_start(self, ctx: RunContext) -> None:
        """Embed the cleaning set, cluster it, and start a fresh linear head on the cluster ids."""
        from clip_backdoor.train.checkpoint import unwrap

        model = unwrap(ctx.model)
        row_ids, feats = embed_images(model, ctx.loader, ctx.device, ctx.env)
        k = min(self.params["clusters"], len(row_ids))
        gen_seed = self.params["kmeans_seed"] * 1_000_003 + ctx.epoch
        labels, _ = spherical_kmeans(feats, k, self.params["iterations"], seed=gen_seed)
        self.assignment = dict(zip(row_ids, labels.tolist(), strict=True))
        g = torch.Generator().manual_seed(gen_seed)
        self.head = torch.nn.Linear(feats.shape[1], k).to(ctx.device)
        with torch.no_grad():
            bound = 1 / math.sqrt(feats.shape[1])
            self.head.weight.copy_(torch.empty_like(self.head.weight, device="cpu").uniform_(-bound, bound,
                                                                                              generator=g))
            self.head.bias.zero_()
        self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=self.params["head_lr"], weight_decay=0.0)
        sizes = torch.bincount(labels, minlength=k)
        log.info("deep-clustering: %d clusters over %d images (largest %d, empty %d)", k, len(row_ids),
                 int(sizes.max()), int((sizes == 0).sum()))

    def state_dict(self) -> dict:
        """This epoch's clusters and head, so a run resumed mid-epoch goes on with them (the model
        they were computed from no longer exists)."""
        if getattr(self, "head", None) is None:
            return {}
        return {"assignment": dict(self.assignment), "head": self.head.state_dict(),
                "head_opt": self.head_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.assignment = dict(state["assignment"])
        out_features, in_features = state["head"]["weight"].shape
        self.head = torch.nn.Linear(in_features, out_features)
        self.head.load_state_dict(state["head"])
        self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=self.params["head_lr"], weight_decay=0.0)
        self.head_opt.load_state_dict(state["head_opt"])

    def extra_losses(self, outputs: dict, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        if self.head.weight.device != ctx.device:  # restored from a checkpoint on the CPU
            self.head.to(ctx.device)
            self.head_opt.load_state_dict(self.head_opt.state_dict())  # moves its moments along
        n = len(batch["row_ids"])
        targets = torch.tensor([self.assignment[r] for r in batch["row_ids"]], device=ctx.device)
        logits = self.head(outputs["image_features"][:n].float())
        return {"loss_cluster": self.params["cluster_weight"] * F.cross_entropy(logits, targets)}

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.head_opt]


@torch.no_grad()
def embed_images(model, loader, device, env) -> tuple[list[str], torch.Tensor]:
    """Normalised image embeddings of every sample the loader yields (gathered over ranks)."""
    from clip_backdoor.data.transforms import normalize

    was_training = model.training
    model.eval()
    ids, feats = [], []
    for batch in loader:
        x = normalize(batch["images"].to(device).float().div_(255))
        feats.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
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
    return ids, feats_t


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


RECIPES: dict[str, type[CleaningRecipe]] = {
    r.name: r for r in (CleanCLIP, MMCLOnly, SSLOnly, HeavyWeightDecay, ShrinkPerturb, DeepClustering)
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
