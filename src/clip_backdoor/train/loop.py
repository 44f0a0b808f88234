"""The one training loop. Pre-training and cleaning are both "this loop": cleaning starts from a
checkpoint's weights, usually evaluates before its first step (epoch 0) and may bring a recipe.

Read it top to bottom: 1. processes and device  2. data  3. model  4. optimizer  5. resume
6. epochs (step, evaluate, log, checkpoint).

Determinism: the data order depends on (seed, epoch), every augmentation on (seed, step) or
(seed, row, epoch), never on global RNG state. So resuming from the end of epoch k replays
epochs k+1.. exactly like an uninterrupted run (same thread count). A mid-epoch checkpoint
(``save_every_steps``, or a preemption signal: ``train/preempt.py``) also holds the position within
the epoch and the epoch's running loss sums, so the resumed epoch continues at the next batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clip_backdoor.card import run_record, unlearned_line
from clip_backdoor.config import RESOLVED_KEY, TrainConfig, check_bounds, dump_yaml, to_dict
from clip_backdoor.data.transforms import normalize
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_write_text, read_jsonl, remove_stale_temps, write_jsonl
from clip_backdoor.objectives import Objective
from clip_backdoor.train import distributed as D
from clip_backdoor.train import preempt, scalars
from clip_backdoor.train.checkpoint import checkpoint_dir, latest_path, plain, save_checkpoint, unwrap
from clip_backdoor.train.optim import build_optimizer, lr_at, schedule_warning, set_lr

log = logging.getLogger(__name__)

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunContext:
    """What a recipe hook may look at (and the loop's own bookkeeping)."""

    cfg: TrainConfig
    env: D.DistEnv
    device: torch.device
    model: torch.nn.Module  # possibly DDP-wrapped; use unwrap(model) for the bare CLIP
    loader: Any
    objective: Objective
    optimizer: torch.optim.Optimizer | None = None  # the model's (a recipe may add a param group to it)
    epoch: int = 0
    step: int = 0
    extra: dict = field(default_factory=dict)


class Recipe:
    """Hooks a cleaning method or a pre-training defence may override; the default does nothing
    (plain pre-training)."""

    name: str | None = None
    params: dict = {}
    # True when prepare_model changes the weights (shrink-perturb): epoch 0 is then not the starting
    # checkpoint, and its metrics row says so (``init: transformed``), so nobody takes it as the baseline.
    transforms_weights: bool = False

    def prepare_model(self, model: torch.nn.Module, ctx: RunContext) -> None:
        """Called once on a fresh start (never on resume), before the optimizer is built."""

    def setup(self, model: torch.nn.Module, ctx: RunContext) -> None:
        """Called on every start, fresh or resumed, after ``prepare_model`` and before the optimizer:
        build what the checkpoint does not hold (e.g. a frozen copy of the starting model)."""

    def learning_rate(self, step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step``; the loop's warm-up + cosine by default."""
        return lr_at(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps)

    def transform_images(self, images: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """Float [0, 1] batch images before the forward pass (and before SSL views are drawn)."""
        return images

    def extra_forward(self, inputs: dict, ctx: RunContext) -> dict:
        """Called under the step's autocast right after the model's forward, with exactly its inputs
        ({"image": normalised images, "text": tokens}); what it returns joins the model's outputs
        passed to ``extra_losses`` (e.g. a frozen model's embeddings, computed under no_grad)."""
        return {}

    def on_epoch_start(self, ctx: RunContext) -> None:
        """Called before each training epoch (e.g. recompute pseudo-labels)."""

    def on_epoch_end(self, ctx: RunContext) -> None:
        """Called after each training epoch, before evaluation and the checkpoint (e.g. to take a
        per-epoch param group out of the optimizer, so the checkpoint's optimizer fits a fresh one)."""

    def extra_losses(self, outputs: dict, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Additional weighted loss terms, {name: tensor}; summed into the loss and logged.
        A name starting with ``stat_`` is logged only, never summed (e.g. a distance before its cap)."""
        return {}

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of the recipe's own parameters (e.g. a clustering head), stepped with the model's."""
        return []

    def parameters_outside_model(self) -> list[torch.nn.Parameter]:
        """Recipe parameters stepped by the model's optimizer but not inside the (DDP-wrapped) model:
        the loop averages their gradients over ranks by hand."""
        return []

    # -- pre-training defences (clip_backdoor.defenses): the loss, the views, the lr ------------
    wants_views = False  # True: make augmented views (image + caption) even if the objective has no SSL

    def losses(self, feats: dict, objective: Objective, batch: dict,
               ctx: RunContext) -> dict[str, torch.Tensor]:
        """The batch's loss terms from its features ({"loss": total, "loss_<term>": ...}); a recipe may
        replace the objective's, e.g. per sample. Called on every rank at every step (DDP collectives)."""
        return objective(**feats)

    def adjust_lr(self, lr: float, ctx: RunContext) -> float:
        """The learning rate of this step, given the schedule's (e.g. a constant low lr for one epoch)."""
        return lr

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def resume_mid_epoch(self, state: dict, ctx: RunContext) -> None:
        """Restore what ``state_dict()`` returned inside an epoch (a mid-epoch checkpoint), before the
        optimizer's state is loaded; on_epoch_start is then not called again for that epoch. A recipe
        that adds a param group to ``ctx.optimizer`` adds it back here."""
        self.load_state_dict(state)


def resolve_device(name: str, env: D.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and env.enabled:
        name = f"cuda:{env.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available (use device=cpu)")
    return torch.device(name)


def view_seed(cfg: TrainConfig) -> int:
    """The seed of a run's SSL views (EDA captions, image AutoAugment draws). A cleaning run (one that
    starts from a checkpoint) draws its own fresh views, not a replay of its pre-training's, which has
    the same training seed; pre-training keeps ``seed`` itself."""
    if not cfg.init_checkpoint:
        return cfg.seed
    digest = hashlib.blake2b(f"clean-views|{cfg.seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the image views drawn at a global step on a rank: a pure function, so resume
    replays it, and ranks differ (the same seed would give every rank the same sub-policy draws)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 17) % (2**63 - 1)


def train(cfg: TrainConfig, recipe: Recipe | None = None) -> dict:
    """Run (or resume, or report finished) one training run; returns the last metrics line.

    Raises :class:`~clip_backdoor.train.preempt.Preempted` after SIGTERM/SIGUSR1/SIGUSR2, once the
    current step is done and a resumable checkpoint is written."""
    with preempt.Guard() as guard:
        return _train(cfg, recipe, guard)


def _train(cfg: TrainConfig, recipe: Recipe | None, guard: preempt.Guard) -> dict:
    recipe = recipe or Recipe()
    check_bounds(cfg)  # configs built in code (study, recipes, API users) pass the loader's checks too
    run_dir = Path(cfg.run_dir)

    # 1. Processes and device --------------------------------------------------------------
    device_kind = "cuda" if cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = D.init_distributed(device_kind)
    device = resolve_device(cfg.device, env)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision not in _AUTOCAST:
        raise UserError(f"precision {cfg.precision!r}: choose fp32, bf16 or fp16")
    if cfg.optimizer_state not in ("fresh", "inherit"):
        raise UserError(f"optimizer_state {cfg.optimizer_state!r}: choose fresh or inherit")
    if env.is_main:  # what a killed run of this directory left half-written (never a live writer's)
        remove_stale_temps(run_dir, checkpoint_dir(run_dir))
    scalars.check_report_to(cfg.report_to)
    last_epoch = min(cfg.epochs, cfg.stop_epoch or cfg.epochs)  # the schedule is always `epochs` long

    # A finished run is reported, not retrained.
    latest = latest_path(run_dir)
    resume_ckpt = None
    if cfg.resume and latest.exists():
        from clip_backdoor.weights import load_checkpoint

        resume_ckpt = load_checkpoint(latest)
        _check_epochs_unchanged(resume_ckpt, cfg, latest)
        if resume_ckpt["epoch"] >= last_epoch:
            lines = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            state = "finished" if resume_ckpt["epoch"] >= cfg.epochs else f"paused (stop_epoch {last_epoch})"
            log.info("%s is %s (epoch %d of %d); nothing to do", run_dir, state, resume_ckpt["epoch"],
                     cfg.epochs)
            return lines[-1] if lines else {"epoch": resume_ckpt["epoch"]}

    # 2. Data -------------------------------------------------------------------------------
    model, init_ckpt = _build_model(cfg, device)
    objective = Objective(mmcl_weight=cfg.objective.mmcl_weight, ssl_weight=cfg.objective.ssl_weight,
                          ssl_symmetric=cfg.objective.ssl_symmetric)
    with_views = objective.uses_ssl or recipe.wants_views  # a defence may need views the objective does not
    batch_per_rank = per_rank_batch(cfg.batch_size, env.world_size)
    loader = build_loader(cfg, image_size=model.image_size, context_length=model.context_length,
                          env=env, with_text_view=with_views, batch_size=batch_per_rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"data: {loader.source.num_samples} samples give no full global batch of "
                        f"{cfg.batch_size} ({env.world_size} rank(s) x {batch_per_rank}); lower batch_size")
    total_steps = cfg.epochs * steps_per_epoch
    if env.is_main and (warning := schedule_warning(cfg.optim.warmup_steps, total_steps)):
        log.warning(warning)
    image_view = _image_view(cfg) if with_views else None
    eval_set, trigger = _eval_parts(cfg, model.image_size)

    # 3. Model ------------------------------------------------------------------------------
    ctx = RunContext(cfg=cfg, env=env, device=device, model=model, loader=loader, objective=objective)
    if resume_ckpt is None:
        recipe.prepare_model(model, ctx)
    recipe.setup(model, ctx)  # fresh or resumed: what a recipe keeps outside the checkpoint
    if env.enabled:
        D.align_grad_layouts(model)  # DDP's buckets then match the channels-last gradients: no copies
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        ctx.model = model

    # 4. Optimizer --------------------------------------------------------------------------
    o = cfg.optim
    optimizer = build_optimizer(unwrap(model), lr=o.lr, weight_decay=o.weight_decay,
                                betas=(o.beta1, o.beta2), eps=o.eps)
    ctx.optimizer = optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    if resume_ckpt is None and init_ckpt is not None and cfg.optimizer_state == "inherit":
        _inherit_optimizer(optimizer, init_ckpt, o.weight_decay)

    # 5. Resume -----------------------------------------------------------------------------
    start_epoch, step = 0, 0
    mid_epoch = None  # where a mid-epoch checkpoint stopped inside epoch start_epoch + 1
    metrics_path = run_dir / "metrics.jsonl"
    if resume_ckpt is not None:
        unwrap(model).load_state_dict(resume_ckpt["state_dict"])
        mid_epoch = preempt_resume_point(resume_ckpt, steps_per_epoch, env)
        if mid_epoch and mid_epoch["recipe_restored"]:  # --- preemption: before the optimizer's state,
            recipe.resume_mid_epoch(resume_ckpt["recipe"], ctx)  # which may hold the recipe's group
        else:
            recipe.load_state_dict(resume_ckpt.get("recipe") or {})
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, step = resume_ckpt["epoch"], resume_ckpt["step"]
        _warn_config_drift(resume_ckpt.get("config") or {}, to_dict(cfg))
        if env.is_main and metrics_path.exists():  # drop lines written after the checkpoint
            write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["epoch"] <= start_epoch])
        where = f", batch {mid_epoch['batches']} of epoch {start_epoch + 1}" if mid_epoch else ""
        log.info("resuming %s from epoch %d (step %d%s)", run_dir, start_epoch, step, where)
    elif env.is_main:
        if metrics_path.exists():
            metrics_path.unlink()  # a fresh start owns its metrics file
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg) + dump_yaml({RESOLVED_KEY: {
            "world_size": env.world_size, "batch_size": cfg.batch_size, "batch_size_per_rank": batch_per_rank,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}}))
    if env.is_main:  # what this run runs on, once per start (a resume in another environment is added)
        from clip_backdoor.environment import collect, record_environment

        record_environment(run_dir, collect(device, env.world_size), start_epoch=start_epoch,
                           fresh=resume_ckpt is None)

    method = {"name": recipe.name, **recipe.params} if recipe.name else None
    model_name = (init_ckpt or {}).get("model", {}).get("name") if init_ckpt else cfg.model
    model_meta = {"name": model_name, **unwrap(model).config}
    # What the run is (data, poisoning, method, starting checkpoint): `clip-backdoor inspect` reads it.
    record = run_record(to_dict(cfg), num_samples=loader.source.num_samples, init_ckpt=init_ckpt,
                        method=method)
    writer = scalars.open_writer(cfg.report_to, run_dir, is_main=env.is_main,
                                 resume_step=step if resume_ckpt is not None else None)

    def emit(row: dict) -> None:
        if method:
            row["method"] = method
        if env.is_main:
            rows = read_jsonl(metrics_path) if metrics_path.exists() else []
            write_jsonl(metrics_path, rows + [row])
            log.info(_summary_line(row, cfg.epochs))  # one line per epoch, not one per rank
        writer.add_epoch(row)  # rank 0 alone writes (a null writer elsewhere)

    # Epoch 0: the starting point of a cleaning run, evaluated before any step.
    if start_epoch == 0 and cfg.eval_at_start and mid_epoch is None:  # (a mid-epoch-1 resume has it)
        row = {"epoch": 0, "step": 0, **_scale_fields(unwrap(model))}
        if recipe.transforms_weights:
            row["init"] = "transformed"
        row.update(_start_evaluation(model, eval_set, trigger, cfg, device, env, recipe))
        emit(row)

    # 6. Epochs -----------------------------------------------------------------------------
    autocast_dtype = _AUTOCAST[cfg.precision]
    last_save = time.monotonic()
    row: dict = {}
    def checkpoint(epoch: int, metrics: dict | None = None, mid: dict | None = None) -> dict:
        """The checkpoint after ``epoch`` epochs (and ``mid``: the position inside the next one)."""
        return {"epoch": epoch, "step": step, "model": model_meta,
                "state_dict": plain(unwrap(model).state_dict()),
                "optimizer": plain(optimizer.state_dict()),
                "scheduler": {"kind": _schedule_kind(recipe), "base_lr": o.lr,
                              "warmup_steps": o.warmup_steps, "total_steps": total_steps},
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": {"torch": torch.get_rng_state()}, "recipe": recipe.state_dict(),
                "config": to_dict(cfg), **record, "metrics": metrics, **({"mid_epoch": mid} if mid else {})}

    def save_mid_epoch(epoch: int, stop: bool) -> None:
        """latest.pt at this step inside ``epoch``; ``stop``: then raise Preempted."""
        batches = step - (epoch - 1) * steps_per_epoch
        if stop or batches < steps_per_epoch:  # (the epoch end saves anyway)
            ranks = preempt.gather(  # each rank's running sums, for an exact epoch row
                {"sums": dict(sums), "n_seen": n_seen, "n_skipped": n_skipped}, env)
            if env.is_main:
                save_checkpoint(latest, checkpoint(epoch - 1, mid={
                    "epoch": epoch, "batches": batches, "steps_per_epoch": steps_per_epoch,
                    "world_size": env.world_size, "seconds": time.perf_counter() - t0, "lr": lr,
                    "ranks": ranks}))
        D.barrier(env)
        if stop:
            raise preempt.Preempted(guard.signum, step, str(latest))

    for epoch in range(start_epoch + 1, last_epoch + 1):
        ctx.epoch, ctx.step = epoch, step
        mid, mid_epoch = mid_epoch, None  # preemption: only the first resumed epoch starts mid-way
        loader.set_epoch(epoch)
        if not (mid and mid["recipe_restored"]):  # a restored recipe already holds this epoch's state
            recipe.on_epoch_start(ctx)
        model.train()
        mine = mid["ranks"][env.rank] if mid else {"sums": {}, "n_seen": 0, "n_skipped": 0}
        sums: dict[str, float] = dict(mine["sums"])
        n_seen, n_skipped = mine["n_seen"], mine["n_skipped"]
        t0 = time.perf_counter() - (mid["seconds"] if mid else 0.0)
        lr = mid["lr"] if mid else o.lr
        if mid:
            loader.set_epoch(epoch, start_batch=mid["batches"])
        bar = tqdm(guard.batches(loader, env), total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   leave=False, initial=mid["batches"] if mid else 0,
                   disable=not env.is_main or not sys.stderr.isatty(), mininterval=1.0)
        for batch in bar:
            ctx.step = step
            # the schedule (the loop's, or a recipe's own), then a recipe's per-epoch change of it
            lr = recipe.adjust_lr(recipe.learning_rate(step, base_lr=o.lr, warmup_steps=o.warmup_steps,
                                                       total_steps=total_steps), ctx)
            set_lr(optimizer, lr)
            losses = _forward_losses(model, batch, objective, image_view, recipe, ctx, device,
                                     autocast_dtype)
            loss = losses["loss"]
            bad_here = not torch.isfinite(loss)
            if D.any_rank(bad_here, env, device):  # every rank stops together, none waits in DDP
                good = latest if latest.exists() else None
                what = f"loss became {loss.item()}" if bad_here else "another rank's loss became non-finite"
                raise UserError(f"{what} at step {step} (epoch {epoch}); run stopped, last good checkpoint: "
                                f"{good or 'none yet'}")
            extra_opts = recipe.extra_optimizers()
            for opt in [optimizer, *extra_opts]:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            _average_grads(recipe.parameters_outside_model(), env)  # DDP does not see them
            if o.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            scaler.step(optimizer)
            for opt in extra_opts:  # not DDP-wrapped: average their gradients by hand
                _average_grads([p for g in opt.param_groups for p in g["params"]], env)
                scaler.step(opt)
            scaler.update()
            unwrap(model).clamp_logit_scale()
            step += 1
            values = {k: v.item() for k, v in losses.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            writer.add_step(step, {**values, "lr": lr})
            n_seen += batch["images"].shape[0]
            n_skipped += int(batch.get("n_skipped", 0))
            if env.is_main and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            # --- preemption: a signal (or save_every_steps) writes an exact mid-epoch checkpoint
            stop = guard.stop(env, device)
            if stop or (cfg.save_every_steps and step % cfg.save_every_steps == 0):
                save_mid_epoch(epoch, stop)
        if step < epoch * steps_per_epoch and guard.signum is not None:  # --- preemption: the signal also
            # ended the loader's workers before the epoch's end
            save_mid_epoch(epoch, True)
        seconds = time.perf_counter() - t0
        recipe.on_epoch_end(ctx)

        row = {"epoch": epoch, "step": step, "batch_size": cfg.batch_size,
               "batch_size_per_rank": batch_per_rank, "world_size": env.world_size}
        # Averaged over ranks: gathered terms are equal on every rank; a recipe's local term (e.g. the
        # clustering loss on each rank's slice) becomes its global-batch mean.
        row.update({k: D.all_reduce_mean(v, env, device) / steps_per_epoch for k, v in sums.items()})
        row.update({"lr": lr, **_scale_fields(unwrap(model)),
                    "samples_per_s": D.all_reduce_sum_int(n_seen, env, device) / seconds,
                    "seconds": seconds, "n_skipped": D.all_reduce_sum_int(n_skipped, env, device)})
        if row["n_skipped"]:
            log.warning("epoch %d: skipped %d unreadable samples", epoch, row["n_skipped"])
        periodic = cfg.eval.every and (epoch % cfg.eval.every == 0 or epoch == cfg.epochs)
        if periodic or epoch in cfg.eval.epochs:
            row.update(_evaluate(model, eval_set, trigger, cfg, device, env))
        emit(row)

        # latest.pt only resumes: between epochs it may wait checkpoint_interval_s (a resume from an
        # older one replays the epochs after it exactly); the last epoch's is always written, and so is
        # a paused run's (stop_epoch) and a stopping one's (preemption).
        stopping = epoch < last_epoch and guard.stop(env, device)
        due = (epoch >= last_epoch or stopping or not cfg.checkpoint_interval_s
               or time.monotonic() - last_save >= cfg.checkpoint_interval_s)
        keep = (cfg.save_every and epoch % cfg.save_every == 0) or epoch in cfg.save_epochs
        if env.is_main and (due or keep):
            ckpt = checkpoint(epoch, metrics=row)
            if keep:
                save_checkpoint(checkpoint_dir(run_dir) / f"epoch_{epoch}.pt", ckpt)
            if due:
                save_checkpoint(latest, ckpt)  # last, so latest.pt never points past a missing file
                last_save = time.monotonic()
        D.barrier(env)
        if stopping:  # preemption between epochs: this one is saved
            raise preempt.Preempted(guard.signum, step, str(latest))

    writer.close()
    if env.is_main and (note := unlearned_line(to_dict(cfg), record, read_jsonl(metrics_path))):
        log.warning(note)
    D.cleanup(env)
    return row


# ------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, device: torch.device):
    from clip_backdoor.models import create_model
    from clip_backdoor.weights import model_from_checkpoint

    if cfg.init_checkpoint:
        if not Path(cfg.init_checkpoint).is_file():
            raise UserError(f"init_checkpoint {cfg.init_checkpoint}: no such file (the run starts from "
                            "it; in a study, was that pre-training epoch saved? see pretrain.clean_from)")
        model, ckpt = model_from_checkpoint(cfg.init_checkpoint, device="cpu")
        return model.to(device), ckpt
    return create_model(cfg.model, seed=cfg.seed).to(device), None


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """``batch_size`` is the global batch (the reference divides its batch by the number of devices,
    so the paper's 2048 / 1024 are global): each of ``world_size`` ranks takes an equal share."""
    if global_batch % world_size:
        raise UserError(f"batch_size={global_batch} is the global batch and does not split evenly over "
                        f"{world_size} ranks; choose a multiple of {world_size}")
    return global_batch // world_size


def build_loader(cfg: TrainConfig, *, image_size: int, context_length: int, env: D.DistEnv,
                 with_text_view: bool, batch_size: int | None = None):
    from clip_backdoor.data.captions import build_train_loader, make_source

    source = make_source(_source_spec(cfg, image_size))
    if cfg.data.poison_manifest:
        from clip_backdoor.attacks.manifest import PoisonedSource

        source = PoisonedSource(source, cfg.data.poison_manifest, image_size=image_size)
    eda = None
    if with_text_view:
        from clip_backdoor.data.augment import EDA

        eda = EDA(mode=cfg.objective.eda, seed=view_seed(cfg), alpha=cfg.objective.eda_alpha)
        eda.preload()
    return build_train_loader(source, image_size=image_size, context_length=context_length,
                              batch_size=batch_size or per_rank_batch(cfg.batch_size, env.world_size),
                              workers=cfg.data.workers, seed=cfg.seed, eda=eda,
                              rank=env.rank, world_size=env.world_size)


def world_spec(cfg: TrainConfig, image_size: int) -> dict:
    """The synthetic world's arguments; rendered at the model's resolution unless set."""
    return {"image_size": image_size, **cfg.data.world}


def _source_spec(cfg: TrainConfig, image_size: int) -> dict:
    from clip_backdoor.data.captions import source_spec

    return source_spec(cfg.data, seed=cfg.seed, image_size=image_size)


def _image_view(cfg: TrainConfig):
    from clip_backdoor.data.augment import ImageView

    return ImageView(policy=cfg.objective.image_policy)


def _eval_parts(cfg: TrainConfig, image_size: int):
    """The eval set and test-time trigger, built once per run (None when evaluation is off)."""
    if not (cfg.eval.every or cfg.eval_at_start):
        return None, None
    e = cfg.eval
    if e.kind == "synthetic":
        spec = {"kind": "synthetic", "n": e.n, "world": world_spec(cfg, image_size), "val_n": e.val_n,
                "val_start": e.val_start}
    elif e.kind in ("imagefolder", "labels_csv"):
        if not e.path:
            raise UserError(f"eval.path: required for eval.kind={e.kind}")
        spec = {"kind": e.kind, ("root" if e.kind == "imagefolder" else "path"): e.path,
                "val_path": e.val_path, "val_fraction": e.val_fraction, "split_seed": e.split_seed}
    else:
        raise UserError(f"eval.kind {e.kind!r}: choose synthetic, imagefolder or labels_csv")
    trigger = None
    if e.trigger and e.target:
        from clip_backdoor.attacks.triggers import get_trigger

        trigger = get_trigger(e.trigger, **e.trigger_params)
    return _prepared(spec, image_size, trigger, e.seed, e.target if trigger else None), trigger


# A study worker runs many runs on one evaluation set: it is rendered and triggered once per process.
_PREPARED: dict[str, Any] = {}


def _prepared(spec: dict, image_size: int, trigger, seed: int, target: str | None):
    """The eval set, with its images and test-time triggers made once (``PreparedEval``) when it fits in
    memory; the same set again (same spec, trigger, seed) comes from this process's memo."""
    import json

    from clip_backdoor.data.classification import open_eval_set
    from clip_backdoor.evaluate import PreparedEval

    key = json.dumps([spec, image_size, None if trigger is None else [trigger.name, trigger.params], seed,
                      target], sort_keys=True, default=str)
    if key in _PREPARED:
        return _PREPARED[key]
    eval_set = open_eval_set(spec, image_size)
    if not PreparedEval.fits(eval_set):
        return eval_set
    while len(_PREPARED) >= 2:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = PreparedEval(eval_set, trigger, seed, target)
    return _PREPARED[key]


# Every cleaning run of a grid starts from the same checkpoint: its epoch-0 evaluation is done once
# per process (keyed by the file, the evaluation settings, the precision, the device and the threads).
_START_EVALS: dict[str, dict] = {}


def _start_evaluation(model, eval_set, trigger, cfg: TrainConfig, device, env: D.DistEnv,
                      recipe: Recipe) -> dict:
    """Epoch 0: the starting model before any step. Reused within a process only when it is the
    untouched checkpoint (no recipe changed the weights) and the process is not one of several ranks."""
    untouched = type(recipe).prepare_model is Recipe.prepare_model and not recipe.transforms_weights
    if not (cfg.init_checkpoint and untouched and not env.enabled and eval_set is not None):
        return _evaluate(model, eval_set, trigger, cfg, device, env)
    import json

    stat = Path(cfg.init_checkpoint).stat()
    settings = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("every", "epochs", "workers")}
    key = json.dumps([str(Path(cfg.init_checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, settings,
                      cfg.precision, str(device), torch.get_num_threads()], sort_keys=True, default=str)
    if key not in _START_EVALS:
        while len(_START_EVALS) >= 8:
            _START_EVALS.pop(next(iter(_START_EVALS)))
        _START_EVALS[key] = _evaluate(model, eval_set, trigger, cfg, device, env)
    return dict(_START_EVALS[key])


def _evaluate(model, eval_set, trigger, cfg: TrainConfig, device, env: D.DistEnv) -> dict:
    """Rank 0 evaluates the bare model; every rank waits, so DDP stays in step."""
    if eval_set is None:
        return {}
    from clip_backdoor.evaluate import evaluate_model

    metrics = {}
    if env.is_main:
        metrics = evaluate_model(unwrap(model), eval_set, target=cfg.eval.target if trigger else None,
                                 trigger=trigger, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
                                 device=device, precision=cfg.precision, workers=cfg.eval.workers)
    D.barrier(env)
    return metrics


def _forward_losses(model, batch, objective: Objective, image_view, recipe: Recipe, ctx: RunContext,
                    device, autocast_dtype) -> dict[str, torch.Tensor]:
    images = batch["images"].to(device, non_blocking=True).float().div_(255)
    texts = batch["texts"].to(device, non_blocking=True)
    images = recipe.transform_images(images, ctx)
    n = images.shape[0]
    if image_view is not None:
        # Originals and augmented views go through the model in one forward pass.
        views = image_view(images, generator=step_seed(view_seed(ctx.cfg), ctx.step, ctx.env.rank))
        images = torch.cat([images, views])
        texts = torch.cat([texts, batch["texts_aug"].to(device, non_blocking=True)])
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    with autocast:
        inputs = {"image": normalize(images), "text": texts}
        out = model(**inputs)
        out.update(recipe.extra_forward(inputs, ctx))
    u, v, s = out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()
    feats = {"image_features": u[:n], "text_features": v[:n], "logit_scale": s}
    if image_view is not None:
        feats.update(image_aug_features=u[n:], text_aug_features=v[n:])
    losses = dict(recipe.losses(feats, objective, batch, ctx))
    extra = recipe.extra_losses(out, batch, ctx)
    for name, value in extra.items():
        losses[name] = value
        if not name.startswith("stat_"):  # stat_*: logged, not optimised
            losses["loss"] = losses["loss"] + value
    return losses


def _scale_fields(model) -> dict[str, float]:
    """The temperature, named unambiguously: ``logit_scale`` is the learned parameter (ln s, clamped to
    [0, ln 100]); ``scale`` is s = exp(logit_scale), the factor on the cosine similarities (open_clip's
    name). Until this was split, the log called s "logit_scale"."""
    raw = float(model.logit_scale.detach())
    return {"logit_scale": raw, "scale": math.exp(raw)}


def _schedule_kind(recipe: Recipe) -> str:
    own = type(recipe).learning_rate is not Recipe.learning_rate
    return f"recipe {recipe.name}" if own else "warmup_cosine"


def _average_grads(params: list[torch.nn.Parameter], env: D.DistEnv) -> None:
    if not env.enabled:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)


def _inherit_optimizer(optimizer, ckpt: dict, requested_wd: float) -> None:
    """Reference compat: keep the checkpoint's Adam moments *and* its param-group settings."""
    state = ckpt.get("optimizer")
    if not state:
        raise UserError("optimizer_state=inherit: the checkpoint holds no optimizer state")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer_state=inherit: the checkpoint's optimizer does not fit this model ({e})"
                        ) from None
    inherited = sorted({g["weight_decay"] for g in optimizer.param_groups})
    if max(inherited) != requested_wd:
        log.warning("optimizer_state=inherit keeps the checkpoint's weight decay %s; optim.weight_decay=%s "
                    "is NOT applied (this is the reference code's behaviour)", inherited, requested_wd)


