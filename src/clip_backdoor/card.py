"""What a checkpoint is: ``clip-backdoor inspect CKPT`` and the ``card.json`` that ``export`` writes.

A card answers the questions users of released backdoor checkpoints keep asking: which model, trained
how (pre-training objective, or cleaning method and its parameters, and from which checkpoint), on
which data, poisoned with what (trigger, target, how many poisons, poison seed) or clean, and what it
scored last. Everything comes from the checkpoint itself (the training loop records a
:func:`run_record` in every checkpoint), from the run's ``config.yaml``-equivalent ``config`` and from
the ``metrics.jsonl`` beside it. For checkpoints written before the record existed, the poisoning is
read from the run config's ``data.poison_manifest`` and the ``poison.json`` beside that manifest.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from clip_backdoor import __version__
from clip_backdoor.errors import UserError

CARD_NAME = "card.json"
OBJECTIVE_NAMES = {(1.0, 0.0): "mmcl", (1.0, 1.0): "mmcl+ssl", (0.0, 1.0): "ssl"}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # batch-norm state, not parameters


# ------------------------------------------------------------------------------------------------
# Facts recorded at training time (plain JSON-able values: torch.load(weights_only=True) reads them)
# ------------------------------------------------------------------------------------------------
def poisoning_facts(manifest: str | os.PathLike | None) -> dict | None:
    """The poisoning of a manifest's dataset, from ``poison.json`` beside it (or, without one, by
    counting the manifest's rows); None without a manifest."""
    if not manifest:
        return None
    from clip_backdoor.attacks.manifest import read_info, read_manifest

    path = Path(manifest).absolute()
    if not path.is_file():
        return {"manifest": str(path), "missing": True}
    info = read_info(path)
    facts = {"manifest": str(path), "kind": info.get("kind")}
    if info:
        n_poison, n_rows = info.get("n_poison"), info.get("n_rows")
        facts.update({key: info.get(key) for key in ("trigger", "trigger_params", "target", "mode",
                                                     "poison_seed")})
        if info.get("kind") == "cleaning_set":
            facts.update(size=info.get("size"), k=info.get("k"), pick=info.get("pick"))
    else:  # a manifest without its poison.json: count what it lists
        n_poison = n_rows = 0
        for row in read_manifest(path):
            n_rows += 1
            if row.is_poison:
                n_poison += 1
                if "trigger" not in facts and row.trigger:
                    facts.update(trigger=row.trigger, trigger_params=json.loads(row.trigger_params or "{}"))
    facts.update(n_poison=n_poison, n_rows=n_rows,
                 rate=n_poison / n_rows if n_poison is not None and n_rows else None)
    fingerprint = info.get("fingerprint") or info.get("source_fingerprint")
    if fingerprint:
        facts["fingerprint"] = fingerprint
    return facts


def _dataset_manifest(data: dict) -> str | None:
    """The manifest describing the training data: ``data.poison_manifest``, else the manifest a
    written (CSV or WebDataset) poisoned dataset keeps beside its files."""
    if data.get("poison_manifest"):
        return data["poison_manifest"]
    if data.get("kind") in ("csv", "wds") and data.get("path"):
        folder = Path(str(data["path"])).parent
        if (folder / "poison.json").is_file() and (folder / "manifest.csv").is_file():
            return str(folder / "manifest.csv")
    return None


def data_facts(config: dict, num_samples: int | None = None) -> dict:
    """Kind, path, row count and poisoning of a run's training data (``config``: the run config dict)."""
    data = config.get("data") or {}
    path = data.get("path")
    facts = {"kind": data.get("kind"), "path": str(Path(path).absolute()) if path and "{" not in path and
             "*" not in path else path, "num_samples": num_samples}
    if data.get("kind") == "synthetic":
        facts["world"] = data.get("world") or {}
        if num_samples is None:
            facts["num_samples"] = data.get("num_samples")
    facts["poisoning"] = poisoning_facts(_dataset_manifest(data))
    if num_samples is None and facts["poisoning"] and facts["poisoning"].get("kind") == "cleaning_set":
        facts["num_samples"] = facts["poisoning"].get("n_rows")
    return facts


def start_facts(path: str | os.PathLike, ckpt: dict) -> dict:
    """What a cleaning run started from: the checkpoint's path, epoch and its own training data."""
    config = ckpt.get("config") or {}
    return {"path": str(Path(path).absolute()), "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
            "stage": stage_of(config), "data": ckpt.get("data") or (data_facts(config) if config else None),
            "metrics": ckpt.get("metrics")}


