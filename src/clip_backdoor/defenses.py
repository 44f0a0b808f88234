"""Pre-training defences as recipes of the one training loop: SafeCLIP and RoCLIP.

A defence changes how a pre-training run computes its loss (``Recipe.losses``), may ask the loop for
augmented views (``wants_views``) and a different learning rate for some epochs (``adjust_lr``), and
keeps its state (memory banks, the safe share) in the checkpoint, so a resumed run equals an
uninterrupted one. Turn one on with ``clip-backdoor pretrain --defense safeclip`` or, in a study,
``pretrain.defenses: [safeclip, roclip]``.

Both replace the objective's MMCL term; an SSL term of the objective (MMCL+SSL) stays as it is.

**SafeCLIP** (Yang et al., ICML 2024; ``HangerYang/SafeCLIP``, ``src/main.py``, ``train.py``,
``parser.py``, ``samplers.py``, ``memory_bank.py``):

1. epochs 1..``inmodal_warmup`` (5): in-modal loss only, NNCLR-style: for every sample, the nearest
   neighbour (cosine) of its view-1 embedding in a memory bank (``bank_size`` 256, one per modality)
   is the positive of its view-2 embedding, L_in = ½[CE(s·Ũ NN(U)ᵀ) + CE(s·Ṽ NN(V)ᵀ)]; the bank
   is queried before the batch is pushed into it;
2. the next ``multimodal_warmup`` (1) epochs: the CLIP loss on all pairs at the constant lr
   ``filter_lr`` (5e-6);
3. every later epoch: the image–caption cosine similarity of every pair, a 2-component Gaussian
   mixture on them (scikit-learn, ``random_state=0``, fitted on the similarities sorted
   descending); p_clean = the posterior of the component with the higher mean. The first such epoch
   the safe pairs are those with p_clean ≥ ``first_threshold`` (0.9); their share r then grows by
   ``share_step`` (0.01) per epoch up to ``share_cap`` (0.85), the safe set being the top r·N pairs
   by p_clean. Safe pairs get the objective's loss (CLIP), the others the in-modal loss.

**RoCLIP** (Yang et al., NeurIPS 2023; ``BigML-CS-UCLA/RoCLIP``, ``src/train.py``, ``parser.py``):
every ``period``-th epoch (2: epochs 2, 4, ...), each image is paired with the nearest neighbour
(cosine) *of its image embedding* among a pool of caption embeddings (``pool_size`` 21,845), and the
CLIP loss is computed on (image, NN caption): L = ½[CE(s·U Pᵀ) + CE(s·P Uᵀ)], P the pool entries
(no gradient reaches the text tower through them). Then the batch's caption embeddings are pushed
into the pool. The pool is neither read nor written in the other epochs (plain CLIP loss). With
``augment`` (the README's ``--cross_aug``) images and captions are replaced by an augmented view
every epoch.

Both banks are lightly's ``MemoryBankModule`` (1.2.39): they start as random unit vectors, and a
batch that reaches the end of the bank fills it up and the rest of the batch is dropped (pointer
back to 0). :class:`MemoryBank` does exactly that, from a seeded generator.

What differs from the reference code, and why:

- Views: the loop's SSL views (AutoAugment, EDA) instead of the references' SimCLR-style crop, flip,
  colour jitter, grayscale and blur; SafeCLIP's view 1 is the un-augmented pair (the references
  augment both views), and the similarity pass reads un-augmented pairs (deterministic).
- SafeCLIP's safe/unsafe split is per sample inside each batch: a batch of n pairs with n_s safe
  ones contributes (n_s/n)·L_clip(safe) + (n_u/n)·L_in(unsafe), so every pair weighs 1/n, as in the
  reference's two passes (in-modal over the unsafe pairs, then CLIP over the safe ones) with their
  full batches; the CLIP term's negatives are the safe pairs of the batch. The number of steps per
  epoch is the loop's, not the reference's ``calcualte_num_batches``.
- One lr schedule (the loop's warm-up + cosine over the whole run; SafeCLIP's multimodal warm-up at
  ``filter_lr``) instead of the reference restarting a cosine with 10,000 warm-up steps after the
  warm-up epochs.
- The GMM and the ranking cover the rows the loader yields in that epoch (the remainder of a
  shuffled epoch is not trained either); ties of p_clean go to the higher similarity (the
  reference's ``torch.argsort`` breaks them arbitrarily).
- SafeCLIP's CLIP term is the objective's MMCL on un-augmented pairs (the reference's cross-aug
  pairs view-1 images with view-2 captions).
- The memory banks are checkpointed (the references' are not), so resume is exact.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from clip_backdoor.cleaning import CleaningRecipe, embed_images
from clip_backdoor.errors import UserError
from clip_backdoor.objectives import all_gather_with_grad, contrastive_ce, mmcl_loss, ssl_loss
from clip_backdoor.train.loop import RunContext

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The memory bank (NNCLR; lightly's MemoryBankModule semantics)
# ------------------------------------------------------------------------------------------------
class MemoryBank:
    """``size`` embeddings queried for nearest neighbours and refreshed first in, first out.

    It starts as ``size`` random unit vectors (standard normal, normalised, from ``seed``), drawn
    when the first batch shows the dimension. ``push`` writes a batch at the pointer; a batch that
    reaches the end fills the bank up, the rest of it is dropped and the pointer returns to 0
    (lightly 1.2.39, which both references use).
    """

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise UserError(f"memory bank size must be >= 1, got {size}")
        self.size, self.seed = int(size), int(seed)
        self.bank: torch.Tensor | None = None
        self.ptr = 0

    def _ensure(self, like: torch.Tensor) -> torch.Tensor:
        if self.bank is None:
            g = torch.Generator().manual_seed(self.seed)
            init = torch.randn(self.size, like.shape[1], generator=g)
            self.bank = torch.nn.functional.normalize(init, dim=1)
        if self.bank.device != like.device:
            self.bank = self.bank.to(like.device)
        return self.bank

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """For each row of ``x``, the bank entry of highest cosine similarity (a constant: no gradient)."""
        bank = self._ensure(x)
        sims = torch.nn.functional.normalize(x.detach().float(), dim=1) @ \
            torch.nn.functional.normalize(bank, dim=1).T
        return bank[sims.argmax(dim=1)].clone()

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        bank = self._ensure(x)
        n, ptr = x.shape[0], self.ptr
        if ptr + n >= self.size:
            bank[ptr:] = x[:self.size - ptr].detach().float()
            self.ptr = 0
        else:
            bank[ptr:ptr + n] = x.detach().float()
            self.ptr = ptr + n

    def state_dict(self) -> dict:
        return {"bank": None if self.bank is None else self.bank.detach().cpu().clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.bank = None if state.get("bank") is None else state["bank"].clone()
        self.ptr = int(state.get("ptr", 0))


# ------------------------------------------------------------------------------------------------
# SafeCLIP's split: GMM posterior and the safe share
# ------------------------------------------------------------------------------------------------
def _gaussian_mixture():
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:  # pragma: no cover - the [defenses] extra is part of dev
        raise UserError("SafeCLIP needs scikit-learn: install clip-backdoor[defenses]") from None
    return GaussianMixture


def clean_probability(similarities: np.ndarray | torch.Tensor) -> tuple[np.ndarray, dict]:
    """p_clean of every pair: the posterior of the higher-mean component of a 2-component Gaussian
    mixture fitted (``random_state=0``) on the similarities sorted descending, as SafeCLIP fits them
    (the k-means initialisation depends on the order). Returns (p_clean in input order, fit summary)."""
    sims = np.asarray(similarities.cpu().numpy() if isinstance(similarities, torch.Tensor) else similarities)
    if sims.ndim != 1 or len(sims) < 2:
        raise UserError(f"SafeCLIP: the Gaussian mixture needs at least 2 similarities, got {sims.shape}")
    order = np.argsort(-sims, kind="stable")
    gmm = _gaussian_mixture()(n_components=2, random_state=0)
    gmm.fit(sims[order].reshape(-1, 1))
    high = int(np.argmax(gmm.means_))
    p = np.empty(len(sims), dtype=np.float64)
    p[order] = gmm.predict_proba(sims[order].reshape(-1, 1))[:, high]
    means = sorted(float(m) for m in gmm.means_.ravel())
    return p, {"mean_low": means[0], "mean_high": means[1]}


def next_share(share: float, step: float, cap: float) -> float:
    """SafeCLIP's ``filter_ratio = min(filter_ratio + update_filter_ratio, cap_filter_ratio)``."""
    return min(share + step, cap)


