"""Evaluation throughput, in images/s: zero-shot accuracy, and accuracy + ASR, of a model on the
synthetic eval split.

"eval images/s" = n / wall time of one ``evaluate_model`` call. With a trigger that call makes two
passes over the n images (clean, then triggered: render, trigger with a per-image seeded generator,
quantise, encode), so acc + ASR costs about twice acc alone. The classifier is built once beforehand
(as the evaluate command's cache does) and timed separately. Two data settings:

- ``on the fly``: images rendered by the synthetic world inside the loader (``clip-backdoor
  evaluate``'s path);
- ``in memory``: the same images rendered beforehand, which isolates the evaluator (trigger + model);
- ``prepared``: the images rendered *and triggered* once (``evaluate.PreparedEval``), what the
  training loop evaluates after every epoch: only the two forward passes remain.

    .venv/bin/python benchmarks/evaluate.py                          # tiny, n=2000, batch 256
    .venv/bin/python benchmarks/evaluate.py --threads 1 --workers 0,1

Writes JSON (default benchmarks/results/evaluate.json) and prints a table. Timings depend on what
else the machine is doing: the load average before and after is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from clip_backdoor.attacks.triggers import get_trigger
from clip_backdoor.data.classification import open_eval_set
from clip_backdoor.evaluate import PreparedEval, build_classifier, evaluate_model
from clip_backdoor.models import create_model
from clip_backdoor.tokenizer import tokenize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, finish, load_line, print_rows  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "evaluate.json"
# Target for the CPU workhorse config (tiny, synthetic split, accuracy + ASR) on a 2-core machine.
TARGET_EVAL_IMAGES_PER_S = 4000.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registered model name or config .json (default tiny)")
    p.add_argument("--n", type=int, default=2000, help="eval images (default 2000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads in the main process (default: torch's default)")
    p.add_argument("--workers", default="0,2", help="comma-separated loader worker counts (default 0,2)")
    p.add_argument("--trigger", default="badnet")
    p.add_argument("--target", default="banana")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (autocast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting; the median is kept")
    p.add_argument("--ab-rounds", type=int, default=8,
                   help="alternating rounds of prepared inputs kept vs converted per batch (0: skip)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p.parse_args(argv)


class InMemory:
    """An eval set whose images were rendered beforehand."""

    def __init__(self, eval_set):
        self.classes, self.templates = eval_set.classes, eval_set.templates
        self.items = [eval_set[i] for i in range(len(eval_set))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def timed(fn, repeats: int) -> tuple[float, dict]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one untimed warm-up) and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def inputs_ab(model, eval_set, trigger, args, precision: str, classifier) -> dict:
    """Prepared acc + ASR with the images kept as model inputs (what the loop does) against the same
    set converting each batch (the previous code), in alternating rounds in this process: the fair
    comparison, since separate invocations vary by more than the difference."""
    kept = PreparedEval(eval_set, trigger, 0, args.target)
    per_batch = PreparedEval(eval_set, trigger, 0, args.target)
    per_batch._inputs[str(torch.device(args.device))] = None  # as when the floats do not fit
    run = {name: functools.partial(evaluate_model, model, s, batch_size=args.batch_size, device=args.device,
                                   precision=precision, classifier=classifier, target=args.target,
                                   trigger=trigger)
           for name, s in (("kept", kept), ("per_batch", per_batch))}
    if run["kept"]() != run["per_batch"]():
        raise SystemExit("prepared inputs changed the metrics")
    times: dict[str, list[float]] = {"kept": [], "per_batch": []}
    for r in range(args.ab_rounds):
        for name in ("kept", "per_batch") if r % 2 == 0 else ("per_batch", "kept"):
            start = time.perf_counter()
            run[name]()
            times[name].append(time.perf_counter() - start)
    kept_s, per_batch_s = statistics.median(times["kept"]), statistics.median(times["per_batch"])
    return {"precision": precision, "rounds": args.ab_rounds,
            "per_batch_images_per_s": round(args.n / per_batch_s, 1),
            "kept_images_per_s": round(args.n / kept_s, 1), "speedup": round(per_batch_s / kept_s, 3)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = create_model(args.model, seed=0).to(args.device)
    eval_set = open_eval_set({"kind": "synthetic", "n": args.n}, model.image_size)
    trigger = get_trigger(args.trigger)

    start = time.perf_counter()
    in_memory = InMemory(eval_set)
    render_s = time.perf_counter() - start
    prepared = {False: PreparedEval(eval_set), True: PreparedEval(eval_set, trigger, 0, args.target)}

    tokenize("warm up")  # the first call reads the BPE vocabulary; keep that out of the timings
    rows, classifier_s, ab = [], {}, []
    for precision in args.precisions.split(","):
        start = time.perf_counter()
        classifier = build_classifier(model, eval_set.classes, eval_set.templates,
                                      context_length=model.context_length, device=args.device,
                                      precision=precision)
        classifier_s[precision] = round(time.perf_counter() - start, 4)
        settings = [("on the fly", eval_set, int(w)) for w in args.workers.split(",")]
        settings += [("in memory", in_memory, 0), ("prepared", prepared, 0)]
        for data, dataset_or_prepared, workers in settings:
            for attacked in (False, True):
                dataset = dataset_or_prepared[attacked] if data == "prepared" else dataset_or_prepared
                attack = {"target": args.target, "trigger": trigger} if attacked else {}
                run = functools.partial(evaluate_model, model, dataset, batch_size=args.batch_size,
                                        device=args.device, precision=precision, workers=workers,
                                        classifier=classifier, **attack)
                seconds, metrics = timed(run, args.repeats)
                rows.append({"precision": precision, "data": data, "workers": workers,
                             "metrics": "acc + ASR" if attacked else "acc", "seconds": round(seconds, 4),
                             "eval_images_per_s": round(args.n / seconds, 1),
                             "acc1": metrics["acc1"], "asr1": metrics.get("asr1")})
        if args.ab_rounds:
            ab.append(inputs_ab(model, eval_set, trigger, args, precision, classifier))
    load_after = os.getloadavg()

    result = {
        "model": args.model, "n": args.n, "batch_size": args.batch_size,
        "trigger": {"name": trigger.name, "params": trigger.params}, "target": args.target,
        "device": args.device,
        "classifier": {"classes": len(eval_set.classes), "templates": len(eval_set.templates),
                       "seconds": classifier_s},
        "render_images_per_s": round(args.n / render_s, 1),
        "rows": rows,
        "prepared_inputs_ab": ab,
        "target_eval_images_per_s": TARGET_EVAL_IMAGES_PER_S,
        "environment": environment(threads=torch.get_num_threads(), machine=platform.machine()),
        "load_average_before": load_before, "load_average_after": load_after,
    }
    return finish(args.out, result, print_table)


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{result['model']} on the synthetic eval split, n={result['n']}, batch {result['batch_size']}, "
          f"{env['threads']} threads on {env['cpu_count']} cores, {load_line(result)}")
    clf = result["classifier"]
    seconds = ", ".join(f"{p} {t:.2f} s" for p, t in clf["seconds"].items())
    print(f"classifier: {clf['classes']} classes x {clf['templates']} templates ({seconds}); "
          f"world rendering alone: {result['render_images_per_s']:.0f} images/s\n")
    print_rows([("precision", "precision", "<9"), ("data", "data", "<11"), ("workers", "workers", ">7"),
                ("metrics", "metrics", "<10"), ("seconds", "seconds", ">8.3f"),
                ("eval images/s", "eval_images_per_s", ">14.0f")], result["rows"])
    for ab in result.get("prepared_inputs_ab", []):
        print(f"\nprepared acc + ASR, {ab['precision']}, {ab['rounds']} alternating rounds: images "
              f"converted per batch {ab['per_batch_images_per_s']:.0f}/s, kept as model inputs "
              f"{ab['kept_images_per_s']:.0f}/s ({ab['speedup']:.3f}x)")
    print(f"\ntarget: {result['target_eval_images_per_s']:.0f} eval images/s for acc + ASR in the training "
          "loop's configuration (prepared)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