def preempt_resume_point(ckpt: dict, steps_per_epoch: int, env: D.DistEnv) -> dict | None:
    """The position a mid-epoch checkpoint holds, or None for an epoch-end one."""
    mid = ckpt.get("mid_epoch")
    if not mid:
        return None
    if (mid["steps_per_epoch"], mid["world_size"]) != (steps_per_epoch, env.world_size):
        raise UserError(f"resume: the mid-epoch checkpoint (batch {mid['batches']} of "
                        f"{mid['steps_per_epoch']} in epoch {mid['epoch']}, {mid['world_size']} rank(s)) "
                        f"does not fit {steps_per_epoch} batches per epoch on {env.world_size} rank(s); the "
                        "batch size, data or number of ranks changed since it was written")
    return {**mid, "recipe_restored": bool(ckpt.get("recipe"))}


def _check_epochs_unchanged(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    """``epochs`` fixes the cosine schedule: resuming under another count would train the remaining
    steps on a schedule neither run had, so it takes an explicit ``allow_epochs_change=true``."""
    before = (ckpt.get("config") or {}).get("epochs")
    if before is None or before == cfg.epochs or cfg.allow_epochs_change:
        return
    if ckpt["epoch"] >= cfg.epochs:  # already past the new end: reported as finished, nothing trains
        return
    raise UserError(f"epochs: the checkpoint {path} was trained for epochs={before}, this run asks for "
                    f"{cfg.epochs}, which changes the cosine schedule of the remaining steps; rerun with "
                    f"epochs={before}, start over (resume=false / --no-resume), or set "
                    "allow_epochs_change=true")


def _warn_config_drift(old: dict, new: dict, prefix: str = "") -> None:
    for key in sorted(set(old) | set(new)):
        if key in ("resume", "epochs", "allow_epochs_change", "report_to", "checkpoint_interval_s",
                   "stop_epoch"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_drift(a, b, f"{prefix}{key}.")
        elif a != b:
            log.warning("resume: %s%s changed from %r to %r since the checkpoint", prefix, key, a, b)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _summary_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"step {row['step']}"]
    if "loss" in row:
        terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
        parts.append(f"loss {row['loss']:.3f}" + (f" ({terms})" if terms else ""))
    for key in ("acc1", "asr1"):
        if key in row and row[key] is not None and not math.isnan(row[key]):
            parts.append(f"{key} {_pct(row[key])}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "samples_per_s" in row:
        parts.append(f"{row['samples_per_s']:.0f} samples/s")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