def safe_shares(first_share: float, epochs: int, step: float = 0.01, cap: float = 0.85) -> list[float]:
    """The safe share used in each of ``epochs`` filtering epochs, the first one's being whatever
    share the threshold selected."""
    shares, share = [], first_share
    for _ in range(epochs):
        shares.append(share)
        share = next_share(share, step, cap)
    return shares


def safe_rows(p_clean: np.ndarray, similarities: np.ndarray, *, threshold: float | None = None,
              share: float | None = None) -> np.ndarray:
    """Indices of the safe pairs: ``p_clean >= threshold``, or the top ``int(N * share)`` by p_clean
    (ties: the higher similarity first, then the lower index)."""
    if (threshold is None) == (share is None):
        raise ValueError("give exactly one of threshold and share")
    if threshold is not None:
        return np.flatnonzero(p_clean >= threshold)
    count = int(len(p_clean) * share)
    ranking = np.lexsort((np.arange(len(p_clean)), -np.asarray(similarities, dtype=np.float64), -p_clean))
    return np.sort(ranking[:count])


# ------------------------------------------------------------------------------------------------
# The recipes
# ------------------------------------------------------------------------------------------------
class DefenseRecipe(CleaningRecipe):
    """A named pre-training defence (parameters parsed and checked as a cleaning method's are)."""

    what = "defense"

    def check_schedule(self, epochs: int) -> None:
        """A schedule that does not fit in ``epochs`` is a user error naming the parameter."""

    def apply_to_config(self, cfg, explicit: set[str] = frozenset()):
        """A copy of ``cfg`` that runs this defence; the schedule must fit the run."""
        if cfg.method:
            raise UserError(f"defense {self.name}: a pre-training defence does not combine with a cleaning "
                            f"method (method={cfg.method})")
        if cfg.init_checkpoint:
            log.warning("defense %s starts from init_checkpoint %s: its warm-up epochs assume a fresh model",
                        self.name, cfg.init_checkpoint)
        if not cfg.objective.mmcl_weight > 0:
            raise UserError(f"defense {self.name} replaces the MMCL term, but objective.mmcl_weight is "
                            f"{cfg.objective.mmcl_weight}; pre-train with mmcl or mmcl+ssl")
        self.check_schedule(cfg.epochs)
        return dataclasses.replace(cfg, defense=self.name, defense_params=dict(self.params))


