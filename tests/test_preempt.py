"""Preemption-safe, mid-epoch exact resume: a real SIGTERM at a random step, a crash after a periodic
mid-epoch checkpoint, and a paused run (stop_epoch) all end exactly like an uninterrupted run."""

import json
import os
import random
import signal

import pytest
import torch

from clip_backdoor import cleaning
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.data.captions import make_source
from clip_backdoor.data.loader import build_train_loader
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.train.loop import Recipe, train
from clip_backdoor.train.preempt import Guard, Preempted
from clip_backdoor.weights import load_checkpoint

# 256 pairs in batches of 32: 8 steps an epoch, so an interruption can land anywhere inside one.
SMALL = ["data.num_samples=256", "data.workers=0", "batch_size=32", "eval.n=40", "eval.batch_size=40",
         "optim.warmup_steps=2", "optim.lr=2e-3", "threads=1", "save_every=0"]
STEPS_PER_EPOCH = 8


def cfg_for(run_dir, *extra):
    return load_config(TrainConfig, None, [f"run_dir={run_dir}", *SMALL, *extra])


def comparable(run_dir):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")["state_dict"]


def assert_same_run(a, b):
    assert comparable(a) == comparable(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class SignalAt(Recipe):
    """Sends this process a real signal from inside training step ``step`` (0-based)."""

    def __init__(self, step, signum=signal.SIGTERM):
        self.at, self.signum = step, signum

    def extra_losses(self, outputs, batch, ctx):
        if ctx.step == self.at:
            os.kill(os.getpid(), self.signum)
        return {}


def signalling(recipe, step, signum=signal.SIGTERM):
    """``recipe`` (a real cleaning method), sending this process ``signum`` from inside ``step``."""
    real = recipe.extra_losses

    def extra_losses(outputs, batch, ctx):
        if ctx.step == step:
            os.kill(os.getpid(), signum)
        return real(outputs, batch, ctx)

    recipe.extra_losses = extra_losses
    return recipe


class CrashAt(Recipe):
    def __init__(self, step):
        self.at = step

    def extra_losses(self, outputs, batch, ctx):
        if ctx.step == self.at:
            raise KeyboardInterrupt
        return {}


@pytest.fixture(scope="module")
def full_ssl(tmp_path_factory):
    """The uninterrupted reference: 2 epochs of MMCL+SSL (image views and EDA captions)."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(cfg_for(run, "epochs=2", "objective.ssl_weight=1"))
    return run


def test_sigterm_at_a_random_step_resumes_exactly(full_ssl, tmp_path):
    step = random.Random(12).randrange(1, 2 * STEPS_PER_EPOCH - 1)  # anywhere but the very ends
    cut = tmp_path / "cut"
    with pytest.raises(Preempted) as info:
        train(cfg_for(cut, "epochs=2", "objective.ssl_weight=1"), SignalAt(step))
    assert info.value.step == step + 1  # the step in flight was finished
    ckpt = load_checkpoint(cut / "checkpoints" / "latest.pt")
    assert ckpt["step"] == step + 1 and ckpt["mid_epoch"]["batches"] == (step + 1) % STEPS_PER_EPOCH
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard gave the handler back
    train(cfg_for(cut, "epochs=2", "objective.ssl_weight=1"))
    assert_same_run(full_ssl, cut)


def test_sigusr1_with_dataloader_workers_resumes_exactly(tmp_path):
    # Two workers: worker 0 builds the even batches, worker 1 the odd ones; resuming at an odd batch
    # checks that the collection order survives the skipped part.
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["epochs=2", "data.workers=2"]
    train(cfg_for(full, *args))
    with pytest.raises(Preempted):
        train(cfg_for(cut, *args), SignalAt(STEPS_PER_EPOCH + 2, signal.SIGUSR1))  # 3 batches of epoch 2
    assert load_checkpoint(cut / "checkpoints" / "latest.pt")["mid_epoch"]["batches"] == 3
    assert [r["epoch"] for r in read_jsonl(cut / "metrics.jsonl")] == [1]
    train(cfg_for(cut, *args))
    assert_same_run(full, cut)


def test_a_crash_resumes_from_the_last_periodic_mid_epoch_checkpoint(full_ssl, tmp_path):
    cut = tmp_path / "cut"
    args = ["epochs=2", "objective.ssl_weight=1", "save_every_steps=3"]
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(cut, *args), CrashAt(STEPS_PER_EPOCH + 5))  # after the save at step 12
    ckpt = load_checkpoint(cut / "checkpoints" / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["mid_epoch"]["batches"]) == (1, 12, 4)
    train(cfg_for(cut, *args))
    assert_same_run(full_ssl, cut)


def test_a_cleaning_run_stopped_in_its_first_epoch_keeps_its_epoch_0(full_ssl, tmp_path):
    """Epoch 0 (the starting model, evaluated before the first step) is not evaluated again on the
    half-trained model of a resume inside epoch 1."""
    start = ["method=mmcl", "eval_at_start=true", "epochs=2",
             f"init_checkpoint={full_ssl / 'checkpoints' / 'latest.pt'}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg_for(full, *start), cleaning.build_recipe("mmcl"))
    with pytest.raises(Preempted):
        train(cfg_for(cut, *start), signalling(cleaning.build_recipe("mmcl"), 3))
    assert [r["epoch"] for r in read_jsonl(cut / "metrics.jsonl")] == [0]
    train(cfg_for(cut, *start), cleaning.build_recipe("mmcl"))
    assert_same_run(full, cut)


@pytest.mark.parametrize("variant", ["reference", "fixed"])
def test_deep_clustering_resumes_mid_epoch_with_its_clusters(full_ssl, tmp_path, variant):
    """The reference variant's head is in the model's optimizer (its group comes back before the
    optimizer's state); the fixed variant's has its own optimizer."""
    start = ["method=deep-clustering", "eval_at_start=true", "epochs=2",
             f"init_checkpoint={full_ssl / 'checkpoints' / 'latest.pt'}"]
    params = {"clusters": 4, "iterations": 3, "variant": variant}

    def recipe():
        return cleaning.build_recipe("deep-clustering", params)

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg_for(full, *start), recipe())
    with pytest.raises(Preempted):
        train(cfg_for(cut, *start), signalling(recipe(), STEPS_PER_EPOCH + 4))  # in epoch 2
    assert load_checkpoint(cut / "checkpoints" / "latest.pt")["recipe"]["head"]  # the epoch's head
    train(cfg_for(cut, *start), recipe())
    assert_same_run(full, cut)


def test_stop_epoch_pauses_on_the_full_schedule(full_ssl, tmp_path, caplog):
    paused = tmp_path / "paused"
    row = train(cfg_for(paused, "epochs=2", "objective.ssl_weight=1", "stop_epoch=1"))
    assert row["epoch"] == 1 and [r["epoch"] for r in read_jsonl(paused / "metrics.jsonl")] == [1]
    assert comparable(paused) == comparable(full_ssl)[:1]  # same lr schedule: the 2-epoch one
    caplog.set_level("INFO")
    train(cfg_for(paused, "epochs=2", "objective.ssl_weight=1", "stop_epoch=1"))
    assert "paused (stop_epoch 1)" in caplog.text
    train(cfg_for(paused, "epochs=2", "objective.ssl_weight=1"))
    assert_same_run(full_ssl, paused)


def test_mid_epoch_checkpoint_refuses_another_batch_size(tmp_path):
    cut = tmp_path / "cut"
    with pytest.raises(Preempted):
        train(cfg_for(cut, "epochs=1"), SignalAt(2))
    with pytest.raises(UserError, match="batch 3 of 8 in epoch 1.*does not fit 4 batches per epoch"):
        train(cfg_for(cut, "epochs=1", "batch_size=64"))


def test_loader_started_mid_epoch_yields_the_rest_of_the_epoch():
    source = make_source({"kind": "synthetic", "num_samples": 96, "seed": 0, "world": {"image_size": 32}})
    for workers in (0, 2):
        loader = build_train_loader(source, image_size=32, context_length=16, batch_size=8, workers=workers,
                                    seed=3)
        loader.set_epoch(2)
        whole = [b["row_ids"] for b in loader]
        loader.set_epoch(2, start_batch=5)
        assert [b["row_ids"] for b in loader] == whole[5:]
        loader.set_epoch(3)
        assert len(list(loader)) == 12  # the next epoch starts at its beginning again
    with pytest.raises(UserError, match="start_batch 13"):
        loader.set_epoch(1, start_batch=13)
    # a random-access source does not read the rows of the batches before the resume point
    loads = []
    real_load = source.load
    source.load = lambda index: loads.append(index) or real_load(index)
    loader = build_train_loader(source, image_size=32, context_length=16, batch_size=8, workers=0, seed=3)
    loader.set_epoch(2, start_batch=5)
    assert len(list(loader)) == 7 and len(loads) == 7 * 8


def test_guard_restores_handlers_and_ignores_other_threads():
    import threading

    before = signal.getsignal(signal.SIGUSR1)
    with Guard() as guard:
        assert signal.getsignal(signal.SIGUSR1) == guard._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("g", Guard().__enter__()))
    thread.start()
    thread.join()
    assert result["g"]._previous == {}


def test_webdataset_stream_resumed_mid_epoch_yields_the_rest_of_the_epoch(tmp_path):
    """Streams are read again up to the resume point (their position is only known by reading), so
    the rest of the epoch, skip counts included, is the uninterrupted one, for each worker count."""
    from clip_backdoor.data.captions import WdsSource
    from test_captions import write_shard

    for i in range(4):
        write_shard(tmp_path / f"shard-{i:06d}.tar", [str(k) for k in range(6 * i, 6 * i + 6)])
    with open(tmp_path / "shard-000002.tar", "r+b") as f:
        f.truncate(1500)  # a broken shard: the rest of it is skipped and counted
    (tmp_path / "sizes.json").write_text(json.dumps({f"shard-{i:06d}.tar": 6 for i in range(4)}))
    for workers in (0, 2):
        source = WdsSource(str(tmp_path / "shard-*.tar"), seed=1, shuffle_buffer=4)
        loader = build_train_loader(source, image_size=8, context_length=16, batch_size=2, workers=workers,
                                    seed=2)
        loader.set_epoch(3)
        whole = [(b["row_ids"], b["n_skipped"]) for b in loader]
        assert len(whole) == 12 and sum(n for _, n in whole) > 0
        for start in (1, 3, 6):
            loader.set_epoch(3, start_batch=start)
            assert [(b["row_ids"], b["n_skipped"]) for b in loader] == whole[start:], (workers, start)


def test_sigterm_to_the_whole_process_group_with_dataloader_workers(tmp_path):
    """A cluster signals every process of a job, dataloader workers included, in no fixed order: here
    the workers get SIGTERM first and die, then the whole group. The training process takes the
    workers' deaths for the stop they are, writes its checkpoint and exits 75 (requeue)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "clip_backdoor.cli", "pretrain", "--run-dir", str(run), "--epochs", "2",
           *SMALL, "data.num_samples=1024", "data.workers=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/2" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        own = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        workers = [int(pid) for pid in children.split() if Path(f"/proc/{pid}/cmdline").read_bytes() == own]
        assert len(workers) == 2, children  # the two forked dataloader workers
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # then every process of the group, as SLURM does
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 75, text[-2000:]
    assert "killed by signal" not in text and "Traceback" not in text and "resumable from" in text
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["epoch"] == 1 or "mid_epoch" in ckpt  # the state at the signal was saved


def test_the_loader_failing_after_a_stop_ends_the_epoch_there():
    """Once a stop signal came, a loader whose workers died with it ends the epoch (not the run);
    without a signal, or under DDP (the other ranks may have their batch), the error stands."""
    from clip_backdoor.train.distributed import DistEnv

    def loader():
        yield from (1, 2)
        raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    guard = Guard()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(guard.batches(loader(), DistEnv()))
    guard.request()
    assert list(guard.batches(loader(), DistEnv())) == [1, 2]
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(guard.batches(loader(), DistEnv(rank=0, world_size=2)))


def test_an_epoch_cut_short_by_the_loader_is_saved_where_it_ended(full_ssl, tmp_path, monkeypatch):
    real = Guard.batches
    seen = []

    def cut_short(self, loader, env):  # the workers "die" with the signal after 11 batches in all
        for batch in real(self, loader, env):
            if len(seen) == STEPS_PER_EPOCH + 3:
                self.request()
                return
            seen.append(1)
            yield batch

    cut = tmp_path / "cut"
    monkeypatch.setattr(Guard, "batches", cut_short)
    with pytest.raises(Preempted):
        train(cfg_for(cut, "epochs=2", "objective.ssl_weight=1"))
    assert load_checkpoint(cut / "checkpoints" / "latest.pt")["mid_epoch"]["batches"] == 3
    monkeypatch.setattr(Guard, "batches", real)
    train(cfg_for(cut, "epochs=2", "objective.ssl_weight=1"))
    assert_same_run(full_ssl, cut)
