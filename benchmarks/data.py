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
process), and the AutoAugment image view (``ImageView``, torchvision's semantics) on CPU at 32 px
(batch 128) and 224 px (batch 32), on 1 and 2 torch threads, per image (the training view) and per
batch; next to it the kornia view it replaced ("before", kept here only; skipped without kornia).

    .venv/bin/python benchmarks/data.py                  # 32 and 224 px, 2 workers
    .venv/bin/python benchmarks/data.py --sizes 32 --workers 4
    .venv/bin/python benchmarks/data.py --views-only     # the SSL views alone

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
# The tiny MMCL+SSL bf16 step on 2 threads consumes about this many samples/s, one image view each.
TRAIN_SSL_STEP_SAMPLES_PER_S = 530.0
TARGET_HEADROOM = 5.0
STORED_SIZE = {32: 32, 224: 256}  # stored image side for each model resolution
VIEW_SHAPES = ((32, 128), (224, 32))  # (image side, batch) of the image-view measurements
VIEW_THREADS = (1, 2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,224", help="model resolutions, comma-separated (default 32,224)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers (default 2)")
    p.add_argument("--n32", type=int, default=4096, help="samples per dataset at 32 px (default 4096)")
    p.add_argument("--n224", type=int, default=256, help="samples per dataset at 224 px (default 256)")
    p.add_argument("--batch32", type=int, default=128, help="batch size at 32 px (default 128)")
    p.add_argument("--batch224", type=int, default=32, help="batch size at 224 px (default 32)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader; the first includes start-up")
    p.add_argument("--views-only", action="store_true", help="measure the SSL views only (no loaders)")
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


class KorniaImageView:
    """The image view before issue 11: kornia's AutoAugment, one sub-policy per image, seeded through a
    forked global RNG. Kept only for the "before" column; kornia's magnitudes are not torchvision's."""

    def __init__(self, policy: str = "imagenet"):
        from kornia.augmentation.auto import AutoAugment
        from kornia.augmentation.auto.autoaugment import autoaugment as kornia_aa

        table = {"imagenet": kornia_aa.imagenet_policy, "cifar10": kornia_aa.cifar10_policy,
                 "svhn": kornia_aa.svhn_policy}[policy]
        subpolicies = [tuple((op, float(p), mag) for op, p, mag in sub) for sub in table]
        self.modules = list(AutoAugment(policy=[list(sub) for sub in subpolicies]).children())
        self.canonical = torch.tensor([subpolicies.index(sub) for sub in subpolicies])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(generator)
        choice = self.canonical[torch.randint(len(self.modules), (x.shape[0],), generator=gen)]
        out = x.clone()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            for k in torch.unique(choice).tolist():
                rows = (choice == k).nonzero().squeeze(1)
                out.index_copy_(0, rows, self.modules[k](x.index_select(0, rows)))
        return out.clamp_(0, 1)


def view_images(size: int, batch: int) -> torch.Tensor:
    """float [0, 1] images of the synthetic world at the model resolution, as the training loop has them."""
    world = World(0, size)
    return torch.stack([world.train_pair(i)[0] for i in range(batch)]).float().div_(255)


def measure_image_views(repeats: int = 5) -> list[dict]:
    """Views/s of each image view, at each (size, batch) of VIEW_SHAPES and each of VIEW_THREADS."""
    views = {"torchvision (per image)": ImageView(), "torchvision (per batch)": ImageView(per_image=False)}
    try:
        views["kornia, before (per image)"] = KorniaImageView()
    except ImportError:
        print("  kornia not installed: no 'before' column", flush=True)
    threads_before = torch.get_num_threads()
    rows = []
    try:
        for threads in VIEW_THREADS:
            torch.set_num_threads(threads)
            for size, batch in VIEW_SHAPES:
                x = view_images(size, batch)
                for name, view in views.items():
                    view(x, generator=0)  # first call: plans, module set-up
                    best = min(timed(lambda r=r, v=view, x=x: v(x, generator=r))[1]
                               for r in range(1, repeats + 1))
                    rows.append({"view": f"autoaugment {name}", "unit": "image", "threads": threads,
                                 "image_size": size, "batch": batch, "samples_per_s": round(batch / best, 1)})
                    print(f"  {rows[-1]['view']}, {size} px, {threads} thread(s): "
                          f"{rows[-1]['samples_per_s']:.0f} views/s", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return rows


def train_step_rate() -> tuple[float, str]:
    """What the tiny model's bf16 MMCL step consumes: measured if available, else the target."""
    return _step_rate("mmcl", TRAIN_STEP_SAMPLES_PER_S, "target of benchmarks/train_step.py")


def _step_rate(objective: str, default: float, default_basis: str) -> tuple[float, str]:
    path = RESULTS / "train_step.json"
    with contextlib.suppress(OSError, ValueError, KeyError, StopIteration):
        result = json.loads(path.read_text())
        run = next(r for r in result["runs"] if r["objective"] == objective and r["precision"] == "bf16")
        basis = f"measured ({path.name}, {result['model']} batch {result['batch']})"
        return float(run["samples_per_s"]), basis
    return default, f"{default_basis} (no results file)"


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
    views = [measure_eda([caption for _, caption in pairs[:2000]])] if size <= 32 else []
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
        threads = f", {v['threads']} thread{'s' if v['threads'] > 1 else ''}" if "threads" in v else ""
        print(f"{v['view']}{where}{threads}: {v['samples_per_s']:.0f} {v['unit']}s/s")
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
    if not args.views_only:
        with tempfile.TemporaryDirectory(prefix="clip-backdoor-bench-data-") as tmp:
            for size in sizes:
                runs, size_views, size_writes = benchmark_size(size, args, Path(tmp))
                loaders += runs
                views += size_views
                writes += size_writes
    else:
        world = World(0, 32)
        views.append(measure_eda([world.train_pair(i)[1] for i in range(2000)]))
    views += measure_image_views()
    load_after = os.getloadavg()

    consumed, basis = train_step_rate()
    checks = {"tiny bf16 training step consumes (samples/s)": f"{consumed:.0f}, {basis}"}
    for name in ("synthetic", "synthetic cached"):
        run = next((r for r in loaders if r["source"] == name and r["image_size"] == 32), None)
        if run is not None:
            ratio = run["steady_samples_per_s"] / consumed
            checks[f"{name} 32 px / training step"] = round(ratio, 2)
            checks[f"{name} 32 px >= {TARGET_HEADROOM:.0f}x training step"] = ratio >= TARGET_HEADROOM
    ssl_rate, ssl_basis = _step_rate("mmcl+ssl", TRAIN_SSL_STEP_SAMPLES_PER_S,
                                     "the tiny MMCL+SSL bf16 step on 2 threads, as last measured")
    checks["tiny bf16 MMCL+SSL step consumes (image views/s)"] = f"{ssl_rate:.0f}, {ssl_basis}"
    for row in views:
        if row["view"] == "autoaugment torchvision (per image)" and row["image_size"] == 32:
            ratio = row["samples_per_s"] / ssl_rate
            where = f"image view 32 px, {row['threads']} thread(s)"
            checks[f"{where} / MMCL+SSL step"] = round(ratio, 2)
            checks[f"{where} >= {TARGET_HEADROOM:.0f}x MMCL+SSL step"] = ratio >= TARGET_HEADROOM

    result = {"benchmark": "data",
              "environment": environment(torch_threads=torch.get_num_threads(), workers=args.workers),
              "load_average_before": load_before, "load_average_after": load_after,
              "loaders": loaders, "views": views, "writes": writes, "checks": checks}
    return finish(args.out, result, print_table)


if __name__ == "__main__":
    sys.exit(main())
