"""Study spec (expansion, names, validation errors) and runner (stages, skip-finished, failures,
results.csv), on a study small enough to train in seconds."""

import csv
import itertools
import logging

import pytest
import torch
import yaml

from clip_backdoor.cli import main as cli
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.study import runner
from clip_backdoor.study.expand import expand, format_lr
from clip_backdoor.study.spec import load_spec, parse_spec

COLUMNS = ["seed", "stage", "pretrain", "method", "lr", "k", "start_epoch", "epoch", "step", "init", "acc1",
           "acc5", "asr1", "asr5", "ra1", "n", "n_asr", "val_acc1", "val_acc5", "val_asr1", "val_asr5",
           "val_ra1", "val_n", "val_n_asr", "acc1_lo", "acc1_hi", "asr1_lo", "asr1_hi", "val_acc1_lo",
           "val_acc1_hi", "val_asr1_lo", "val_asr1_hi", "loss", "loss_mmcl", "loss_ssl", "run", "pruned"]


def tiny(**sections) -> dict:
    """A study that trains in seconds: 256 pairs, one epoch, two learning rates."""
    spec = {
        "name": "tiny",
        "seeds": [0],
        "data": {"num_samples": 256, "workers": 0, "world": {"seed": 0}},
        "attack": {"n": 8, "target": "banana"},
        "pretrain": {"objectives": ["mmcl"], "epochs": 1, "batch_size": 64, "lr": 2e-3, "warmup_steps": 2},
        "cleaning": {"size": 64, "methods": [{"name": "mmcl", "k": [0, 2]}], "lrs": [1e-4, 1e-3],
                     "epochs": 1, "batch_size": 32, "warmup_steps": 1},
        "eval": {"n": 40, "batch_size": 40},
        "run": {"jobs": 1, "threads": 1},
    }
    for name, values in sections.items():
        spec[name] = {**spec[name], **values} if isinstance(spec.get(name), dict) else values
    return spec


def write_study(tmp_path, data: dict, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path, data: dict, *overrides) -> str:
    with pytest.raises(UserError) as info:
        load_spec(write_study(tmp_path, data), list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Spec: expansion
# --------------------------------------------------------------------------------------------
def test_expansion_names_counts_and_order(tmp_path):
    spec = parse_spec(tiny(seeds=[3, 1], pretrain={"objectives": ["mmcl+ssl", "mmcl"]},
                           cleaning={"methods": ["cleanclip", {"name": "ssl", "k": [5]}],
                                     "lrs": [1e-5, 2.5e-4], "k": [0, 2]}))
    plan = expand(spec, tmp_path / "s")
    expected = [f"pretrain/{o},seed={s}" for s in (3, 1) for o in ("mmcl+ssl", "mmcl")]
    grid = [("cleanclip", lr, k) for lr in ("1e-5", "2.5e-4") for k in (0, 2)] + \
           [("ssl", lr, 5) for lr in ("1e-5", "2.5e-4")]
    for s, o in itertools.product((3, 1), ("mmcl+ssl", "mmcl")):
        expected += [f"clean/{o},seed={s}/{m}/lr={lr}" + (f",k={k}" if k else "") for m, lr, k in grid]
    assert [r.name for r in plan.runs] == expected
    assert [r.name for r in expand(spec, tmp_path / "s").runs] == expected  # a pure function of the spec
    assert [st.name for st in plan.cleaning_sets] == ["data/clean,k=0", "data/clean,k=2", "data/clean,k=5"]


def test_run_configs_follow_the_grid(tmp_path):
    spec = parse_spec(tiny(pretrain={"objectives": ["mmcl", {"name": "mmcl+ssl", "batch_size": 32}]},
                           cleaning={"methods": ["cleanclip", "mmcl", "ssl",
                                                 {"name": "cleanclip", "params": {"ssl_weight": 2}}],
                                     "lrs": [3e-4]}))
    root = tmp_path / "s"
    plan = expand(spec, root)
    pre = plan.run("pretrain/mmcl+ssl,seed=0").cfg
    assert (pre.objective.mmcl_weight, pre.objective.ssl_weight) == (1.0, 1.0)
    assert pre.batch_size == 32 and plan.run("pretrain/mmcl,seed=0").cfg.batch_size == 64
    assert pre.data.poison_manifest == str(root / "data/poisoned/manifest.csv")
    assert pre.eval.target == "banana" and pre.eval.trigger == "badnet" and not pre.eval_at_start
    weights = {}
    for run in plan.runs:
        if run.stage == "clean" and run.pretrain == "mmcl":
            cfg = run.cfg
            assert cfg.init_checkpoint == str(root / "pretrain/mmcl,seed=0/checkpoints/latest.pt")
            assert cfg.eval_at_start and cfg.optim.lr == 3e-4 and cfg.run_dir == str(root / run.name)
            assert cfg.data.poison_manifest == str(root / f"data/clean,k={run.k}/manifest.csv")
            weights[run.method] = (cfg.objective.mmcl_weight, cfg.objective.ssl_weight)
    assert weights == {"cleanclip": (1.0, 1.0), "mmcl": (1.0, 0.0), "ssl": (0.0, 1.0),
                       "cleanclip,ssl_weight=2": (1.0, 2.0)}


def test_pretraining_ssl_weight_and_view_policy_reach_the_runs(tmp_path):
    spec = parse_spec(tiny(pretrain={"objectives": ["mmcl", "mmcl+ssl", "ssl"], "ssl_weight": 0.5,
                                     "image_policy": "svhn"}))
    plan = expand(spec, tmp_path / "s")
    objectives = {o: plan.run(f"pretrain/{o},seed=0").cfg.objective for o in ("mmcl", "mmcl+ssl", "ssl")}
    weights = {o: (obj.mmcl_weight, obj.ssl_weight) for o, obj in objectives.items()}
    assert weights == {"mmcl": (1.0, 0.0), "mmcl+ssl": (1.0, 0.5), "ssl": (0.0, 0.5)}
    assert plan.run("pretrain/mmcl+ssl,seed=0").cfg.objective.image_policy == "svhn"
    assert all(r.cfg.objective.image_policy == "imagenet" for r in plan.runs if r.stage == "clean")


def test_learning_rates_in_names():
    assert [format_lr(x) for x in (1e-5, 2.5e-4, 1e-3, 3e-5, 0.05, 1e-9)] == \
        ["1e-5", "2.5e-4", "1e-3", "3e-5", "0.05", "1e-9"]


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny()).replace("0.0001", "1e-4"))
    assert "1e-4" in path.read_text()
    assert load_spec(path).cleaning.lrs == [1e-4, 1e-3]


