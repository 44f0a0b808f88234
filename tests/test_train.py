"""The one training loop: learning, exact resume, cleaning from a checkpoint, failure modes, DDP."""

import copy
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import clip_backdoor
from _train_helpers import CORRUPT, MISSING, counting_load, write_bad_csv
from clip_backdoor import cleaning
from clip_backdoor.cli import main as cli
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.data.captions import CsvSource
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.train.loop import Recipe, train
from clip_backdoor.weights import load_checkpoint

SMALL = ["data.num_samples=256", "data.workers=0", "batch_size=64", "eval.n=60", "eval.batch_size=64",
         "optim.warmup_steps=2", "optim.lr=2e-3", "threads=1"]


def cfg_for(run_dir, *extra, **base):
    return load_config(TrainConfig, None, [f"run_dir={run_dir}", *SMALL, *extra], base=base or None)


def metrics(run_dir):
    return read_jsonl(run_dir / "metrics.jsonl")


def comparable(rows):
    """Metrics lines without the timing fields (which legitimately differ between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model pre-trained for 2 epochs: the start of the cleaning tests."""
    run = tmp_path_factory.mktemp("pre") / "run"
    train(cfg_for(run, "epochs=2"))
    return run


def test_pretrain_writes_run_dir_and_learns(pretrained):
    rows = metrics(pretrained)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["loss"] < rows[0]["loss"]
    for key in ("loss", "loss_mmcl", "lr", "logit_scale", "samples_per_s", "seconds", "n_skipped", "acc1",
                "acc5", "asr1", "asr5", "ra1", "n", "n_asr"):
        assert key in rows[1], key
    assert "loss_ssl" not in rows[1]
    assert (pretrained / "config.yaml").exists()
    saved = {p.name for p in (pretrained / "checkpoints").iterdir()}
    assert saved == {"epoch_1.pt", "epoch_2.pt", "latest.pt"}
    ckpt = torch.load(pretrained / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and ckpt["model"]["name"] == "tiny"
    # logit_scale is the parameter itself (ln s), scale its exp (the factor on cosine similarities).
    assert rows[1]["logit_scale"] == pytest.approx(ckpt["state_dict"]["logit_scale"].item())
    assert rows[1]["scale"] == pytest.approx(math.exp(rows[1]["logit_scale"]))
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert set(ckpt) >= {"epoch", "step", "model", "state_dict", "optimizer", "scheduler", "scaler", "rng",
                         "config"}


def test_loss_decreases_over_more_epochs(tmp_path):
    train(cfg_for(tmp_path / "r", "epochs=4", "eval.every=0", "save_every=0"))
    losses = [r["loss"] for r in metrics(tmp_path / "r")]
    assert losses[-1] < losses[0] - 0.3, losses


class Recorder(Recipe):
    """Records the epochs a run starts and the global step of every training step it takes."""

    def __init__(self):
        self.epochs, self.steps = [], []

    def on_epoch_start(self, ctx):
        self.epochs.append(ctx.epoch)

    def extra_losses(self, outputs, batch, ctx):
        self.steps.append(ctx.step)
        return {}


def kill_when_checkpointing(monkeypatch, epoch):
    """Simulates the process being killed after epoch ``epoch``'s metrics line is written, while its
    checkpoint is being saved (any torch.save of that epoch's checkpoint dies)."""
    real_save = torch.save

    def save(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch and "optimizer" in obj:
            raise KeyboardInterrupt
        return real_save(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_resume_is_exact(tmp_path, monkeypatch, caplog):
    args = ("epochs=3", "objective.ssl_weight=1", "data.num_samples=128", "batch_size=32", "eval.n=20",
            "eval.every=3")
    full = Recorder()
    train(cfg_for(tmp_path / "full", *args), full)
    assert full.epochs == [1, 2, 3] and full.steps == list(range(12))

    cut = tmp_path / "cut"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        kill_when_checkpointing(m, epoch=2)
        train(cfg_for(cut, *args))
    # Epoch 2 was logged but never checkpointed: its line must go, and training resumes after epoch 1.
    assert [r["epoch"] for r in metrics(cut)] == [1, 2]
    assert load_checkpoint(cut / "checkpoints" / "latest.pt")["epoch"] == 1

    resumed = Recorder()
    with caplog.at_level(logging.INFO, logger="clip_backdoor.train.loop"):
        train(cfg_for(cut, *args), resumed)
    assert f"resuming {cut} from epoch 1 (step 4)" in caplog.text
    assert resumed.epochs == [2, 3] and resumed.steps == list(range(4, 12))  # nothing of epoch 1 redone
    assert [r["epoch"] for r in metrics(cut)] == [1, 2, 3]
    assert comparable(metrics(tmp_path / "full")) == comparable(metrics(cut))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(cut / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def assert_same_run(a_dir, b_dir):
    assert comparable(metrics(a_dir)) == comparable(metrics(b_dir))
    a = load_checkpoint(a_dir / "checkpoints" / "latest.pt")["state_dict"]
    b = load_checkpoint(b_dir / "checkpoints" / "latest.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# A child process running a tiny pretrain through the CLI. With --slow-save every checkpoint is
# written in 20 pieces over ~1 s, so the parent can kill it while it is inside torch.save.
CHILD = """
import io, signal, sys, time
import torch
# Ctrl-C as a shell gives it: an ignored SIGINT is inherited, and pytest started as a background job
# of a shell without job control (`pytest &` in a script) starts with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] == "--slow-save":
    real_save = torch.save
    def slow_save(obj, path):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            for i in range(20):
                f.write(data[i * len(data) // 20:(i + 1) * len(data) // 20])
                f.flush()
                time.sleep(0.05)
    torch.save = slow_save
from clip_backdoor.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_child(run_dir, *overrides, slow_save=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(clip_backdoor.__file__).resolve().parents[1])}
    argv = [sys.executable, "-c", CHILD, "--slow-save" if slow_save else "--plain", "pretrain",
            f"run_dir={run_dir}", *SMALL, *overrides]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child did not get there in time")
        time.sleep(0.005)


def temp_files(run_dir):
    return [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".")]


@pytest.mark.parametrize("seed", [0])
def test_kill_during_a_checkpoint_write_then_resume_is_exact_and_leaves_no_temp_file(tmp_path, seed):
    rng = random.Random(seed)
    target = rng.randint(1, 3)  # which of epoch_1, latest (1), epoch_2 to interrupt
    delay = rng.uniform(0.0, 0.3)  # how far into that ~1 s write
    run = ["epochs=2", "eval.every=0"]  # MMCL, no eval: test_resume_is_exact covers the SSL views and eval
    cut = tmp_path / "cut"
    proc = start_child(cut, *run, slow_save=True)
    seen: set[str] = set()

    def writes_started():  # checkpoint writes only (config.yaml and metrics.jsonl are atomic too)
        seen.update(p.name for p in temp_files(cut) if ".pt." in p.name)
        return len(seen) >= target

    wait_for(writes_started, proc)
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler, no finally
    proc.communicate()
    assert temp_files(cut), "the kill should land inside the checkpoint write"

    train(cfg_for(cut, *run))  # resumed in this process
    assert temp_files(cut) == []
    train(cfg_for(tmp_path / "full", *run))
    assert_same_run(tmp_path / "full", cut)


def test_ctrl_c_in_pretrain_is_one_line_exit_130_and_resumable(tmp_path):
    run = tmp_path / "r"
    proc = start_child(run, "epochs=50", "eval.every=0", "data.workers=1")
    wait_for(lambda: (run / "checkpoints" / "latest.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == ("clip-backdoor pretrain: interrupted; run the same command "
                                            "again to resume from the last finished epoch "
                                            "(checkpoints/latest.pt)")
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["epoch"] >= 1


def test_keyboard_interrupt_reaches_the_user_as_one_line(tmp_path, monkeypatch, capsys):
    from clip_backdoor.train import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), *SMALL]) == 130
    assert cli(["clean", "--checkpoint", "x.pt", "--run-dir", str(tmp_path / "c"), *SMALL]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(";")[0] for line in lines if line] == ["clip-backdoor pretrain: interrupted",
                                                               "clip-backdoor clean: interrupted"]


def test_start_and_resume_clear_only_dead_writers_temp_files(pretrained, tmp_path):
    from clip_backdoor import fileio

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = fileio.host_id()
    stale = pretrained / "checkpoints" / f".latest.pt.{done.pid}@{host}.abcd1234.tmp"
    writing = pretrained / "checkpoints" / f".epoch_2.pt.{live.pid}@{host}.abcd1234.tmp"
    try:
        stale.write_bytes(b"half a checkpoint")
        writing.write_bytes(b"being written")
        train(cfg_for(pretrained, "epochs=2"))  # finished: reported, and its dead writer's temp file gone
        assert not stale.exists() and writing.exists()
    finally:
        live.kill()
        live.wait()
        writing.unlink(missing_ok=True)


def test_resume_of_finished_run_says_so(pretrained, caplog):
    before = (pretrained / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO):
        row = train(cfg_for(pretrained, "epochs=2"))
    assert "is finished (epoch 2 of 2)" in caplog.text
    assert row["epoch"] == 2 and (pretrained / "metrics.jsonl").read_text() == before


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from clip_backdoor.objectives import Objective

    real = Objective.__call__
    calls = {"n": 0}

    def poisoned(self, **kw):
        out = real(self, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # step 5, inside epoch 2 (4 steps per epoch)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Objective, "__call__", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at step 5 \(epoch 2\).*latest\.pt"):
        train(cfg_for(tmp_path / "r", "epochs=3", "eval.every=0"))
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt")["epoch"] == 1


def test_clean_evaluates_epoch_zero_and_records_method(pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "latest.pt"
    code = cli(["clean", "--checkpoint", str(ckpt), "--method", "cleanclip", "--ssl-weight", "2",
                "--run-dir", str(tmp_path / "c"), "--epochs", "1", *SMALL])
    assert code == 0
    rows = metrics(tmp_path / "c")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert "loss" not in rows[0] and {"acc1", "asr1", "n_asr"} <= set(rows[0])
    assert rows[1]["loss_ssl"] > 0 and rows[1]["loss_mmcl"] > 0
    assert all(r["method"] == {"name": "cleanclip", "ssl_weight": 2.0} for r in rows)
    # Epoch 0 is the poisoned model itself: same numbers as its last pre-training evaluation.
    last = metrics(pretrained)[-1]
    assert rows[0]["acc1"] == last["acc1"] and rows[0]["asr1"] == last["asr1"]


def test_clean_mmcl_only_has_no_ssl_term(pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "latest.pt"
    assert cli(["clean", "--checkpoint", str(ckpt), "--method", "mmcl", "--run-dir", str(tmp_path / "c"),
                "--epochs", "1", "eval.every=0", *SMALL]) == 0
    assert "loss_ssl" not in metrics(tmp_path / "c")[-1]


def first_step_state(monkeypatch):
    """The optimizer state the loop hands to its first AdamW step (filled in when that step runs)."""
    seen = {}
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not seen:
            seen.update(copy.deepcopy(self.state_dict()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_optimizer_state_inherit_keeps_the_adam_moments_and_weight_decay(pretrained, tmp_path, monkeypatch,
                                                                          caplog):
    ckpt = str(pretrained / "checkpoints" / "latest.pt")
    old = load_checkpoint(ckpt)["optimizer"]
    assert old["state"] and all(s["step"].item() == 8 for s in old["state"].values())
    argv = ["clean", "--checkpoint", ckpt, "--method", "mmcl", "--epochs", "1", "optim.weight_decay=5",
            "eval.every=0", "eval_at_start=false", *SMALL]
    seen = first_step_state(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert cli([*argv, "--optimizer-state", "inherit", "--run-dir", str(tmp_path / "i")]) == 0
    assert "is NOT applied" in caplog.text
    # The first step sees the checkpoint's step count and moment tensors, exactly.
    assert seen["state"].keys() == old["state"].keys()
    for index, moments in old["state"].items():
        assert seen["state"][index]["step"].item() == 8
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(seen["state"][index][name], moments[name]), (index, name)
    saved = load_checkpoint(tmp_path / "i" / "checkpoints" / "latest.pt")["optimizer"]
    assert all(s["step"].item() == 8 + 4 for s in saved["state"].values())  # counting on from the old step
    assert sorted(g["weight_decay"] for g in saved["param_groups"]) == [0.0, 0.1]

    seen.clear()
    assert cli([*argv, "--run-dir", str(tmp_path / "f")]) == 0  # fresh (the default): no moments at all
    assert seen["state"] == {}
    saved = load_checkpoint(tmp_path / "f" / "checkpoints" / "latest.pt")["optimizer"]
    assert all(s["step"].item() == 4 for s in saved["state"].values())
    assert sorted(g["weight_decay"] for g in saved["param_groups"]) == [0.0, 5.0]


def _decayed_norm(ckpt):
    from clip_backdoor.train.optim import split_decay
    from clip_backdoor.weights import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt)
    decay, _ = split_decay(model)
    return torch.sqrt(sum((p.detach() ** 2).sum() for p in decay)).item()


def test_heavy_weight_decay_is_really_applied(pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "latest.pt"
    start = load_checkpoint(ckpt)
    norms = {}
    for wd in ("0", "50"):
        run = tmp_path / f"wd{wd}"
        assert cli(["clean", "--checkpoint", str(ckpt), "--method", "heavy-wd", "--weight-decay", wd,
                    "--run-dir", str(run), "--epochs", "1", "eval.every=0", "eval_at_start=false",
                    *SMALL]) == 0
        end = load_checkpoint(run / "checkpoints" / "latest.pt")
        groups = {g["group"]: g["weight_decay"] for g in end["optimizer"]["param_groups"]}
        assert groups == {"decay": float(wd), "no_decay": 0.0}
        norms[wd] = _decayed_norm(end)
    before = _decayed_norm(start)
    # 4 steps of decoupled decay at lr <= 2e-3 shrink weights by at most (1 - lr*wd) per step.
    assert norms["50"] < 0.9 * norms["0"] and norms["50"] < before


def test_shrink_perturb_is_applied_once_before_training(pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "latest.pt"
    assert cli(["clean", "--checkpoint", str(ckpt), "--method", "shrink-perturb", "--shrink", "0.5",
                "--run-dir", str(tmp_path / "s"), "--epochs", "1", "eval.every=0", *SMALL,
                "optim.lr=1e-12"]) == 0
    before = load_checkpoint(ckpt)["state_dict"]
    after = load_checkpoint(tmp_path / "s" / "checkpoints" / "latest.pt")["state_dict"]
    w = "text_projection"
    assert torch.allclose(after[w], 0.5 * before[w], atol=1e-3 * before[w].abs().max().item())


def test_deep_clustering_runs_end_to_end(pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "latest.pt"
    assert cli(["clean", "--checkpoint", str(ckpt), "--method", "deep-clustering", "--clusters", "8",
                "--iterations", "5", "--run-dir", str(tmp_path / "d"), "--epochs", "2", "eval.every=0",
                "eval_at_start=false", *SMALL]) == 0
    rows = metrics(tmp_path / "d")
    assert all(r["loss_cluster"] > 0 and r["method"]["name"] == "deep-clustering" for r in rows)
    assert all(r["loss"] == pytest.approx(r["loss_mmcl"] + r["loss_ssl"] + r["loss_cluster"]) for r in rows)


def _clustering_context(pretrained, monkeypatch, n_clusters=6):
    """A context whose cleaning-set embeddings form ``n_clusters`` separated clusters (a barely
    trained tiny model's embeddings are nearly collinear)."""
    from clip_backdoor.objectives import Objective
    from clip_backdoor.train.distributed import DistEnv
    from clip_backdoor.train.loop import RunContext, build_loader
    from clip_backdoor.train.optim import build_optimizer
    from clip_backdoor.weights import model_from_checkpoint

    model, _ = model_from_checkpoint(pretrained / "checkpoints" / "latest.pt")
    cfg = cfg_for(pretrained)
    loader = build_loader(cfg, image_size=model.image_size, context_length=model.context_length,
                          env=DistEnv(), with_text_view=False)
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, model.config["embed_dim"], generator=g),
                                            dim=-1)
    row_ids = [str(i) for i in range(loader.source.num_samples)]
    noise = 0.1 * torch.randn(len(row_ids), centers.shape[1], generator=g)
    feats = torch.nn.functional.normalize(centers[torch.arange(len(row_ids)) % n_clusters] + noise, dim=-1)
    monkeypatch.setattr(cleaning, "embed_images", lambda *a: (row_ids, feats))
    ctx = RunContext(cfg=cfg, env=DistEnv(), device=torch.device("cpu"), model=model, loader=loader,
                     objective=Objective(), optimizer=build_optimizer(model, lr=1e-3, weight_decay=0.1),
                     epoch=1)
    return ctx, row_ids, feats, centers


def test_deep_clustering_fixed_variant_labels_are_stable_and_the_head_learns(pretrained, monkeypatch):
    ctx, row_ids, feats, _ = _clustering_context(pretrained, monkeypatch)
    recipe = cleaning.build_recipe("deep-clustering", {"clusters": 6, "iterations": 10, "head_lr": 0.05,
                                                       "variant": "fixed"})
    recipe.on_epoch_start(ctx)
    first = dict(recipe.assignment)
    recipe.on_epoch_start(ctx)
    assert recipe.assignment == first
    assert len({(first[r], int(r) % 6) for r in row_ids}) == 6  # recovers the constructed clusters
    assert len(ctx.optimizer.param_groups) == 2  # its head has its own optimizer
    batch = {"row_ids": row_ids[:64]}
    out = {"image_features": feats[:64]}
    losses = []
    for _ in range(50):
        loss = recipe.extra_losses(out, batch, ctx)["loss_cluster"]
        recipe.head_opt.zero_grad()
        loss.backward()
        recipe.head_opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_deep_clustering_reference_variant(pretrained, monkeypatch):
    """The reference: the head (N(0, 0.01), bias 0) joins the main optimizer without weight decay, and
    each step's labels are the nearest centroids of the *current* embeddings."""
    from clip_backdoor.train.optim import set_lr

    ctx, row_ids, feats, centers = _clustering_context(pretrained, monkeypatch)
    recipe = cleaning.build_recipe("deep-clustering", {"clusters": 6, "iterations": 10})
    model_groups = len(ctx.optimizer.param_groups)
    recipe.on_epoch_start(ctx)
    head = recipe.head
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.1) and torch.equal(head.bias, torch.zeros(6))
    group = ctx.optimizer.param_groups[-1]
    assert len(ctx.optimizer.param_groups) == model_groups + 1 and group["weight_decay"] == 0.0
    assert group["params"] == list(head.parameters()) and recipe.extra_optimizers() == []
    set_lr(ctx.optimizer, 3e-4)  # the loop's schedule reaches the head too
    assert group["lr"] == 3e-4
    # Labels follow the current embeddings: move images 0..9 onto the centre of cluster 3.
    batch = {"row_ids": row_ids[:10]}
    moved = torch.nn.functional.normalize(centers[3].expand(10, -1) + 0.01 * feats[:10], dim=-1)
    nearest = (moved @ recipe.centroids.T).argmax(dim=1)
    assert len(set(nearest.tolist())) == 1  # all in one cluster now
    assert torch.equal(recipe.pseudo_labels(moved, batch, ctx), nearest)
    fixed = torch.tensor([recipe.assignment[r] for r in batch["row_ids"]])
    assert not torch.equal(fixed, nearest)  # the per-epoch labels would have said otherwise
    # The loss is weight x CE(head(embedding), nearest centroid).
    loss = recipe.extra_losses({"image_features": moved}, batch, ctx)["loss_cluster"]
    expected = 5.0 * torch.nn.functional.cross_entropy(head(moved), nearest)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert head.weight.grad is not None and recipe.parameters_outside_model() == list(head.parameters())
    ctx.optimizer.step()
    assert ctx.optimizer.state[head.weight]  # the model's optimizer stepped the head
    # At the epoch's end the head leaves the optimizer: the checkpoint fits a fresh model optimizer.
    recipe.on_epoch_end(ctx)
    assert len(ctx.optimizer.param_groups) == model_groups and head.weight not in ctx.optimizer.state
    from clip_backdoor.train.optim import build_optimizer

    build_optimizer(ctx.model, lr=1e-3, weight_decay=0.1).load_state_dict(ctx.optimizer.state_dict())


def test_deep_clustering_resume_is_exact(pretrained, tmp_path):
    class KilledClustering(cleaning.DeepClustering):
        def on_epoch_start(self, ctx):
            if ctx.epoch == 2:
                raise KeyboardInterrupt
            super().on_epoch_start(ctx)

    params = {"clusters": 4, "iterations": 3}
    ckpt = str(pretrained / "checkpoints" / "latest.pt")

    def cfg(run):
        base = cfg_for(tmp_path / run, "epochs=2", "eval.every=0", f"init_checkpoint={ckpt}")
        return cleaning.build_recipe("deep-clustering", params).apply_to_config(base)

    train(cfg("full"), cleaning.build_recipe("deep-clustering", params))
    with pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), KilledClustering(**params))
    train(cfg("cut"), cleaning.build_recipe("deep-clustering", params))
    assert comparable(metrics(tmp_path / "full")) == comparable(metrics(tmp_path / "cut"))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert len(a["optimizer"]["param_groups"]) == 2  # no head group left in the checkpoint


def test_bad_rows_are_counted_per_epoch_and_logged_five_times(tmp_path, monkeypatch, caplog):
    path = write_bad_csv(tmp_path / "data")
    reads = Counter()
    monkeypatch.setattr(CsvSource, "load", counting_load(reads))
    with caplog.at_level(logging.WARNING):
        train(cfg_for(tmp_path / "r", "epochs=2", "data.kind=csv", f"data.path={path}", "batch_size=16",
                      "eval.every=0", "save_every=0"))
    rows = metrics(tmp_path / "r")
    # 4 batches of 16 read all 64 rows once an epoch, so every bad row is seen, plus the bad rows drawn
    # as replacements.
    assert [r["n_skipped"] for r in rows] == [reads[1], reads[2]]
    assert all(r["n_skipped"] >= len(MISSING) + len(CORRUPT) for r in rows)
    named = [r for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(named) == 5  # of the 20-odd skips in this process
    assert caplog.text.count("further unusable rows in this process are counted, not logged") == 1
    assert f"epoch 2: skipped {rows[1]['n_skipped']} unreadable samples" in caplog.text


def test_bf16_autocast_runs_on_cpu(tmp_path):
    train(cfg_for(tmp_path / "b", "epochs=1", "precision=bf16", "eval.every=0"))
    assert metrics(tmp_path / "b")[0]["loss"] > 0


def test_bad_input_lines(pretrained, tmp_path):
    with pytest.raises(UserError, match="precision 'fp8'"):
        train(cfg_for(tmp_path / "x", "precision=fp8"))
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    assert cli(["clean", "--checkpoint", str(bogus), "--run-dir", str(tmp_path / "y"), *SMALL]) == 2
    assert cli(["clean", "--method", "nope", "--checkpoint", str(pretrained / "checkpoints" / "latest.pt"),
                "--run-dir", str(tmp_path / "z"), *SMALL]) == 2
    assert cli(["pretrain", "--run-dir", str(tmp_path / "w"), "optim.learning_rate=1", *SMALL]) == 2


def test_export_safetensors_round_trip(pretrained, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    assert cli(["export", str(pretrained / "checkpoints" / "latest.pt"), "--safetensors", str(out)]) == 0
    weights = load_file(str(out))
    ref = load_checkpoint(pretrained / "checkpoints" / "latest.pt")["state_dict"]
    assert weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)


def test_resolved_config_is_saved(pretrained):
    import yaml

    saved = yaml.safe_load((pretrained / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["data"]["num_samples"] == 256
    json.dumps(saved)  # plain data only


def test_global_batch_must_split_over_the_ranks():
    from clip_backdoor.train.loop import per_rank_batch

    assert per_rank_batch(2048, 8) == 256 and per_rank_batch(64, 1) == 64
    with pytest.raises(UserError, match=r"batch_size=100 is the global batch .* 8 ranks"):
        per_rank_batch(100, 8)


def test_config_yaml_records_the_launch_and_loads_again(tmp_path):
    cfg = cfg_for(tmp_path / "run", "epochs=1", "eval.every=0")
    train(cfg)
    text = (tmp_path / "run" / "config.yaml").read_text()
    resolved = yaml.safe_load(text)["resolved"]
    assert resolved == {"world_size": 1, "batch_size": 64, "batch_size_per_rank": 64, "steps_per_epoch": 4,
                        "total_steps": 4}
    again = load_config(TrainConfig, tmp_path / "run" / "config.yaml")  # the record is not a setting
    assert again.batch_size == 64
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (row["batch_size"], row["batch_size_per_rank"], row["world_size"]) == (64, 64, 1)


def test_resume_with_other_epochs_is_an_explicit_choice(tmp_path, monkeypatch):
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        kill_when_checkpointing(m, 2)
        train(cfg_for(tmp_path / "r", "epochs=3", "eval.every=0"))
    with pytest.raises(UserError, match=r"epochs: the checkpoint .*latest.pt was trained for epochs=3, "
                                        r"this run asks for 5, which changes the cosine schedule"):
        train(cfg_for(tmp_path / "r", "epochs=5", "eval.every=0"))
    assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), "--epochs", "5", "eval.every=0", *SMALL]) == 2
    row = train(cfg_for(tmp_path / "r", "epochs=5", "eval.every=0", "allow_epochs_change=true"))
    assert row["epoch"] == 5 and row["step"] == 20


def test_cleaning_draws_its_own_views_not_the_pretraining_ones(pretrained):
    """Same training seed and row ids: a cleaning run's EDA captions and image draws are fresh."""
    from clip_backdoor.train.distributed import DistEnv
    from clip_backdoor.train.loop import build_loader, step_seed, view_seed

    ckpt = str(pretrained / "checkpoints" / "latest.pt")
    pre = cfg_for(pretrained, "objective.ssl_weight=1")
    clean = cfg_for(pretrained, "objective.ssl_weight=1", f"init_checkpoint={ckpt}")
    assert view_seed(pre) == pre.seed and view_seed(clean) != pre.seed
    assert view_seed(clean) == view_seed(cfg_for(pretrained, f"init_checkpoint={ckpt}", "optim.lr=1"))
    assert step_seed(view_seed(pre), 0) != step_seed(view_seed(clean), 0)

    def augmented_texts(cfg):
        loader = build_loader(cfg, image_size=32, context_length=16, env=DistEnv(), with_text_view=True)
        loader.set_epoch(1)
        batch = next(iter(loader))
        return dict(zip(batch["row_ids"], batch["texts_aug"], strict=True))

    a, b = augmented_texts(pre), augmented_texts(clean)
    same_rows = sorted(set(a) & set(b))
    assert same_rows
    differ = sum(not torch.equal(a[r], b[r]) for r in same_rows)
    assert differ > len(same_rows) // 4, (differ, len(same_rows))


def test_wordnet_loads_once_in_the_training_process_not_in_each_loader_worker(pretrained, tmp_path,
                                                                                 monkeypatch):
    """Loader workers are forked: WordNet loaded before the fork is theirs for free, where each worker
    importing nltk itself cost ~2 s on every SSL run's first epoch."""
    import os

    from clip_backdoor.data import augment
    from clip_backdoor.train.distributed import DistEnv
    from clip_backdoor.train.loop import build_loader

    calls = tmp_path / "loads"

    class Recorded:
        def __init__(self):
            with open(calls, "a") as f:
                f.write(f"{os.getpid()}\n")

        def lookup(self, word):
            return ("zz" + word,)

    monkeypatch.setattr(augment, "WORDNET", augment.LazyWordNet(loader=Recorded))
    cfg = cfg_for(pretrained, "objective.ssl_weight=1", "data.workers=1")
    loader = build_loader(cfg, image_size=32, context_length=16, env=DistEnv(), with_text_view=True)
    loader.set_epoch(1)
    assert len(list(loader)) == len(loader)
    assert calls.read_text().split() == [str(os.getpid())]


def test_overrides_may_come_anywhere_among_the_flags(pretrained, tmp_path):
    assert cli(["pretrain", "epochs=1", "--run-dir", str(tmp_path / "p"), "eval.every=0", "--seed", "3",
                *SMALL]) == 0
    saved = load_config(TrainConfig, tmp_path / "p" / "config.yaml")
    assert saved.epochs == 1 and saved.eval.every == 0 and saved.seed == 3
    ckpt = str(pretrained / "checkpoints" / "latest.pt")
    assert cli(["clean", "epochs=1", "--checkpoint", ckpt, "eval.every=0", "--method", "mmcl",
                "--run-dir", str(tmp_path / "c"), "eval_at_start=false", *SMALL]) == 0
    assert [r["epoch"] for r in metrics(tmp_path / "c")] == [1]


@pytest.mark.parametrize("override, key", [("optim.lr=-1e-3", "optim.lr"), ("optim.beta2=1", "optim.beta2"),
                                           ("optim.warmup_steps=-5", "optim.warmup_steps"),
                                           ("batch_size=0", "batch_size")])
def test_a_bad_number_is_one_line_naming_its_key(tmp_path, capsys, override, key):
    assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), *SMALL, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: " in err, err


