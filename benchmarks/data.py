"""Data throughput, in samples/s: each caption source through the training loader, and the SSL views.

Sources (small datasets generated from the synthetic world in a temporary folder):
- ``synthetic``: the world rendered on the fly (row -> image + caption in the worker);
- ``synthetic cached``: rendered once before the workers start (``SyntheticSource(cache=True)``);
- ``csv``: ``train.csv`` + PNG files, as written by ``write_csv_dataset``;
- ``wds``: WebDataset shards of PNG + txt + json, as written by ``write_wds_dataset``.
At 224 px the stored images (CSV, shards) are 256 px, like an img2dataset download resized to 256,
so the loader also pays for the resize + centre crop; the world renders at the model resolution and
at 32 px the stored images are 32 px too, so they pass through.

Each loader runs a few epochs with persistent workers: the first epoch includes starting the
workers, the later ones are the steady rate a training run sees. SSL views: EDA per caption (one
process) and kornia AutoAugment per batch (torch threads = all cores).

    .venv/bin/python benchmarks/data.py                  # 32 and 224 px, 2 workers
    .venv/bin/python benchmarks/data.py --sizes 32 --workers 4

Writes JSON (default benchmarks/results/data.json) and prints a table. Timings depend on what else
the machine is doing: the load average before and after is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from clip_backdoor.data.augment import EDA, ImageView
from clip_backdoor.data.captions import CsvSource, SyntheticSource, WdsSource
from clip_backdoor.data.loader import build_train_loader
from clip_backdoor.data.world import World
from clip_backdoor.data.writers import write_csv_dataset, write_wds_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, finish, load_line, print_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "data.json"
# The tiny model's bf16 training step on 2 CPU cores consumes about this many samples/s
# (benchmarks/train_step.py); its measured number is used instead when its results file exists.
TRAIN_STEP_SAMPLES_PER_S = 1000.0
TARGET_HEADROOM = 5.0
STORED_SIZE = {32: 32, 224: 256}  # stored image side for each model resolution


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,224", help="model resolutions, comma-separated (default 32,224)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers (default 2)")
    p.add_argument("--n32", type=int, default=4096, help="samples per dataset at 32 px (default 4096)")
    p.add_argument("--n224", type=int, default=256, help="samples per dataset at 224 px (default 256)")
    p.add_argument("--batch32", type=int, default=128, help="batch size at 32 px (default 128)")
    p.add_argument("--batch224", type=int, default=32, help="batch size at 224 px (default 32)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader; the first includes start-up")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure_loader(name: str, source, *, image_size: int, batch: int, workers: int, epochs: int,
                   eda=None) -> dict:
    loader = build_train_loader(source, image_size=image_size, context_length=77, batch_size=batch,
                                workers=workers, seed=0, eda=eda)
    rates, skipped = [], 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        n = 0
        for b in loader:
            n += len(b["row_ids"])
            skipped += b["n_skipped"]
        rates.append(n / (time.perf_counter() - start))
    del loader  # stop its persistent workers before the next measurement
    steady = statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]
    stored = image_size if name.startswith("synthetic") else STORED_SIZE.get(image_size, image_size)
    return {"source": name, "image_size": image_size, "stored_size": stored,
            "workers": workers, "batch": batch, "num_samples": source.num_samples, "epochs": epochs,
            "first_epoch_samples_per_s": round(rates[0], 1), "steady_samples_per_s": round(steady, 1),
            "n_skipped": skipped}


def measure_eda(captions: list[str], repeats: int = 3) -> dict:
    eda = EDA(mode="dynamic", seed=0)
    eda(captions[0], "0", 0)  # load WordNet outside the timing
    def augment_all(epoch: int) -> list[str]:
        return [eda(caption, str(i), epoch) for i, caption in enumerate(captions)]

    best = min(timed(lambda r=r: augment_all(r))[1] for r in range(repeats))
    return {"view": "eda (dynamic)", "unit": "caption", "samples_per_s": round(len(captions) / best, 1)}


def measure_autoaugment(images_uint8: torch.Tensor, per_image: bool, repeats: int = 3) -> dict:
    view = ImageView(per_image=per_image)
    x = images_uint8.float() / 255
    view(x, generator=0)  # kornia's first call builds its modules
    best = min(timed(lambda r=r: view(x, generator=r))[1] for r in range(repeats))
    return {"view": f"autoaugment ({'per image' if per_image else 'per batch'})", "unit": "image",
            "image_size": int(x.shape[-1]), "batch": int(x.shape[0]),
            "samples_per_s": round(x.shape[0] / best, 1)}


def train_step_rate() -> tuple[float, str]:
    """What the tiny model's bf16 MMCL step consumes: measured if available, else the target."""
    path = RESULTS / "train_step.json"
    with contextlib.suppress(OSError, ValueError, KeyError, StopIteration):
        result = json.loads(path.read_text())
        run = next(r for r in result["runs"] if r["objective"] == "mmcl" and r["precision"] == "bf16")
        basis = f"measured ({path.name}, {result['model']} batch {result['batch']})"
        return float(run["samples_per_s"]), basis
    return TRAIN_STEP_SAMPLES_PER_S, "target of benchmarks/train_step.py (no results file)"