# --------------------------------------------------------------------------------------------
# Spec: errors name the key, its path and the file
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, where", [
    ({"colour": 1}, "colour: unknown key"),
    ({"cleaning": {"lrz": [1e-4]}}, "cleaning.lrz: unknown key"),
    ({"pretrain": {"epoch": 3}}, "pretrain.epoch: unknown key"),
    ({"cleaning": {"methods": ["mmcl", {"name": "cleanclip", "parms": {}}]}},
     "cleaning.methods[1].parms: unknown key"),
    ({"cleaning": {"methods": [{"name": ["mmcl"]}]}},
     "cleaning.methods[0].name: expected a method name, got ['mmcl']"),
    ({"cleaning": {"methods": [{"name": "mmcl", "params": "x"}]}},
     "cleaning.methods[0].params: expected a mapping, got 'x'"),
    ({"pretrain": {"objectives": ["mmcl", {"name": "mmcl+ssl", "batchsize": 32}]}},
     "pretrain.objectives[1].batchsize: unknown key"),
])
def test_unknown_key_names_its_path_and_file(tmp_path, change, where):
    message = error_of(tmp_path, tiny(**change))
    assert where in message and "study.yaml" in message


@pytest.mark.parametrize("change, where", [
    ({"cleaning": {"lrs": [1e-4, "fast"]}}, "cleaning.lrs[1]: 'fast' is not a number"),
    ({"cleaning": {"lrs": [1e-4, -1e-3]}}, "cleaning.lrs[1]: learning rate"),
    ({"cleaning": {"lrs": [1e-4, 1e-4]}}, "cleaning.lrs[1]: 0.0001 is listed twice"),
    ({"cleaning": {"k": [0, -2]}}, "cleaning.k[1]"),
    ({"cleaning": {"k": [0, 65]}}, "cleaning.k[1]: 65 poisons do not fit"),
    ({"cleaning": {"methods": [{"name": "mmcl", "lrs": [0]}]}}, "cleaning.methods[0].lrs[0]"),
    ({"cleaning": {"methods": ["mmcl", "scrub"]}}, "cleaning.methods[1]: unknown cleaning method 'scrub'"),
    ({"cleaning": {"methods": [{"name": "cleanclip", "params": {"ssl_wieght": 2}}]}},
     "cleaning.methods[0]: method cleanclip: unknown parameter"),
    ({"pretrain": {"objectives": ["mmcl", "clip"]}}, "pretrain.objectives[1]: 'clip' is not one of"),
    ({"seeds": [0, "one"]}, "seeds[1]"),
    ({"thresholds": [0.05, 5]}, "thresholds[1]"),
    ({"attack": {"n": 8, "fraction": 0.1}}, "attack: give the number of poisons as exactly one"),
    ({"attack": {"trigger": "laser"}}, "attack.trigger"),
    ({"data": {"kind": "csv"}}, "data.path: required for data.kind=csv"),
    ({"pretrain": {"ssl_weight": 0}}, "pretrain.ssl_weight: 0.0 must be > 0"),
    ({"pretrain": {"objectives": ["mmcl", {"name": "mmcl+ssl", "ssl_weight": "lots"}]}},
     "pretrain.objectives[1].ssl_weight: expected a number, got 'lots'"),
    ({"pretrain": {"image_policy": "strong"}}, "pretrain.image_policy"),
    # The training config's bounds, reused (config.bounds_of): a value the run would refuse is refused here.
    ({"pretrain": {"weight_decay": -1}}, "pretrain.weight_decay: -1.0 must be >= 0"),
    ({"cleaning": {"weight_decay": -1}}, "cleaning.weight_decay: -1.0 must be >= 0"),
    ({"pretrain": {"objectives": ["mmcl", {"name": "mmcl+ssl", "lr": -1}]}},
     "pretrain.objectives[1].lr: -1.0 must be > 0"),
    ({"data": {"workers": -1}}, "data.workers: -1 must be >= 0"),
    ({"run": {"threads": 0}}, "run.threads: 0 must be >= 1"),
])
def test_bad_grid_value_names_itself(tmp_path, change, where):
    assert where in error_of(tmp_path, tiny(**change))