def run_record(config: dict, *, num_samples: int | None, init_ckpt: dict | None, method: dict | None) -> dict:
    """The part of every checkpoint that says what the run is (the loop adds ``metrics`` per epoch)."""
    start = start_facts(config["init_checkpoint"], init_ckpt) if config.get("init_checkpoint") else None
    return {"version": __version__, "data": data_facts(config, num_samples), "method": method, "start": start}


def stage_of(config: dict) -> str | None:
    if not config:
        return None
    return "clean" if config.get("init_checkpoint") else "pretrain"


def is_poisoned(data: dict | None) -> bool:
    poisoning = (data or {}).get("poisoning") or {}
    return bool(poisoning.get("n_poison"))


# ------------------------------------------------------------------------------------------------
# Whether the backdoor was learned (the study report's rule, evaluate.backdoor_not_learned)
# ------------------------------------------------------------------------------------------------
def _trigger_text(name: str | None, params: dict | None) -> str:
    return f"{name} {json.dumps(params or {}, sort_keys=True)}"


def unlearned_line(config: dict, record: dict, rows: list[dict]) -> str | None:
    """One line when a run on poisoned data (pre-training) or from a poisoned model (cleaning) shows an
    ASR no higher than a clean model's: its numbers say nothing about the backdoor. None otherwise."""
    from clip_backdoor.evaluate import NOT_LEARNED_ASR, backdoor_not_learned

    evaluated = [r for r in rows if isinstance(r.get("asr1"), float) and r["asr1"] == r["asr1"]]
    threshold = f"≤ {NOT_LEARNED_ASR * 100:g}%, a clean model's rate"
    if config.get("init_checkpoint"):
        start = record.get("start") or {}
        first = next((r for r in evaluated if r["epoch"] == 0), None) or (start.get("metrics") or {})
        asr = first.get("asr1")
        if not is_poisoned(start.get("data")) or not isinstance(asr, float) or not backdoor_not_learned(asr):
            return None
        return (f"backdoor not learned by the starting checkpoint: asr1 {asr * 100:.1f}% before cleaning "
                f"({threshold}); this run says nothing about removing a backdoor")
    if not is_poisoned(record.get("data")) or not evaluated:
        return None
    last = evaluated[-1]
    if not backdoor_not_learned(last["asr1"]):
        return None
    p = record["data"]["poisoning"]
    rate = f" ({p['rate'] * 100:.2g}%)" if p.get("rate") else ""
    line = (f"backdoor not learned: asr1 {last['asr1'] * 100:.1f}% at epoch {last['epoch']} ({threshold}) "
            f"with {p['n_poison']} poisons{rate} of "
            f"{_trigger_text(p.get('trigger'), p.get('trigger_params'))}")
    evaluated_with = _eval_trigger(config.get("eval") or {})
    poisoned_with = (p.get("trigger"), p.get("trigger_params") or {})
    if p.get("trigger") and evaluated_with and evaluated_with != poisoned_with:
        return line + (f"; but the evaluation's trigger is another ({_trigger_text(*evaluated_with)}): set "
                       "eval.trigger / eval.trigger_params to the poisons'")
    if config.get("defense"):  # a low ASR is what a defence is for, not a setup problem
        return line + f" under the {config['defense']} defence: compare with the same run undefended"
    return line + "; try a larger trigger, more poisons or more epochs"


def _eval_trigger(e: dict) -> tuple[str, dict] | None:
    """(name, resolved parameters) of the evaluation's trigger, comparable with poison.json's."""
    if not e.get("trigger"):
        return None
    from clip_backdoor.attacks.triggers import get_trigger

    try:
        trigger = get_trigger(e["trigger"], **(e.get("trigger_params") or {}))
    except UserError:
        return None
    return trigger.name, json.loads(json.dumps(trigger.params))


# ------------------------------------------------------------------------------------------------
# The card
# ------------------------------------------------------------------------------------------------
def parameter_count(state_dict: dict) -> int:
    return sum(int(v.numel()) for k, v in state_dict.items() if not k.endswith(_BUFFERS))


def _run_metrics(path: Path | None, epoch: int | None) -> list[dict]:
    """The ``metrics.jsonl`` lines of the run a checkpoint belongs to, up to the checkpoint's epoch."""
    if path is None or path.parent.name != "checkpoints":
        return []
    metrics = path.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return []
    from clip_backdoor.fileio import read_jsonl

    try:
        rows = read_jsonl(metrics)
    except (OSError, UnicodeDecodeError):
        return []
    return [r for r in rows if isinstance(r, dict) and (epoch is None or r.get("epoch", 0) <= epoch)]