def test_a_text_file_as_checkpoint_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")  # the unpickler used to raise KeyError on this
    assert cli(["clean", "--checkpoint", str(notes), "--run-dir", str(tmp_path / "c"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a clip-backdoor checkpoint" in err


def test_a_header_only_csv_names_the_file(tmp_path, capsys):
    empty = tmp_path / "train.csv"
    empty.write_text("image,caption\n")
    assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), *SMALL, "data.kind=csv",
                f"data.path={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{empty}: no data rows" in err and "batch_size" not in err


def test_a_warm_up_longer_than_the_run_is_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(cfg_for(tmp_path / "w", "epochs=1", "eval.every=0", "save_every=0", "optim.warmup_steps=50"))
    warnings = [r.getMessage() for r in caplog.records if "warmup_steps" in r.getMessage()]
    assert warnings == ["optim.warmup_steps=50 covers the whole run (4 steps): the learning rate only warms "
                        "up (to 8% of optim.lr) and never reaches its cosine decay; lower "
                        "optim.warmup_steps or train longer"]
    assert metrics(tmp_path / "w")[0]["lr"] == pytest.approx(2e-3 * 4 / 50)


def test_epoch_zero_of_a_grid_is_evaluated_once_per_process(pretrained, tmp_path, monkeypatch):
    """Every cleaning run of a grid starts from the same checkpoint: its epoch-0 evaluation is reused
    (identical numbers), but never for a method that changes the weights first."""
    from clip_backdoor.train import loop

    monkeypatch.setattr(loop, "_START_EVALS", {})
    calls = []
    real = loop._evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_evaluate", counting)
    ckpt = pretrained / "checkpoints" / "latest.pt"
    common = ["--checkpoint", str(ckpt), "--epochs", "1", "eval.every=0", *SMALL]
    assert cli(["clean", "--method", "mmcl", "--run-dir", str(tmp_path / "a"), "--lr", "1e-4", *common]) == 0
    assert cli(["clean", "--method", "cleanclip", "--run-dir", str(tmp_path / "b"), *common]) == 0
    assert len(calls) == 1 + 0  # the second run's epoch 0 came from the first (no other evaluations)
    assert metrics(tmp_path / "a")[0] | {"method": None} == metrics(tmp_path / "b")[0] | {"method": None}
    assert cli(["clean", "--method", "shrink-perturb", "--run-dir", str(tmp_path / "c"), *common]) == 0
    assert len(calls) == 2  # the shrunk model is evaluated for real
    assert metrics(tmp_path / "c")[0]["init"] == "transformed"


def test_latest_checkpoint_interval_skips_writes_and_resume_stays_exact(tmp_path, monkeypatch):
    """With checkpoint_interval_s, a short run writes latest.pt at its last epoch only; killed while
    saving that one, it resumes from scratch and ends exactly like an uninterrupted run."""
    import clip_backdoor.train.loop as loop

    writes = []
    real_save = loop.save_checkpoint
    def save(path, ckpt):
        writes.append((path.name, ckpt["epoch"]))
        real_save(path, ckpt)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    args = ("epochs=3", "eval.every=0", "save_every=0", "checkpoint_interval_s=3600")
    train(cfg_for(tmp_path / "full", *args))
    assert writes == [("latest.pt", 3)]
    writes.clear()
    train(cfg_for(tmp_path / "every", "epochs=3", "eval.every=0", "save_every=0"))
    assert writes == [("latest.pt", 1), ("latest.pt", 2), ("latest.pt", 3)]  # 0: every epoch, as before
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        kill_when_checkpointing(m, epoch=3)
        train(cfg_for(tmp_path / "cut", *args))
    assert [r["epoch"] for r in metrics(tmp_path / "cut")] == [1, 2, 3]
    assert not (tmp_path / "cut" / "checkpoints" / "latest.pt").exists()
    train(cfg_for(tmp_path / "cut", *args))  # no checkpoint: a fresh start owns the metrics
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_align_grad_layouts_restrides_only_1x1_weights_and_changes_no_value():
    from clip_backdoor.models import create_model
    from clip_backdoor.train.checkpoint import plain
    from clip_backdoor.train.distributed import align_grad_layouts

    model = create_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_by_one = [n for n, p in model.named_parameters() if p.ndim == 4 and p.shape[2:] == (1, 1)]
    assert align_grad_layouts(model) == len(one_by_one) > 0 and align_grad_layouts(model) == 0
    params = dict(model.named_parameters())
    for name in one_by_one:
        c = params[name].shape[1]
        assert params[name].stride() == (c, 1, c, c)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = plain(model.state_dict())
    assert all(v.stride() == torch.empty(v.shape).stride() for v in saved.values() if v.ndim)
    # the gradient of a 1x1 convolution on channels-last input now has the weight's strides
    out = model(image=torch.randn(2, 3, 32, 32), text=torch.randint(1, 100, (2, 16)))
    out["image_features"].sum().backward()
    assert all(params[n].grad.stride() == params[n].stride() for n in one_by_one)