def _gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows (with gradient), so the defence sees the global batch as the objective does."""
    return tuple(all_gather_with_grad(t) for t in tensors)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(())


class SafeCLIP(DefenseRecipe):
    name = "safeclip"
    summary = ("in-modal warm-up (NN memory bank), one CLIP epoch at a low lr, then each epoch a GMM on "
               "pair similarities picks safe pairs for the CLIP loss; the rest get the in-modal loss")
    paper = ("5 in-modal + 1 multimodal warm-up epochs, filter_lr 5e-6, first safe set p_clean >= 0.9, "
             "share +0.01 per epoch up to 0.85, bank 256; 32 epochs, batch 128, lr 5e-4")
    defaults = {"inmodal_warmup": 5, "multimodal_warmup": 1, "filter_lr": 5e-6, "first_threshold": 0.9,
                "share_step": 0.01, "share_cap": 0.85, "bank_size": 256, "bank_seed": 0}
    wants_views = True

    def validate(self) -> None:
        p = self.params
        if not 0 <= p["first_threshold"] <= 1:
            raise UserError(f"defense {self.name}: --first-threshold must lie in [0, 1]")
        if not 0 <= p["share_cap"] <= 1:
            raise UserError(f"defense {self.name}: --share-cap must lie in [0, 1]")

    def __init__(self, **params: Any):
        super().__init__(**params)
        size, seed = self.params["bank_size"], self.params["bank_seed"]
        # one bank per modality; bank_size 0 = no bank (the view-1 embeddings are the positives)
        self.banks = ({"image": MemoryBank(size, 2 * seed), "text": MemoryBank(size, 2 * seed + 1)}
                      if size else {})
        self.share: float | None = None  # the share of the next filtering epoch (None: not reached yet)
        self.safe: set[str] = set()  # row ids of this epoch's safe pairs

    @property
    def warmup(self) -> int:
        return self.params["inmodal_warmup"] + self.params["multimodal_warmup"]

    def check_schedule(self, epochs: int) -> None:
        if self.warmup >= epochs:
            raise UserError(f"defense {self.name}: inmodal_warmup + multimodal_warmup = "
                            f"{self.params['inmodal_warmup']} + {self.params['multimodal_warmup']} leaves no "
                            f"filtering epoch in a run of epochs={epochs}; lower them or raise epochs")

    def phase(self, epoch: int) -> str:
        if epoch <= self.params["inmodal_warmup"]:
            return "inmodal"
        return "multimodal" if epoch <= self.warmup else "filtered"

    def adjust_lr(self, lr: float, ctx: RunContext) -> float:
        return self.params["filter_lr"] if self.phase(ctx.epoch) == "multimodal" else lr

    def on_epoch_start(self, ctx: RunContext) -> None:
        self.check_schedule(ctx.cfg.epochs)
        if self.phase(ctx.epoch) != "filtered":
            log.info("safeclip epoch %d: %s warm-up", ctx.epoch, self.phase(ctx.epoch))
            return
        from clip_backdoor.train.checkpoint import unwrap

        ids, sims_t = embed_images(unwrap(ctx.model), ctx.loader, ctx.device, ctx.env, pair_similarity=True)
        sims = sims_t.numpy()
        p_clean, fit = clean_probability(sims)
        first = ctx.epoch == self.warmup + 1
        if first:
            rows = safe_rows(p_clean, sims, threshold=self.params["first_threshold"])
            share = len(rows) / len(ids)
        else:
            share = self.share
            rows = safe_rows(p_clean, sims, share=share)
        self.share = next_share(share, self.params["share_step"], self.params["share_cap"])
        self.safe = {ids[i] for i in rows.tolist()}
        log.info("safeclip epoch %d: GMM means %.3f / %.3f; %d of %d pairs safe (share %.3f%s)", ctx.epoch,
                 fit["mean_low"], fit["mean_high"], len(rows), len(ids), share,
                 f", p_clean >= {self.params['first_threshold']:g}" if first else "")

    def inmodal_loss(self, u, u_aug, v, v_aug, s) -> torch.Tensor:
        """½[CE(s·Ũ Pᵤᵀ) + CE(s·Ṽ Pᵥᵀ)]: rows the view-2 embeddings, positives P the bank's nearest
        neighbours of the view-1 embeddings (the view-1 embeddings themselves without a bank)."""
        if self.banks:
            pu, pv = self.banks["image"].query(u), self.banks["text"].query(v)
            self.banks["image"].push(u)
            self.banks["text"].push(v)
        else:
            pu, pv = u, v
        return (contrastive_ce(s * u_aug @ pu.T) + contrastive_ce(s * v_aug @ pv.T)) / 2

    def losses(self, feats: dict, objective, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        phase = self.phase(ctx.epoch)
        if phase == "multimodal":
            return objective(**feats)
        s = feats["logit_scale"]
        u, v, u_aug, v_aug = _gather(feats["image_features"], feats["text_features"],
                                     feats["image_aug_features"], feats["text_aug_features"])
        if phase == "inmodal":
            loss = self.inmodal_loss(u, u_aug, v, v_aug, s)
            return {"loss": loss, "loss_inmodal": loss}
        safe = torch.tensor([rid in self.safe for rid in batch["row_ids"]], dtype=torch.float32,
                            device=u.device)
        (safe,) = _gather(safe)
        safe = safe > 0.5
        n, n_safe = len(safe), int(safe.sum())
        out: dict[str, torch.Tensor] = {}
        if objective.mmcl_weight > 0:
            out["loss_mmcl"] = mmcl_loss(u[safe], v[safe], s) if n_safe else _zero(u)
        if objective.uses_ssl:
            out["loss_ssl"] = (ssl_loss(u[safe], u_aug[safe], v[safe], v_aug[safe], s,
                                        symmetric=objective.ssl_symmetric) if n_safe else _zero(u))
        clip_term = objective.mmcl_weight * out.get("loss_mmcl", _zero(u)) + \
            objective.ssl_weight * out.get("loss_ssl", _zero(u))
        unsafe = ~safe
        out["loss_inmodal"] = (self.inmodal_loss(u[unsafe], u_aug[unsafe], v[unsafe], v_aug[unsafe], s)
                               if n > n_safe else _zero(u))
        loss = (n_safe / n) * clip_term + ((n - n_safe) / n) * out["loss_inmodal"]
        return {"loss": loss, **out}

    def state_dict(self) -> dict:
        return {"share": self.share, "banks": {m: b.state_dict() for m, b in self.banks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.share = state.get("share")
        for m, b in self.banks.items():
            if m in state.get("banks", {}):
                b.load_state_dict(state["banks"][m])


class RoCLIP(DefenseRecipe):
    name = "roclip"
    summary = ("every period-th epoch, match each image with the nearest caption embedding (to the image "
               "embedding) in a FIFO pool of recent captions, then the CLIP loss")
    paper = "period (break_epoch) 2, pool 21,845 captions, --cross_aug; 24 epochs, batch 512, lr 5e-5"
    defaults = {"period": 2, "pool_size": 21845, "augment": True, "pool_seed": 0}

    def validate(self) -> None:
        if self.params["period"] < 1:
            raise UserError(f"defense {self.name}: --period must be >= 1")
        if self.params["pool_size"] < 1:
            raise UserError(f"defense {self.name}: --pool-size must be >= 1")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.wants_views = bool(self.params["augment"])  # the loop then makes the augmented views
        self.pool = MemoryBank(self.params["pool_size"], self.params["pool_seed"])

    def check_schedule(self, epochs: int) -> None:
        if self.params["period"] > epochs:
            raise UserError(f"defense {self.name}: period={self.params['period']} exceeds epochs={epochs}, "
                            "so no epoch would use the caption pool; lower it or raise epochs")

    def matches(self, epoch: int) -> bool:
        """Whether this (1-based) epoch pairs images with pool captions (the reference's
        ``current_epoch % break_epoch == 0``)."""
        return epoch % self.params["period"] == 0

    def on_epoch_start(self, ctx: RunContext) -> None:
        self.check_schedule(ctx.cfg.epochs)

    def nn_clip_loss(self, u: torch.Tensor, v: torch.Tensor, s) -> torch.Tensor:
        """½[CE(s·U Pᵀ) + CE(s·P Uᵀ)], P[i] the pool's caption nearest to image i; then V joins the pool."""
        p = self.pool.query(u)
        self.pool.push(v)
        logits = s * u @ p.T
        return (contrastive_ce(logits) + contrastive_ce(logits.T)) / 2

    def losses(self, feats: dict, objective, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        s = feats["logit_scale"]
        key = "image_aug_features" if self.params["augment"] else "image_features"
        u, v = _gather(feats[key], feats[key.replace("image", "text")])
        out: dict[str, torch.Tensor] = {}
        if self.matches(ctx.epoch):
            out["loss_roclip"] = term = self.nn_clip_loss(u, v, s)
            # The pool entries are constants, so nothing reaches the text tower; DDP needs every
            # parameter in the graph, hence the reference's `0 * criterion(logits_text_per_image_zero)`.
            term = term + 0.0 * contrastive_ce(s * u @ v.T)
        else:
            out["loss_mmcl"] = term = mmcl_loss(u, v, s)
        loss = objective.mmcl_weight * term
        if objective.uses_ssl:
            u0, v0, u1, v1 = _gather(feats["image_features"], feats["text_features"],
                                     feats["image_aug_features"], feats["text_aug_features"])
            out["loss_ssl"] = ssl_loss(u0, u1, v0, v1, s, symmetric=objective.ssl_symmetric)
            loss = loss + objective.ssl_weight * out["loss_ssl"]
        return {"loss": loss, **out}

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "pool" in state:
            self.pool.load_state_dict(state["pool"])


DEFENSES: dict[str, type[DefenseRecipe]] = {r.name: r for r in (SafeCLIP, RoCLIP)}


def build_defense(name: str, params: dict | None = None) -> DefenseRecipe:
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; available: {', '.join(DEFENSES)}")
    return DEFENSES[name](**(params or {}))


def describe_all() -> list[str]:
    return [cls.describe() for cls in DEFENSES.values()]

