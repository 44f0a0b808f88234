"""`report_to: tensorboard`: the event files, read back with TensorBoard's own reader, hold every
metrics.jsonl key; a resumed run's events match an uninterrupted run's; off means off."""

import sys

import pytest

import clip_backdoor.train.loop as loop
from clip_backdoor.cli import main as cli
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.train import scalars
from clip_backdoor.train.optim import lr_at
from clip_backdoor.train.scalars import NullWriter, open_writer
from conftest import SMALL


def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool) and v == v}


def test_every_metrics_key_is_a_scalar(poisoned_run):
    _, pre, _ = poisoned_run
    rows = read_jsonl(pre / "metrics.jsonl")
    found = events(pre)
    keys = {k for r in rows for k in numeric(r)}
    assert {"acc1", "asr1", "loss", "loss_mmcl", "lr", "scale"} <= keys
    for key in keys:  # per epoch, at the step the epoch ended
        assert found[f"epoch/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    # per step: every loss term and the lr, at steps completed 1..8
    assert {t for t in found if t.startswith("train/")} == {"train/loss", "train/loss_mmcl", "train/lr"}
    assert [s for s, _ in found["train/loss"]] == list(range(1, 9))
    for r in rows:  # an epoch's loss in metrics.jsonl is the mean of its steps' losses
        steps = [v for s, v in found["train/loss"] if r["step"] - 4 < s <= r["step"]]
        assert sum(steps) / len(steps) == pytest.approx(r["loss"], rel=1e-5)
    # step k's lr is the one the optimizer used for it (warm-up 2 steps, cosine to 0 over 8)
    assert [v for _, v in found["train/lr"]] == [pytest.approx(lr_at(k, base_lr=2e-3, warmup_steps=2,
                                                                     total_steps=8), rel=1e-6)
                                                 for k in range(8)]


def test_off_writes_nothing(poisoned_run):
    _, _, cl = poisoned_run  # the cleaning run did not ask for it
    assert not (cl / "tensorboard").exists()
    assert isinstance(open_writer(None, cl, is_main=True, resume_step=None), NullWriter)
    assert not (cl / "tensorboard").exists()


def test_only_rank_0_writes(tmp_path):
    assert isinstance(open_writer("tensorboard", tmp_path, is_main=False, resume_step=None), NullWriter)
    assert not (tmp_path / "tensorboard").exists()


def test_an_epochs_events_are_on_disk_with_its_metrics_line(tmp_path):
    writer = open_writer("tensorboard", tmp_path, is_main=True, resume_step=None)
    writer.add_step(1, {"loss": 2.0, "lr": 0.1})
    writer.add_epoch({"epoch": 1, "step": 1, "acc1": 0.5, "method": {"name": "x"}, "init": "transformed"})
    found = events(tmp_path)  # read before close: a killed run leaves what was flushed
    assert found["epoch/acc1"] == [(1, 0.5)] and found["train/loss"] == [(1, 2.0)]
    assert "epoch/method" not in found and "epoch/init" not in found  # not scalars
    writer.close()


def cfg(run_dir, *extra):
    return load_config(TrainConfig, None, [f"run_dir={run_dir}", *SMALL, "epochs=2", "save_every=0", *extra])


def test_a_resumed_run_has_the_events_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Killed after epoch 2's metrics line (its events are flushed) but before its checkpoint: the rerun
    trains epoch 2 again, and TensorBoard must show each step once, with the rerun's values."""
    loop.train(cfg(tmp_path / "full", "report_to=tensorboard"))
    loop.train(cfg(tmp_path / "plain"))  # the same run without TensorBoard
    real = loop.save_checkpoint

    def killed_at_epoch_2(path, ckpt):
        if ckpt["epoch"] == 2:
            raise KeyboardInterrupt
        real(path, ckpt)

    monkeypatch.setattr(loop, "save_checkpoint", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(tmp_path / "cut", "report_to=tensorboard"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    before = events(tmp_path / "cut")
    assert [s for s, _ in before["train/loss"]] == list(range(1, 9))  # epoch 2's events were on disk
    loop.train(cfg(tmp_path / "cut", "report_to=tensorboard"))  # resumes from epoch 1

    full, cut = events(tmp_path / "full"), events(tmp_path / "cut")
    timing = ("epoch/seconds", "epoch/samples_per_s")
    assert set(full) == set(cut)
    for tag in full:
        assert [s for s, _ in cut[tag]] == [s for s, _ in full[tag]], tag
        if tag not in timing:
            assert cut[tag] == full[tag], tag
    same = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
            for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    assert same == [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                    for r in read_jsonl(tmp_path / "plain" / "metrics.jsonl")]  # TensorBoard changes nothing


def test_a_fresh_start_drops_an_old_runs_events(tmp_path):
    loop.train(cfg(tmp_path / "r", "report_to=tensorboard", "epochs=1"))
    loop.train(cfg(tmp_path / "r", "report_to=tensorboard", "epochs=1", "resume=false"))
    assert [s for s, _ in events(tmp_path / "r")["train/loss"]] == [1, 2, 3, 4]
    assert len(list((tmp_path / "r" / "tensorboard").iterdir())) == 1


def test_unknown_backend_and_missing_package_are_one_line(tmp_path, monkeypatch, capsys):
    assert cli(["pretrain", "--run-dir", str(tmp_path / "a"), *SMALL, "report_to=wandb"]) == 2
    err = capsys.readouterr().err
    assert "report_to: unknown backend 'wandb'; choose from tensorboard" in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert cli(["pretrain", "--run-dir", str(tmp_path / "b"), *SMALL, "report_to=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'clip-backdoor[tensorboard]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before anything was written
    assert scalars.parse_report_to("none") == () and scalars.parse_report_to(None) == ()


def test_study_passes_report_to_to_every_run(tmp_path):
    from clip_backdoor.study.expand import expand
    from clip_backdoor.study.spec import parse_spec
    from test_study import tiny

    plan = expand(parse_spec(tiny(run={"jobs": 1, "report_to": "tensorboard"})), tmp_path)
    assert {r.cfg.report_to for r in plan.runs} == {"tensorboard"}
    assert {r.cfg.report_to for r in expand(parse_spec(tiny()), tmp_path).runs} == {None}
    with pytest.raises(UserError, match="run.report_to: unknown backend 'wandb'"):
        parse_spec(tiny(run={"report_to": "wandb"}))
