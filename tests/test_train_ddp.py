"""Two gloo processes running the real loop match one process on the full batch.

The model is a small ViT (no BatchNorm: per-rank BN statistics legitimately differ from full-batch
ones), trained with MMCL for a few steps. Rank r holds rows r, r+2, ... of each global batch, so the
union of the ranks' batches is the single process's batch. What is compared:

- the gradients each optimizer step receives (through the DDP-wrapped model; Adam hides a uniform
  gradient scale, so weights after Adam alone would miss, say, a loss multiplied by the world size);
- the weights and the loss after training;
- evaluation under DDP: rank 0 alone evaluates, and its numbers are the checkpoint's;
- bad rows: ``n_skipped`` is the sum over ranks of the bad rows each read, each rank names five.

Both trainings run in the same two processes (one spawn: each process pays torch's start-up once).
"""

import json
import logging
import os
import socket
import time
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from _train_helpers import counting_load, write_bad_csv
from clip_backdoor.cli import main as cli
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.train.loop import train
from clip_backdoor.weights import load_checkpoint

VIT = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
EVAL = ["eval.n=24", "eval.batch_size=24", "eval.seed=3"]
DEADLINE_S = 300  # a hung rank must not hang the suite: both processes are killed after this


def _config(run_dir, model_path, batch_size, *extra):
    return load_config(TrainConfig, None, [*extra,
        f"run_dir={run_dir}", f"model={model_path}", f"batch_size={batch_size}", "epochs=1",
        "data.num_samples=128", "data.workers=0", "optim.warmup_steps=1", "optim.lr=1e-3",
        "threads=1", "save_every=0", "data.world.image_size=32", *EVAL,
        # Attention key biases have an exactly-zero true gradient; with Adam's tiny default eps their
        # float noise becomes +-lr steps that differ between any two summation orders.
        "optim.eps=1e-4"])


def _skips_config(run_dir, csv_path):
    # 64 rows, global batch 16 (8 per rank): 4 batches per rank read every row once an epoch.
    return load_config(TrainConfig, None, [
        f"run_dir={run_dir}", "model=tiny", "batch_size=16", "epochs=2", "data.kind=csv",
        f"data.path={csv_path}", "data.workers=0", "eval.every=0", "save_every=0", "threads=1"])


def record_gradients(steps: list) -> None:
    """From now on, every AdamW step first appends the gradients it is given (param-group order)."""
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        steps.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step


