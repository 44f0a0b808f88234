"""The one entry point: ``clip-backdoor <command> [args]``.

Each command lives next to the code it drives and exposes ``main(argv: list[str]) -> int`` (the
open_clip habit: every command is callable from a test with a list of strings). This module only
dispatches, and turns a :class:`~clip_backdoor.errors.UserError` into one line and exit code 2, and
Ctrl-C (``KeyboardInterrupt``) into one line saying how to go on and exit code 130 (128 + SIGINT).
"""

from __future__ import annotations

import importlib
import logging
import sys

from clip_backdoor.errors import UserError

# name -> (module with main(argv), one-line help). Imported lazily so `--help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("clip_backdoor.data.materialise", "generate or materialise the synthetic caption world"),
    "poison": ("clip_backdoor.attacks.poison", "poison a caption dataset; cleaning sets; previews"),
    "pretrain": ("clip_backdoor.train_commands", "pre-train CLIP (mmcl | mmcl+ssl | ssl); --defense"),
    "clean": ("clip_backdoor.train_commands", "fine-tune a checkpoint with a cleaning method"),
    "evaluate": ("clip_backdoor.evaluate", "zero-shot accuracy and attack success rate"),
    "detect": ("clip_backdoor.detection", "score training pairs as poisoned (k-dist, LID, DAO), AUROC"),
    "inspect": ("clip_backdoor.card", "say what a checkpoint is: model, stage, data, poisoning, metrics"),
    "export": ("clip_backdoor.train.checkpoint", "export weights (safetensors), card.json, open_clip config"),
    "study": ("clip_backdoor.study.runner", "run or report a study described by one YAML file"),
    "demo": ("clip_backdoor.demo", "the end-to-end demo on the synthetic world"),
}


# What Ctrl-C leaves behind, per command: every write is atomic, so an interrupted command leaves the
# previous state, never a half-written file (a killed writer's temp file is removed on the next start).
AFTER_INTERRUPT: dict[str, str] = {
    "pretrain": "run the same command again to resume from the last finished epoch (checkpoints/latest.pt)",
    "clean": "run the same command again to resume from the last finished epoch (checkpoints/latest.pt)",
    "study": "run the same command again to go on (finished runs are kept; an interrupted run resumes "
             "from its last epoch)",
    "demo": "run the same command again to go on where it stopped",
}
DEFAULT_AFTER_INTERRUPT = "nothing half-written was left; run the same command again"


def _usage() -> str:
    lines = ["usage: clip-backdoor <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `clip-backdoor <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clip-backdoor: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = importlib.import_module(COMMANDS[name][0])
        # Modules serving several commands (pretrain/clean) get the command name first.
        entry = getattr(module, f"main_{name}", None) or module.main
        return int(entry(rest) or 0)
    except UserError as e:
        print(f"clip-backdoor {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nclip-backdoor {name}: interrupted; {AFTER_INTERRUPT.get(name, DEFAULT_AFTER_INTERRUPT)}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