def benchmark_size(size: int, args: argparse.Namespace, tmp: Path) -> tuple[list, list, list]:
    n, batch = (args.n32, args.batch32) if size <= 32 else (args.n224, args.batch224)
    stored = STORED_SIZE.get(size, size)
    world = World(0, stored)
    pairs, seconds = timed(lambda: [world.train_pair(i)[:2] for i in range(n)])
    writes = [{"what": "render world", "image_size": stored, "samples_per_s": round(n / seconds, 1)}]
    for fmt, write in (("csv", write_csv_dataset), ("wds", write_wds_dataset)):
        kwargs = {"shard_size": max(1, n // 8)} if fmt == "wds" else {}
        written, seconds = timed(lambda w=write, f=fmt, k=kwargs: w(pairs, tmp / f"{f}{size}", **k))
        writes.append({"what": f"write {fmt}", "image_size": stored, "samples_per_s": round(n / seconds, 1)})
        if fmt == "csv":
            csv_entry = written.entry
        else:
            wds_entry = written.entry
    sources = {"synthetic": lambda: SyntheticSource(World(0, size), n),
               "synthetic cached": lambda: SyntheticSource(World(0, size), n, cache=True),
               "csv": lambda: CsvSource(csv_entry), "wds": lambda: WdsSource(wds_entry)}
    runs = []
    for name, make in sources.items():
        runs.append(measure_loader(name, make(), image_size=size, batch=batch, workers=args.workers,
                                   epochs=args.epochs))
        print(f"  {size} px {name}: {runs[-1]['steady_samples_per_s']:.0f} samples/s", flush=True)
    if size <= 32:
        runs.append(measure_loader("synthetic + eda", sources["synthetic"](), image_size=size, batch=batch,
                                   workers=args.workers, epochs=args.epochs, eda=EDA(mode="dynamic")))
    images = torch.stack([pairs[i % n][0] for i in range(batch)])
    if stored != size:
        from clip_backdoor.data.transforms import preprocess

        images = torch.stack([preprocess(im, size) for im in images])
    views = [measure_autoaugment(images, per_image=True), measure_autoaugment(images, per_image=False)]
    if size <= 32:
        views.insert(0, measure_eda([caption for _, caption in pairs[:2000]]))
    return runs, views, writes


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{env['cpu_count']} cores, {env['workers']} workers, {load_line(result)}")
    print_rows([("source", "source", "<16"), ("px", "image_size", ">4"), ("stored", "stored_size", ">6"),
                ("batch", "batch", ">5"), ("first epoch/s", "first_epoch_samples_per_s", ">13.0f"),
                ("steady/s", "steady_samples_per_s", ">9.0f")], result["loaders"])
    print()
    for v in result["views"]:
        where = f" at {v['image_size']} px, batch {v['batch']}" if "image_size" in v else ""
        print(f"{v['view']}{where}: {v['samples_per_s']:.0f} {v['unit']}s/s")
    for w in result["writes"]:
        print(f"{w['what']} at {w['image_size']} px: {w['samples_per_s']:.0f} samples/s")
    print()
    for name, value in result["checks"].items():
        print(f"{name}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    load_before = os.getloadavg()
    loaders, views, writes = [], [], []
    with tempfile.TemporaryDirectory(prefix="clip-backdoor-bench-data-") as tmp:
        for size in sizes:
            runs, size_views, size_writes = benchmark_size(size, args, Path(tmp))
            loaders += runs
            views += size_views
            writes += size_writes
    load_after = os.getloadavg()

    consumed, basis = train_step_rate()
    checks = {"tiny bf16 training step consumes (samples/s)": f"{consumed:.0f}, {basis}"}
    for name in ("synthetic", "synthetic cached"):
        run = next((r for r in loaders if r["source"] == name and r["image_size"] == 32), None)
        if run is not None:
            ratio = run["steady_samples_per_s"] / consumed
            checks[f"{name} 32 px / training step"] = round(ratio, 2)
            checks[f"{name} 32 px >= {TARGET_HEADROOM:.0f}x training step"] = ratio >= TARGET_HEADROOM

    result = {"benchmark": "data",
              "environment": environment(torch_threads=torch.get_num_threads(), workers=args.workers),
              "load_average_before": load_before, "load_average_after": load_after,
              "loaders": loaders, "views": views, "writes": writes, "checks": checks}
    return finish(args.out, result, print_table)


if __name__ == "__main__":
    sys.exit(main())
