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
def embed_images(model, loader, device, env) -> tuple[list[str], torch.Tensor]:
    """Normalised image embeddings of every sample the loader yields (gathered over ranks), sorted by
    row id: the order, and so the k-means seeding, is the same whatever the number of ranks."""
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
