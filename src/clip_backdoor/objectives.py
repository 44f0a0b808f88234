"""Training objectives: the CLIP loss (MMCL), CleanCLIP's in-modal SSL term, and weighted sums of both.

Notation (docs/INTERFACES.md, REFERENCE.md "Objectives"): U, V are the L2-normalised image / text
embeddings of the original pairs, Ũ, Ṽ those of an augmented view of the same images / captions,
s = exp(logit_scale) the learned temperature, N the global batch, and
CE(Z) = mean over rows i of −log softmax(Z_i)[i].

    L_mmcl = ½ [CE(s·U Vᵀ) + CE(s·V Uᵀ)]          on the un-augmented views
    L_ssl  = ½ [CE(s·U Ũᵀ) + CE(s·V Ṽᵀ)]          rows: originals, columns: augmented views
    loss   = mmcl_weight · L_mmcl + ssl_weight · L_ssl

``ssl_symmetric=True`` also averages in the reverse direction of each modality (CE(s·Ũ Uᵀ), CE(s·Ṽ Vᵀ));
it is an option, the reference term is one-directional.

One forward pass for both views. The training step runs originals and augmented views through the
model together and splits the features afterwards::

    out = model(image=torch.cat([images, images_aug]), text=torch.cat([texts, texts_aug]))
    U, U_aug = split_views(out["image_features"], len(images))
    V, V_aug = split_views(out["text_features"], len(texts))
    losses = objective(image_features=U, text_features=V, image_aug_features=U_aug,
                       text_aug_features=V_aug, logit_scale=out["logit_scale"])

This is what the reference does; it matters beyond speed because BatchNorm layers (ModifiedResNet)
then normalise both views with the statistics of the combined batch.

Distributed. Features passed to an ``Objective`` are this rank's local batch. When
``torch.distributed`` is initialised with more than one rank, they are gathered over ranks with
gradient (``all_gather_with_grad``) and every rank computes the loss of the *global* batch, so the
reported loss is the full-batch loss and, after DDP's usual gradient averaging, parameter gradients
equal single-process full-batch gradients. Gathering is a collective: every rank must call the
objective at the same step (never from rank 0 alone). The plain functions ``mmcl_loss`` /
``ssl_loss`` never communicate: they compute the loss of exactly the tensors they are given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clip_backdoor.errors import UserError

# Named objectives -> (mmcl_weight, ssl_weight); REFERENCE.md: λ1 = λ2 = 1 by default, SSL-only = λ1 0.
NAMED_OBJECTIVES: dict[str, tuple[float, float]] = {
    "mmcl": (1.0, 0.0),
    "mmcl+ssl": (1.0, 1.0),
    "ssl": (0.0, 1.0),
}


# --- the losses -------------------------------------------------------------------------------------


def contrastive_ce(logits: torch.Tensor) -> torch.Tensor:
    """CE(Z): mean over rows i of −log softmax(Z_i)[i] — row i's positive is column i."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def mmcl_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """The CLIP loss ½[CE(s·U Vᵀ) + CE(s·V Uᵀ)] of the given (already gathered) features."""
    image_features, text_features = _as_loss_dtype(image_features, text_features)
    _check_pair(image_features, text_features, "image_features", "text_features")
    logits_per_image = _scaled(logit_scale) * image_features @ text_features.T
    return (contrastive_ce(logits_per_image) + contrastive_ce(logits_per_image.T)) / 2


def ssl_loss(
    image_features: torch.Tensor,
    image_aug_features: torch.Tensor,
    text_features: torch.Tensor,
    text_aug_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    symmetric: bool = False,
) -> torch.Tensor:
    """CleanCLIP's in-modal term ½[CE(s·U Ũᵀ) + CE(s·V Ṽᵀ)] of the given (already gathered) features.

    Rows are the original views, columns the augmented ones, so a sample's negatives are the other
    samples' augmented views only. ``symmetric=True`` averages each modality's term with its reverse
    direction CE(s·Ũ Uᵀ) (not the reference's definition).
    """
    u, u_aug, v, v_aug = _as_loss_dtype(image_features, image_aug_features, text_features, text_aug_features)
    _check_pair(u, u_aug, "image_features", "image_aug_features")
    _check_pair(v, v_aug, "text_features", "text_aug_features")
    s = _scaled(logit_scale)
    return (_in_modal(s * u @ u_aug.T, symmetric) + _in_modal(s * v @ v_aug.T, symmetric)) / 2