def test_override_with_unknown_key_is_an_error(tmp_path):
    assert "cleaning.lrz: unknown key" in error_of(tmp_path, tiny(), "cleaning.lrz=[1e-4]")
    spec = load_spec(write_study(tmp_path, tiny()), ["seeds=[0,1,2]", "cleaning.lrs=[1e-5,1e-4]"])
    assert spec.seeds == [0, 1, 2] and spec.cleaning.lrs == [1e-5, 1e-4]


def test_missing_data_path_says_which_stage_needs_it(tmp_path):
    spec = parse_spec(tiny(data={"kind": "csv", "path": str(tmp_path / "nowhere.csv")}))
    with pytest.raises(UserError, match=r"nowhere\.csv: file not found \(the poison stage"):
        runner.check_inputs(spec)
    spec = parse_spec(tiny(eval={"kind": "imagefolder", "path": str(tmp_path / "val")}))
    with pytest.raises(UserError, match=r"val: folder not found \(every run's evaluation"):
        runner.check_inputs(spec)


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------
def read_results(root):
    with open(root / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """The tiny study run once: 1 pre-training run + 2 lrs x k in {0, 2} cleaning runs."""
    root = tmp_path_factory.mktemp("study") / "tiny"
    assert runner.run_study(parse_spec(tiny()), root) == 0
    return root


def test_run_writes_every_stage_and_results(finished_study):
    root = finished_study
    assert (root / "study.yaml").is_file() and (root / "data/poisoned/manifest.csv").is_file()
    for k in (0, 2):
        assert (root / f"data/clean,k={k}/manifest.csv").is_file()
    columns, rows = read_results(root)
    assert columns == COLUMNS
    names = ["pretrain/mmcl,seed=0"] + [f"clean/mmcl,seed=0/mmcl/lr={lr}{k}" for lr in ("1e-4", "1e-3")
                                        for k in ("", ",k=2")]
    assert [r["run"] for r in rows] == [names[0]] + [n for n in names[1:] for _ in (0, 1)]
    pre = rows[0]
    assert (pre["stage"], pre["pretrain"], pre["method"], pre["lr"], pre["k"], pre["epoch"]) == \
        ("pretrain", "mmcl", "", "", "", "1")
    for row in rows[1:]:
        assert row["stage"] == "clean" and row["method"] == "mmcl" and row["k"] in ("0", "2")
        assert float(row["lr"]) in (1e-4, 1e-3)
        for key in ("acc1", "asr1", "acc5"):
            assert 0 <= float(row[key]) <= 1
    epoch0 = [r for r in rows if r["stage"] == "clean" and r["epoch"] == "0"]
    assert len(epoch0) == 4
    for row in epoch0:  # epoch 0 is the poisoned model itself: its numbers are the pre-training run's
        assert (row["acc1"], row["asr1"], row["n_asr"]) == (pre["acc1"], pre["asr1"], pre["n_asr"])
        assert row["loss"] == "" and row["step"] == "0"
    # each row is its run's metrics line, unchanged
    line = read_jsonl(root / names[2] / "metrics.jsonl")[-1]
    row = [r for r in rows if r["run"] == names[2]][-1]
    assert float(row["loss_mmcl"]) == line["loss_mmcl"] and float(row["acc1"]) == line["acc1"]
    assert row["loss_ssl"] == ""
    # cleaning runs keep their metrics, not their checkpoints; pre-training runs keep latest.pt
    assert not (root / names[1] / "checkpoints").exists()
    assert (root / names[0] / "checkpoints/latest.pt").is_file()
    assert (root / "report/index.html").is_file()


def test_second_run_trains_nothing_and_says_so(finished_study, monkeypatch, caplog, capsys):
    import clip_backdoor.train.loop as loop

    before = (finished_study / "results.csv").read_text()
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    with caplog.at_level(logging.INFO):
        assert runner.run_study(parse_spec(tiny()), finished_study) == 0
    assert "skipping 5 finished runs (of 5)" in caplog.text
    assert (finished_study / "results.csv").read_text() == before
    assert "| MMCL |" in capsys.readouterr().out  # the headline table


def test_list_shows_finished_runs(finished_study, tmp_path, capsys):
    path = write_study(tmp_path, tiny())
    assert cli(["study", "list", str(path), "--out", str(finished_study)]) == 0
    out = capsys.readouterr().out
    assert "pretrain/mmcl,seed=0" in out and out.count("finished") == 5


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, caplog):
    import clip_backdoor.train.loop as loop

    real = loop.train

    def flaky(cfg, recipe=None):
        if cfg.run_dir.endswith("lr=1e-3"):
            raise RuntimeError("simulated crash\nsecond line")
        return real(cfg, recipe)

    root = tmp_path / "s"
    monkeypatch.setattr(loop, "train", flaky)
    with caplog.at_level(logging.INFO):
        assert runner.run_study(parse_spec(tiny()), root) == 1
    failed = root / "clean/mmcl,seed=0/mmcl/lr=1e-3"
    assert "FAILED after" in caplog.text and "RuntimeError: simulated crash" in caplog.text
    assert "1 run(s) failed" in caplog.text and "second line" not in caplog.text.split("failed:")[-1]
    assert "simulated crash" in (failed / "error.log").read_text()
    _, rows = read_results(root)
    assert {r["run"] for r in rows} == {"pretrain/mmcl,seed=0", "clean/mmcl,seed=0/mmcl/lr=1e-4",
                                        "clean/mmcl,seed=0/mmcl/lr=1e-4,k=2",
                                        "clean/mmcl,seed=0/mmcl/lr=1e-3,k=2"}
    # a rerun does only what failed
    monkeypatch.setattr(loop, "train", real)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert runner.run_study(parse_spec(tiny()), root) == 0
    assert "skipping 4 finished runs (of 5)" in caplog.text
    assert len(read_results(root)[1]) == 9