class _Named(logging.Handler):
    """Counts the skipped rows this process names in its log."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += record.getMessage().startswith("skipping ")


def _worker(rank, ports, tmp):
    from clip_backdoor import evaluate as ev
    from clip_backdoor.data.captions import CsvSource

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    steps, evaluated = [], []
    record_gradients(steps)
    real_evaluate = ev.evaluate_model

    def evaluate_model(*args, **kwargs):
        evaluated.append(rank)
        return real_evaluate(*args, **kwargs)

    ev.evaluate_model = evaluate_model
    log = logging.getLogger("clip_backdoor")  # what each rank would print, for the parent to read
    log.setLevel(logging.INFO)
    printed = logging.FileHandler(f"{tmp}/ddp.rank{rank}.log")
    log.addHandler(printed)
    train(_config(f"{tmp}/ddp", f"{tmp}/vit-tiny.json", 32, "report_to=tensorboard"))  # 16 per rank
    log.removeHandler(printed)
    printed.close()
    steps_of_first = list(steps)

    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh process group for the second training
    reads, named = Counter(), _Named()
    CsvSource.load = counting_load(reads)
    logging.getLogger("clip_backdoor.data").addHandler(named)  # the sources log their skips
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # tiny is a ResNet: 1x1 convolutions
        warnings.simplefilter("always")
        train(_skips_config(f"{tmp}/skips", f"{tmp}/data/train.csv"))
    stride_warnings = sum("Grad strides do not match bucket view strides" in str(w.message) for w in caught)

    os.environ["MASTER_PORT"] = str(ports[2])  # the third: deep clustering from the first's checkpoint
    from clip_backdoor import cleaning

    train(*_clustering(f"{tmp}/dc-ddp", f"{tmp}/ddp/checkpoints/latest.pt", cleaning))

    # A non-finite loss on rank 1 alone: both ranks stop at that step (none waits in an all-reduce).
    os.environ["MASTER_PORT"] = str(ports[3])
    from clip_backdoor.errors import UserError
    from clip_backdoor.objectives import Objective

    real_call = Objective.__call__

    def nan_on_rank_one(self, **kw):
        out = real_call(self, **kw)
        if rank == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    Objective.__call__ = nan_on_rank_one
    try:
        train(_config(f"{tmp}/nan", f"{tmp}/vit-tiny.json", batch_size=32))
        stopped = None
    except UserError as e:
        stopped = str(e)
    finally:
        Objective.__call__ = real_call
    torch.save({"steps": steps_of_first, "stopped": stopped, "evaluated": evaluated, "reads": dict(reads),
                "named": named.count, "stride_warnings": stride_warnings},
               f"{tmp}/rank{rank}.pt")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(tmp_path):
    ports = tuple(_free_port() for _ in range(4))
    context = mp.start_processes(_worker, args=(ports, str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the two DDP processes did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "vit-tiny.json").write_text(json.dumps(VIT))
    write_bad_csv(tmp / "data")
    _run_two_ranks(tmp)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single(two_ranks):
    tmp, _ = two_ranks
    steps = []
    real_step = torch.optim.AdamW.step
    try:
        record_gradients(steps)
        train(_config(tmp / "single", tmp / "vit-tiny.json", batch_size=32))
    finally:
        torch.optim.AdamW.step = real_step
    return tmp / "single", steps


def test_every_step_gets_the_full_batch_gradient(two_ranks, single):
    _, ranks = two_ranks
    _, single_steps = single
    assert len(single_steps) == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 4
    for step, (expected, got, other) in enumerate(zip(single_steps, ranks[0]["steps"], ranks[1]["steps"])):
        scale = max(g.abs().max().item() for g in expected)
        for i, (e, g, o) in enumerate(zip(expected, got, other)):
            assert torch.equal(g, o), (step, i)  # every rank steps with the same averaged gradient
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5 * scale, msg=f"step {step}, tensor {i}")


def test_weights_and_loss_match_the_single_process(two_ranks, single):
    tmp, _ = two_ranks
    single_dir, _ = single
    ddp = load_checkpoint(tmp / "ddp" / "checkpoints" / "latest.pt")
    one = load_checkpoint(single_dir / "checkpoints" / "latest.pt")
    assert ddp["step"] == one["step"] == 4
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    ddp_row = read_jsonl(tmp / "ddp" / "metrics.jsonl")[-1]
    assert ddp_row["loss"] == pytest.approx(read_jsonl(single_dir / "metrics.jsonl")[-1]["loss"], rel=1e-5)
    # TensorBoard: rank 0 alone writes (one event file, not one per rank)
    assert len(list((tmp / "ddp" / "tensorboard").iterdir())) == 1
    # batch_size is the global batch, whatever the launch; both the global and per-rank are recorded.
    assert (ddp_row["batch_size"], ddp_row["batch_size_per_rank"], ddp_row["world_size"]) == (32, 16, 2)
    resolved = yaml.safe_load((tmp / "ddp" / "config.yaml").read_text())["resolved"]
    assert resolved["batch_size_per_rank"] == 16 and resolved["world_size"] == 2


def _clustering(run_dir, init, cleaning):
    """Deep clustering (reference variant) without the SSL term: per-rank views would differ from the
    single process's. The head is outside the DDP module, in the main optimizer: its gradients are
    averaged by hand, and the k-means sees every rank's embeddings in row-id order."""
    params = {"clusters": 4, "iterations": 3, "ssl_weight": 0.0}
    cfg = load_config(TrainConfig, None, [
        f"run_dir={run_dir}", f"init_checkpoint={init}", "batch_size=32", "epochs=1", "data.num_samples=128",
        "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3", "threads=1",
        "save_every=0", "data.world.image_size=32", "optim.eps=1e-4"])
    recipe = cleaning.build_recipe("deep-clustering", params)
    return recipe.apply_to_config(cfg), recipe