def _objective(config: dict) -> dict | None:
    o = config.get("objective")
    if not o:
        return None
    weights = (float(o.get("mmcl_weight", 0.0)), float(o.get("ssl_weight", 0.0)))
    return {"name": OBJECTIVE_NAMES.get(weights), "mmcl_weight": weights[0], "ssl_weight": weights[1]}


def _method(ckpt: dict, config: dict, rows: list[dict]) -> dict | None:
    if ckpt.get("method"):
        return ckpt["method"]
    recorded = next((r["method"] for r in reversed(rows) if isinstance(r.get("method"), dict)), None)
    if recorded:
        return recorded
    if config.get("method"):
        return {"name": config["method"], **(config.get("method_params") or {})}
    return None


def build_card(ckpt: dict, path: str | os.PathLike | None = None) -> dict:
    """Everything ``inspect`` shows, as one JSON-able dict."""
    path = Path(path) if path is not None else None
    config = ckpt.get("config") or {}
    model = ckpt.get("model") or {}
    rows = _run_metrics(path, ckpt.get("epoch"))
    if not rows and ckpt.get("metrics"):
        rows = [ckpt["metrics"]]
    data = ckpt.get("data") or (data_facts(config) if config else None)
    start = ckpt.get("start")
    if start is None and config.get("init_checkpoint"):
        start = {"path": config["init_checkpoint"]}
        if Path(config["init_checkpoint"]).is_file():
            try:
                from clip_backdoor.weights import load_checkpoint

                start = start_facts(config["init_checkpoint"], load_checkpoint(config["init_checkpoint"]))
            except UserError:
                pass
    evaluated = [r for r in rows if "acc1" in r]
    record = {"data": data, "start": start}
    return {
        "file": str(path) if path else None,
        "toolkit": {"name": "clip-backdoor", "version": ckpt.get("version"), "inspected_with": __version__},
        "model": {"name": model.get("name"), "parameters": parameter_count(ckpt["state_dict"]),
                  "config": {k: v for k, v in model.items() if k != "name"} or None},
        "stage": stage_of(config),
        "epoch": ckpt.get("epoch"), "epochs": config.get("epochs"), "step": ckpt.get("step"),
        "objective": _objective(config),
        "method": _method(ckpt, config, rows) if config.get("init_checkpoint") else None,
        "data": data,
        "poisoning": (data or {}).get("poisoning") if is_poisoned(data) else None,
        "start": start,
        "metrics": {"last": rows[-1] if rows else None,
                    "last_evaluated": evaluated[-1] if evaluated else None},
        "backdoor_note": unlearned_line(config, record, rows) if config else None,
    }


# ------------------------------------------------------------------------------------------------
# One screen
# ------------------------------------------------------------------------------------------------
def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, float) and x == x else "—"


def _model_line(card: dict) -> str:
    m = card["model"]
    cfg = m.get("config") or {}
    v, t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    arch = ""
    if v:
        layers = v.get("layers")
        tower = (f"ResNet {'-'.join(map(str, layers))}" if isinstance(layers, list)
                 else f"ViT {layers} layers, patch {v.get('patch_size')}")
        arch = (f" (image: {tower}, width {v.get('width')}, {v.get('image_size')} px; "
                f"text: {t.get('layers')} x {t.get('width')}, context {t.get('context_length')}; "
                f"embed {cfg.get('embed_dim')})")
    return f"{m.get('name') or 'unnamed'}{arch}, {m['parameters']:,} parameters"


def _poisoning_lines(p: dict | None, data: dict | None) -> list[str]:
    poisoning = (data or {}).get("poisoning")
    if poisoning and poisoning.get("missing"):
        return [f"unknown: the manifest {poisoning['manifest']} is not there any more"]
    if not p:
        if poisoning and poisoning.get("kind") == "cleaning_set":
            return [f"clean data (cleaning set, no poisons; {poisoning['manifest']})"]
        return ["clean data"]
    rate = f" ({p['rate'] * 100:.3g}%)" if p.get("rate") else ""
    lines = [f"{p.get('trigger')} {json.dumps(p.get('trigger_params') or {}, sort_keys=True)} -> "
             f"{p.get('target')!r} ({p.get('mode') or 'dirty'}), {p['n_poison']:,} poisons of "
             f"{p.get('n_rows') or 0:,} rows{rate}, poison seed {p.get('poison_seed')}"]
    if p.get("kind") == "cleaning_set":
        lines[0] = f"cleaning set with k = {p.get('k')} poisons left in: " + lines[0]
    lines.append(f"manifest {p['manifest']}")
    return lines