def test_cleaning_runs_of_a_failed_pretraining_are_not_run(tmp_path, monkeypatch, caplog):
    import clip_backdoor.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg, recipe=None: (_ for _ in ()).throw(ValueError("boom")))
    with caplog.at_level(logging.INFO):
        assert runner.run_study(parse_spec(tiny()), tmp_path / "s") == 1
    assert caplog.text.count("not run: its pre-training run pretrain/mmcl,seed=0 failed") >= 4


def test_only_clean_needs_finished_pretraining(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert runner.run_study(parse_spec(tiny()), tmp_path / "s", only="clean") == 1
    assert "needs pretrain/mmcl,seed=0, which has not finished" in caplog.text
    assert not (tmp_path / "s/pretrain").exists()


def test_existing_poisons_made_differently_are_refused(tmp_path):
    root = tmp_path / "s"
    runner.make_poison(expand(parse_spec(tiny()), root))
    runner.make_poison(expand(parse_spec(tiny()), root))  # same settings: reused
    with pytest.raises(UserError, match=r"poisoned was made with n_poison=8, the study now asks for 9"):
        runner.make_poison(expand(parse_spec(tiny(attack={"n": 9})), root))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_devices_reach_the_worker_runs(tmp_path, caplog):
    """--devices: each spawned worker takes one device; here CUDA is absent, so the run says so."""
    with caplog.at_level(logging.INFO):
        spec = parse_spec(tiny(run={"devices": ["cuda:0"]}))
        code = runner.run_study(spec, tmp_path / "s", only="pretrain")
    assert code == 1
    assert "pretrain/mmcl,seed=0: device 'cuda:0' requested but CUDA is not available" in caplog.text


def test_each_worker_gets_its_own_device(tmp_path, monkeypatch):
    """--devices a,b: two runs held at once by two workers get the two devices (the devices are fake:
    training is replaced by a note of the device each run was handed)."""
    from _study_helpers import DEVICE_FILE, execute_noting_the_device
    from clip_backdoor.study import executors

    monkeypatch.setattr(executors, "execute", execute_noting_the_device)  # what the local pool submits
    path = write_study(tmp_path, tiny(seeds=[0, 1]))
    assert cli(["study", "run", str(path), "--out", str(tmp_path / "s"), "--devices", "cuda:0,cuda:1",
                "--only", "pretrain"]) == 0
    devices = {run: (tmp_path / "s" / "pretrain" / run / DEVICE_FILE).read_text()
               for run in ("mmcl,seed=0", "mmcl,seed=1")}
    assert sorted(devices.values()) == ["cuda:0", "cuda:1"], devices


def test_list_takes_overrides_after_options(tmp_path, capsys):
    path = write_study(tmp_path, tiny())
    assert cli(["study", "list", str(path), "--out", str(tmp_path / "o"), "seeds=[0,7]"]) == 0
    out = capsys.readouterr().out
    assert "pretrain/mmcl,seed=7" in out and "10 runs" in out
    with pytest.raises(SystemExit):
        cli(["study", "list", str(path), "--bogus"])


# --------------------------------------------------------------------------------------------
# Cleaning from an intermediate pre-training epoch; the poisoned baseline
# --------------------------------------------------------------------------------------------
def test_clean_from_past_the_pretraining_names_the_key(tmp_path):
    message = error_of(tmp_path, tiny(pretrain={"epochs": 3,
                                                "objectives": [{"name": "mmcl", "clean_from": 4}]}))
    assert "pretrain.objectives[mmcl].clean_from: epoch 4 is past the pre-training's 3 epochs" in message


def test_shrink_perturb_alone_from_an_intermediate_epoch(tmp_path):
    """Cleaning starts from epoch 1 of a 2-epoch pre-training; the only method is shrink-perturb, whose
    epoch 0 is the shrunk model. The baseline must be the pre-training's epoch-1 evaluation."""
    from clip_backdoor.study.select import poisoned_models
    from clip_backdoor.study.select import read_results as typed_results

    spec = parse_spec(tiny(pretrain={"epochs": 2, "objectives": [{"name": "mmcl", "clean_from": 1}]},
                           cleaning={"methods": [{"name": "shrink-perturb", "k": [0],
                                                  "params": {"shrink": 0.0, "perturb": 1.0}}],
                                     "lrs": [1e-3]}))
    root = tmp_path / "s"
    assert runner.run_study(spec, root) == 0
    pre = root / "pretrain/mmcl,seed=0"
    assert (pre / "checkpoints/epoch_1.pt").is_file()
    clean = next(r for r in expand(spec, root).runs if r.stage == "clean")
    assert clean.cfg.init_checkpoint == str(pre / "checkpoints/epoch_1.pt")
    rows = typed_results(root / "results.csv")
    pre_rows = {r["epoch"]: r for r in rows if r["stage"] == "pretrain"}
    assert set(pre_rows) == {1, 2}  # epoch 1 is evaluated because cleaning starts from it
    clean_rows = [r for r in rows if r["stage"] == "clean"]
    assert {r["start_epoch"] for r in clean_rows} == {1}
    epoch0 = next(r for r in clean_rows if r["epoch"] == 0)
    metrics = ("acc1", "acc5", "asr1", "asr5", "ra1")
    assert epoch0["init"] == "transformed"  # shrink 0, perturb 1: a fresh init, not the poisoned model
    assert [epoch0[m] for m in metrics] != [pre_rows[1][m] for m in metrics]
    base = poisoned_models(rows)[(0, "mmcl")]
    assert [base[m] for m in metrics] == [pre_rows[1][m] for m in metrics]
    assert base["source"] == "pretrain epoch 1"


def test_a_method_can_have_its_own_cleaning_batch(tmp_path):
    spec = parse_spec(tiny(cleaning={"methods": ["cleanclip", {"name": "mmcl", "batch_size": 128}],
                                     "size": 256}))
    runs = [r for r in expand(spec, tmp_path / "s").runs if r.stage == "clean"]
    assert {r.method: r.cfg.batch_size for r in runs} == {"cleanclip": 32, "mmcl": 128}
    assert "cleaning.methods[0].batch_size: 0 is not an integer >= 1" in error_of(
        tmp_path, tiny(cleaning={"methods": [{"name": "mmcl", "batch_size": 0}]}))