def test_deep_clustering_head_under_ddp_matches_single_process(two_ranks):
    from clip_backdoor import cleaning

    tmp, _ = two_ranks
    train(*_clustering(tmp / "dc-single", tmp / "ddp" / "checkpoints" / "latest.pt", cleaning))
    ddp = load_checkpoint(tmp / "dc-ddp" / "checkpoints" / "latest.pt")
    single = load_checkpoint(tmp / "dc-single" / "checkpoints" / "latest.pt")
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = [read_jsonl(tmp / run / "metrics.jsonl")[-1] for run in ("dc-ddp", "dc-single")]
    # the clustering loss is computed on each rank's slice; logged, it is the global-batch mean
    assert rows[0]["loss_cluster"] == pytest.approx(rows[1]["loss_cluster"], rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)


def test_rank_zero_alone_evaluates_the_whole_set(two_ranks, tmp_path):
    tmp, ranks = two_ranks
    assert ranks[0]["evaluated"] == [0] and ranks[1]["evaluated"] == []
    row = read_jsonl(tmp / "ddp" / "metrics.jsonl")[-1]
    # The same checkpoint evaluated in one process by the command gives the logged numbers.
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--checkpoint", str(tmp / "ddp" / "checkpoints" / "latest.pt"), "--eval-n", "24",
                "--world-seed", "0", "--target", "banana", "--trigger", "badnet", "--seed", "3",
                "--device", "cpu", "--no-cache", "--out", str(out)]) == 0
    expected = json.loads(out.read_text())["metrics"]
    assert expected["n"] == 24
    assert {k: row[k] for k in expected} == expected


def test_skips_are_summed_over_ranks_and_each_rank_names_five(two_ranks):
    tmp, ranks = two_ranks
    rows = read_jsonl(tmp / "skips" / "metrics.jsonl")
    per_rank = [r["reads"] for r in ranks]
    assert all(per_rank[0].get(e) and per_rank[1].get(e) for e in (1, 2))  # both ranks read bad rows
    assert [r["n_skipped"] for r in rows] == [per_rank[0][e] + per_rank[1][e] for e in (1, 2)]
    assert [r["named"] for r in ranks] == [5, 5]


def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_ranks):
    _, ranks = two_ranks
    assert ranks[1]["stopped"].startswith("loss became nan at step 0 (epoch 1)")
    assert ranks[0]["stopped"].startswith("another rank's loss became non-finite at step 0 (epoch 1)")


def test_rank_zero_alone_prints_the_epoch_line(two_ranks):
    tmp, _ = two_ranks
    logs = [(tmp / f"ddp.rank{rank}.log").read_text() for rank in (0, 1)]
    assert logs[0].count("epoch 1/1") == 1 and "epoch 1/1" not in logs[1]


def test_ddp_buckets_match_the_channels_last_gradients(two_ranks):
    """No 'Grad strides do not match bucket view strides' (a copy of every 1x1-conv gradient on
    every step) while a ResNet trains under DDP, and its checkpoint is in standard strides."""
    tmp, ranks = two_ranks
    assert [r["stride_warnings"] for r in ranks] == [0, 0]
    state = load_checkpoint(tmp / "skips" / "checkpoints" / "latest.pt")["state_dict"]
    assert all(v.stride() == torch.empty(v.shape).stride() for v in state.values() if v.ndim)