def _in_modal(logits: torch.Tensor, symmetric: bool) -> torch.Tensor:
    if symmetric:
        return (contrastive_ce(logits) + contrastive_ce(logits.T)) / 2
    return contrastive_ce(logits)


def _as_loss_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # log-sum-exp over a few thousand logits of size up to 100 is not safe in 16-bit floats;
    # float32 and float64 inputs are kept as they are (float64 for gradient checks).
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def _scaled(logit_scale: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(())
    return float(logit_scale)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(
            f"{name_a} and {name_b} must be non-empty [batch, dim] tensors of the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# --- one forward pass for both views ----------------------------------------------------------------


def split_views(features: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the features of a concatenated batch ``[x; x_aug]`` into (originals, augmented views).

    ``n`` is the number of originals; the augmented half must have the same size.
    """
    if features.shape[0] != 2 * n:
        raise ValueError(
            f"expected features of 2 x {n} rows ([originals; augmented]), got {features.shape[0]}"
        )
    return features[:n], features[n:]


# --- gathering over ranks with gradient --------------------------------------------------------------


def distributed_world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank order), differentiably.

    Ranks may hold different numbers of rows. Without a process group (or with one rank) the tensor
    is returned as it is.
    """
    if distributed_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduce-sums the gradient and keeps this rank's rows.

    Why the sum is the right factor: every rank r computes the same global loss L from the gathered
    features G = [U_0; …; U_{W-1}], so each rank holds the same dL/dG. Summing over W ranks gives
    W·dL/dG, and rank r keeps W·dL/dU_r; its parameters θ therefore receive W·(dL/dU_r)(dU_r/dθ).
    DDP then averages parameter gradients over ranks: (1/W)·Σ_r W·(dL/dU_r)(dU_r/dθ) = dL/dθ, the
    single-process full-batch gradient. Parameters that enter L directly on every rank (the logit
    scale) get dL/ds on each rank, whose average is again dL/ds. Summing, rather than multiplying
    by W, also stays right if ranks were ever to compute different losses (as with open_clip's
    local_loss). Written here rather than torch.distributed.nn.all_gather because that backward
    needs reduce_scatter or all_to_all from the backend; all_reduce works on gloo and nccl alike.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        # Row counts first, so that ranks with unequal batches pad to the largest and trim after.
        local_rows = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        all_rows = [torch.empty_like(local_rows) for _ in range(world)]
        dist.all_gather(all_rows, local_rows)
        rows = [int(r.item()) for r in all_rows]
        padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        ctx.start, ctx.rows = sum(rows[:rank]), tensor.shape[0]
        return torch.cat([piece[:r] for piece, r in zip(pieces, rows)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows]


def _gather_columns(*features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # One collective for all views: stack them side by side, gather once, split back.
    if distributed_world_size() == 1:
        return features
    widths = [f.shape[1] for f in features]
    gathered = all_gather_with_grad(torch.cat(features, dim=1))
    return tuple(gathered.split(widths, dim=1))


# --- the objective the training loop calls -----------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """Weighted sum ``mmcl_weight·L_mmcl + ssl_weight·L_ssl``; a term of weight 0 is never computed.

    Build one with ``Objective(...)``, ``Objective.from_name("mmcl" | "mmcl+ssl" | "ssl")``,
    ``Objective.from_weights({"mmcl": 1, "ssl": 2})`` or ``Objective.from_spec(name_or_mapping)``.
    """

    mmcl_weight: float = 1.0
    ssl_weight: float = 0.0
    ssl_symmetric: bool = False

    def __post_init__(self) -> None:
        for key in ("mmcl_weight", "ssl_weight"):
            value = getattr(self, key)
            is_number = isinstance(value, Real) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value) or value < 0:
                raise UserError(f"objective: {key} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.mmcl_weight == 0 and self.ssl_weight == 0:
            raise UserError("objective: mmcl_weight and ssl_weight are both 0, nothing to train on")
        if not isinstance(self.ssl_symmetric, bool):
            raise UserError(f"objective: ssl_symmetric must be true or false, got {self.ssl_symmetric!r}")

    @classmethod
    def from_name(cls, name: str, *, ssl_symmetric: bool = False) -> Objective:
        """``mmcl`` (CLIP), ``mmcl+ssl`` (CleanCLIP's, weights 1 and 1) or ``ssl`` (in-modal term only)."""
        key = str(name).strip().lower()
        if key not in NAMED_OBJECTIVES:
            raise UserError(f"objective: unknown name {name!r}; choose one of {', '.join(NAMED_OBJECTIVES)}")
        mmcl_weight, ssl_weight = NAMED_OBJECTIVES[key]
        return cls(mmcl_weight=mmcl_weight, ssl_weight=ssl_weight, ssl_symmetric=ssl_symmetric)

    @classmethod
    def from_weights(cls, weights: Mapping[str, object]) -> Objective:
        """From ``{"mmcl": w1, "ssl": w2, "ssl_symmetric": bool}``; a term left out has weight 0."""
        allowed = ("mmcl", "ssl", "ssl_symmetric")
        for key in weights:
            if key not in allowed:
                raise UserError(f"objective: unknown key {key!r}; allowed keys are {', '.join(allowed)}")
        return cls(
            mmcl_weight=weights.get("mmcl", 0.0),  # type: ignore[arg-type]
            ssl_weight=weights.get("ssl", 0.0),  # type: ignore[arg-type]
            ssl_symmetric=weights.get("ssl_symmetric", False),  # type: ignore[arg-type]
        )

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, object] | Objective) -> Objective:
        """A name, a weights mapping or an ``Objective`` (as a config may hold any of them)."""
        if isinstance(spec, Objective):
            return spec
        if isinstance(spec, str):
            return cls.from_name(spec)
        if isinstance(spec, Mapping):
            return cls.from_weights(spec)
        raise UserError(f"objective: expected a name or a mapping of weights, got {type(spec).__name__}")

    @property
    def uses_ssl(self) -> bool:
        """True iff the SSL term is active, i.e. the training step must produce augmented views."""
        return self.ssl_weight > 0

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the active terms, e.g. ``("mmcl", "ssl")``."""
        return tuple(t for t, w in (("mmcl", self.mmcl_weight), ("ssl", self.ssl_weight)) if w > 0)

    @property
    def name(self) -> str:
        """``mmcl``, ``ssl`` or ``mmcl+ssl`` — the active terms, whatever their weights."""
        return "+".join(self.terms)

    def describe(self) -> dict[str, object]:
        """Flat, JSON-able description for resolved configs and metrics."""
        return {
            "objective": self.name,
            "mmcl_weight": self.mmcl_weight,
            "ssl_weight": self.ssl_weight,
            "ssl_symmetric": self.ssl_symmetric,
        }

    def __call__(
        self,
        *,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        image_aug_features: torch.Tensor | None = None,
        text_aug_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss": weighted total, "loss_mmcl": ..., "loss_ssl": ...}`` over the global batch.

        Features are this rank's normalised embeddings; augmented views are needed (and read) only
        when ``uses_ssl``.
        """
        views = [image_features, text_features]
        if self.uses_ssl:
            if image_aug_features is None or text_aug_features is None:
                raise UserError(
                    f"objective {self.name!r} has an SSL term but the training step gave no augmented views "
                    "(image_aug_features / text_aug_features); enable augmented views in the data config"
                )
            _check_pair(image_features, image_aug_features, "image_features", "image_aug_features")
            _check_pair(text_features, text_aug_features, "text_features", "text_aug_features")
            views += [image_aug_features, text_aug_features]
        _check_pair(image_features, text_features, "image_features", "text_features")

        gathered = _gather_columns(*_as_loss_dtype(*views))
        losses: dict[str, torch.Tensor] = {}
        if self.mmcl_weight > 0:
            losses["loss_mmcl"] = mmcl_loss(gathered[0], gathered[1], logit_scale)
        if self.uses_ssl:
            u, v, u_aug, v_aug = gathered
            losses["loss_ssl"] = ssl_loss(u, u_aug, v, v_aug, logit_scale, symmetric=self.ssl_symmetric)
        weights = {"loss_mmcl": self.mmcl_weight, "loss_ssl": self.ssl_weight}
        total = sum(weights[key] * value for key, value in losses.items())
        return {"loss": total, **losses}  # type: ignore[dict-item]