def _data_line(d: dict | None) -> str:
    if not d:
        return "not recorded"
    parts = [str(d.get("kind"))]
    if d.get("path"):
        parts.append(str(d["path"]))
    if d.get("kind") == "synthetic" and d.get("world"):
        parts.append(f"world {json.dumps(d['world'], sort_keys=True)}")
    if d.get("num_samples") is not None:
        parts.append(f"{d['num_samples']:,} rows")
    fingerprint = (d.get("poisoning") or {}).get("fingerprint") or d.get("fingerprint")
    if fingerprint:
        parts.append(f"fingerprint {fingerprint}")
    return ", ".join(parts)


def _metrics_line(row: dict | None) -> str:
    if not row:
        return "none recorded"
    parts = [f"epoch {row.get('epoch')}"]
    if isinstance(row.get("loss"), float):
        terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_") and
                         isinstance(v, float))
        parts.append(f"loss {row['loss']:.3f}" + (f" ({terms})" if terms else ""))
    for key in ("acc1", "acc5", "asr1", "asr5"):
        if key in row:
            parts.append(f"{key} {_pct(row[key])}")
    if isinstance(row.get("lr"), float):
        parts.append(f"lr {row['lr']:.2e}")
    return "  ".join(parts)


def _stage_line(card: dict) -> str:
    epochs = f" of {card['epochs']}" if card.get("epochs") is not None else ""
    at = f"epoch {card.get('epoch')}{epochs}, step {card.get('step')}"
    if card["stage"] == "clean":
        m = card.get("method") or {}
        params = ", ".join(f"{k} {v}" for k, v in m.items() if k != "name")
        return f"cleaning with {m.get('name') or '?'}" + (f" ({params})" if params else "") + f"; {at}"
    o = card.get("objective") or {}
    name = o.get("name") or f"{o.get('mmcl_weight')} x MMCL + {o.get('ssl_weight')} x SSL"
    return f"pre-training, objective {name}; {at}"


def _start_line(start: dict) -> str:
    text = str(start.get("path"))
    if start.get("epoch") is not None:
        text += f" (epoch {start['epoch']}"
        data = start.get("data")
        if is_poisoned(data):
            p = data["poisoning"]
            text += (f"; trained on poisoned data: {p.get('trigger')} -> {p.get('target')!r}, "
                     f"{p['n_poison']:,} poisons")
        elif data:
            text += "; trained on clean data"
        asr = (start.get("metrics") or {}).get("asr1")
        if isinstance(asr, float):
            text += f"; asr1 {_pct(asr)}"
        text += ")"
    return text


def format_card(card: dict) -> str:
    if card["stage"] is None:
        lines = [f"{card['file']}: plain weights (no training record)",
                 f"  model      {_model_line(card)}"]
        return "\n".join(lines)
    rows = [("model", _model_line(card)), ("stage", _stage_line(card)), ("data", _data_line(card["data"]))]
    for i, line in enumerate(_poisoning_lines(card["poisoning"], card["data"])):
        rows.append(("poisoning" if i == 0 else "", line))
    if card.get("start"):
        rows.append(("started from", _start_line(card["start"])))
    last, evaluated = card["metrics"]["last"], card["metrics"]["last_evaluated"]
    rows.append(("last metrics", _metrics_line(last)))
    if evaluated is not None and evaluated is not last and evaluated != last:
        rows.append(("last eval", _metrics_line(evaluated)))
    if card.get("backdoor_note"):
        rows.append(("note", card["backdoor_note"]))
    t = card["toolkit"]
    also = "" if t["version"] == t["inspected_with"] else f" (inspected with {t['inspected_with']})"
    rows.append(("toolkit", f"clip-backdoor {t['version'] or '(not recorded)'}{also}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([str(card["file"])] + [f"  {k:<{width}}  {v}" for k, v in rows])


def json_safe(value: Any) -> Any:
    """NaN (an ASR without a target, say) as null: strict JSON for scripts."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """The card of a checkpoint; for weights that ``export`` wrote, the card it wrote beside them."""
    from clip_backdoor.weights import load_checkpoint

    ckpt = load_checkpoint(path)
    if not ckpt.get("config"):
        beside = Path(path).parent / CARD_NAME
        try:
            card = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            card = None
        if isinstance(card, dict) and (card.get("export") or {}).get("weights") == Path(path).name:
            return {**card, "file": str(path)}
    return build_card(ckpt, path)


def main_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clip-backdoor inspect",
                                description="Say what a checkpoint is: model, stage and method, data, "
                                            "poisoning, starting checkpoint, last metrics, toolkit version.")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the card as JSON (for scripts)")
    args = p.parse_args(argv)
    card = inspect_checkpoint(args.checkpoint)
    print(json.dumps(json_safe(card), indent=2, allow_nan=False) if args.json else format_card(card))
    return 0
