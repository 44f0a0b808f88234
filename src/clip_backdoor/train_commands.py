"""`clip-backdoor pretrain` and `clip-backdoor clean`: configs in, one training loop, run dir out.

Both read an optional YAML (`--config`), then flags, then dotted overrides (`optim.lr=1e-4`, anywhere
among the flags), and save the resolved config in the run directory. Cleaning differs only in its
defaults (REFERENCE.md CleanCLIP recipe: lr 1e-5, 50 warm-up steps, batch 64, 10 epochs, evaluate at
epoch 0) and in starting from a checkpoint.

These handlers sit beside ``cli.py``, above ``train``, ``cleaning`` and ``defenses``: they pick a
recipe from ``cleaning`` / ``defenses``, which themselves build on ``train.loop``, so ``train``
never imports them.
"""

from __future__ import annotations

import argparse
import logging

from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

OBJECTIVES = {"mmcl": (1.0, 0.0), "mmcl+ssl": (1.0, 1.0), "ssl": (0.0, 1.0)}

CLEAN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 64,
    "eval_at_start": True,
    "optim": {"lr": 1e-5, "warmup_steps": 50},
    "objective": {"mmcl_weight": 1.0, "ssl_weight": 1.0},
}


def _common_parser(prog: str, description: str, positional: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="Any config key can be set as KEY=VALUE, e.g. optim.lr=1e-4 "
                                       "data.kind=csv data.path=train.csv")
    p.add_argument("--config", help="YAML file with TrainConfig keys (see configs/)")
    p.add_argument("--run-dir", help="output directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), help="shortcut for objective weights")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true", help="start over even if latest.pt exists")
    if positional:  # `clean` parses leftovers itself: method parameters (--name value) and KEY=VALUE
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def _flags_to_overrides(args) -> list[str]:
    out = []
    for flag, key in [("run_dir", "run_dir"), ("epochs", "epochs"), ("lr", "optim.lr"),
                      ("batch_size", "batch_size"), ("precision", "precision"), ("device", "device"),
                      ("seed", "seed")]:
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if args.objective:
        l1, l2 = OBJECTIVES[args.objective]
        out += [f"objective.mmcl_weight={l1}", f"objective.ssl_weight={l2}"]
    if args.no_resume:
        out.append("resume=false")
    return out


def _train_or_requeue(cfg: TrainConfig, recipe=None) -> int:
    """Train; a preemption signal ends the command with the requeue exit code after its checkpoint."""
    from clip_backdoor.train.loop import train
    from clip_backdoor.train.preempt import REQUEUE_EXIT_CODE, Preempted, ignore_further_stops

    try:
        train(cfg, recipe)
    except Preempted as e:
        ignore_further_stops()
        log.warning("%s; run the same command again to continue (exit code %d: requeue)", e,
                    REQUEUE_EXIT_CODE)
        return REQUEUE_EXIT_CODE
    return 0


def main_pretrain(argv: list[str]) -> int:
    from clip_backdoor import cleaning, defenses

    p = _common_parser("clip-backdoor pretrain", "Pre-train CLIP on a (poisoned) caption source, optionally "
                       "with a pre-training defence whose parameters follow it (e.g. --defense safeclip "
                       "--inmodal-warmup 2); see --list-defenses.", positional=False)
    p.add_argument("--defense", help="pre-training defence: safeclip | roclip (see --list-defenses)")
    p.add_argument("--list-defenses", action="store_true", help="list the pre-training defences and exit")
    args, rest = p.parse_known_args(argv)
    if args.list_defenses:
        for line in defenses.describe_all():
            print(line)
        return 0
    params, overrides = cleaning.split_method_args(rest)
    cfg = load_config(TrainConfig, args.config, _flags_to_overrides(args) + overrides)
    name = args.defense or cfg.defense
    if params and not name:
        raise UserError(f"--{next(iter(params)).replace('_', '-')}: unknown option (defence parameters "
                        "follow --defense NAME)")
    recipe = None
    if name:
        recipe = defenses.build_defense(name, {**cfg.defense_params, **params})
        cfg = recipe.apply_to_config(cfg)
    return _train_or_requeue(cfg, recipe)


def main_clean(argv: list[str]) -> int:
    from clip_backdoor import cleaning

    p = _common_parser("clip-backdoor clean", "Fine-tune a poisoned checkpoint with a cleaning method; "
                       "evaluates accuracy and ASR at epoch 0 and after every epoch. Method parameters "
                       "(e.g. --ssl-weight 2) follow the method; see --list.", positional=False)
    p.add_argument("--checkpoint", help="the poisoned model to clean (init_checkpoint)")
    p.add_argument("--method", default=None, help="cleaning recipe (see --list); default cleanclip")
    p.add_argument("--optimizer-state", choices=["fresh", "inherit"],
                   help="fresh (default) or inherit the checkpoint's optimizer state (reference compat)")
    p.add_argument("--list", action="store_true", help="list the cleaning methods and exit")
    args, rest = p.parse_known_args(argv)
    if args.list:
        for line in cleaning.describe_all():
            print(line)
        return 0
    method_params, overrides = cleaning.split_method_args(rest)
    overrides = _flags_to_overrides(args) + overrides
    if args.checkpoint:
        overrides.append(f"init_checkpoint={args.checkpoint}")
    if args.optimizer_state:
        overrides.append(f"optimizer_state={args.optimizer_state}")
    cfg = load_config(TrainConfig, args.config, overrides, base=CLEAN_DEFAULTS)
    if not cfg.init_checkpoint:
        raise UserError("clean: --checkpoint (or init_checkpoint in the config) is required")
    if cfg.defense:
        raise UserError(f"clean: defense={cfg.defense} is a pre-training defence (clip-backdoor pretrain "
                        "--defense); remove it from the cleaning config")
    recipe = cleaning.build_recipe(args.method or cfg.method or "cleanclip",
                                   {**cfg.method_params, **method_params})
    cfg = recipe.apply_to_config(cfg, explicit=set(_explicit_keys(overrides, args.config)))
    return _train_or_requeue(cfg, recipe)


def _explicit_keys(overrides: list[str], config_path: str | None) -> list[str]:
    """Keys the user set on purpose (a recipe must not silently overwrite them)."""
    keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
    if config_path:
        from clip_backdoor.config import load_yaml

        def walk(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict) and k not in ("method_params", "defense_params", "trigger_params"):
                    yield from walk(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}"

        keys += list(walk(load_yaml(config_path)))
    return keys
