"""The run fingerprint (environment.json): what it records, how a resume in another environment is
recorded, how fingerprints are compared, and that the training loop writes it."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from clip_backdoor import environment
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.train.loop import train


def test_collect_records_what_the_issue_asks_for():
    torch.set_num_threads(1)
    fp = environment.collect("cpu")
    json.dumps(fp)  # plain data
    assert fp["python"]["version"].count(".") == 2
    assert fp["torch"]["version"] == torch.__version__
    assert fp["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["torch"]["threads"] == 1 and fp["torch"]["interop_threads"] >= 1
    assert fp["torch"]["world_size"] == 1
    assert fp["os"]["platform"] and fp["cpu"]["logical_cores"] >= 1
    assert fp["packages"]["torch"] == torch.__version__ and "numpy" in fp["packages"]
    assert list(fp["packages"]) == sorted(fp["packages"])
    assert fp["toolkit"]["version"]
    if fp["toolkit"]["commit"] is not None:  # running from a git checkout (this repository)
        assert re.fullmatch(r"[0-9a-f]{40}", fp["toolkit"]["commit"])
        assert isinstance(fp["toolkit"]["dirty"], bool)
    assert "cuda" not in fp  # CPU run: no CUDA section


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_collect_on_cuda_names_the_device_driver_and_cudnn():
    fp = environment.collect("cuda")
    assert fp["cuda"]["device"] == torch.cuda.get_device_name(0)
    assert fp["cuda"]["driver"] and fp["cuda"]["cudnn"] == torch.backends.cudnn.version()


def test_cpu_model_and_driver_from_constructed_files(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                       "model name\t: Intel(R) Xeon(R)  CPU @ 2.20GHz\n")
    assert environment.cpu_model(cpuinfo) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024")
    assert environment.nvidia_driver(proc) == "550.54.15"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.10  Release Build\n")
    assert environment.nvidia_driver(proc) == "570.86.10"


def fingerprint(threads=1, numpy="2.0.0"):
    return {"torch": {"version": "2.13.0", "threads": threads},
            "packages": {"numpy": numpy, "torch": "2.13.0"}}


def test_record_fresh_resume_same_and_resume_elsewhere(tmp_path, caplog):
    environment.record_environment(tmp_path, fingerprint(), start_epoch=0, fresh=True)
    first = (tmp_path / "environment.json").read_text()
    assert json.loads(first) == {"fingerprints": [{"from_epoch": 0, **fingerprint()}]}
    with caplog.at_level(logging.WARNING):
        environment.record_environment(tmp_path, fingerprint(), start_epoch=2, fresh=False)
    assert (tmp_path / "environment.json").read_text() == first and not caplog.records  # same: unchanged
    with caplog.at_level(logging.WARNING):
        environment.record_environment(tmp_path, fingerprint(threads=4), start_epoch=3, fresh=False)
    assert len(caplog.records) == 1 and "torch.threads" in caplog.text and "epoch 3" in caplog.text
    entries = environment.read_environment(tmp_path)
    assert [e["from_epoch"] for e in entries] == [0, 3] and entries[1]["torch"]["threads"] == 4
    # a fresh start owns the file
    environment.record_environment(tmp_path, fingerprint(), start_epoch=0, fresh=True)
    assert len(environment.read_environment(tmp_path)) == 1


def test_differences_name_fields_values_and_runs():
    by_run = {"a": [{"from_epoch": 0, **fingerprint()}],
              "b": [{"from_epoch": 0, **fingerprint(numpy="2.1.0")}],
              "c": [{"from_epoch": 0, **fingerprint()}, {"from_epoch": 2, **fingerprint(threads=2)}]}
    diff = environment.differences(by_run)
    assert set(diff) == {"packages.numpy", "torch.threads"}
    assert diff["packages.numpy"] == {'"2.0.0"': ["a", "c", "c@epoch 2"], '"2.1.0"': ["b"]}
    assert diff["torch.threads"] == {"1": ["a", "b", "c"], "2": ["c@epoch 2"]}
    assert environment.differences({"a": [fingerprint()], "b": [fingerprint()]}) == {}
    common = environment.common([fingerprint(), fingerprint(numpy="3")])
    assert common == {"torch.version": "2.13.0", "torch.threads": 1, "packages.torch": "2.13.0"}
    missing = environment.differences({"a": [{"cuda": {"device": "H200"}}], "b": [{}]})
    assert missing == {"cuda.device": {'"H200"': ["a"], "absent": ["b"]}}


def test_training_writes_environment_json_and_a_resume_elsewhere_adds_one(tmp_path, monkeypatch, caplog):
    base = ["data.num_samples=128", "data.workers=0", "batch_size=64", "eval.every=0", "optim.warmup_steps=1",
            "threads=1", "save_every=0", f"run_dir={tmp_path / 'run'}"]
    train(load_config(TrainConfig, None, [*base, "epochs=1"]))
    (entry,) = environment.read_environment(tmp_path / "run")
    assert entry["from_epoch"] == 0 and entry["torch"]["threads"] == 1 and "packages" in entry
    real = environment.collect
    monkeypatch.setattr(environment, "collect",
                        lambda *a, **k: {**real(*a, **k), "os": {"platform": "elsewhere"}})
    with caplog.at_level(logging.WARNING):
        train(load_config(TrainConfig, None, [*base, "epochs=2", "allow_epochs_change=true"]))
    entries = environment.read_environment(tmp_path / "run")
    assert [e["from_epoch"] for e in entries] == [0, 1] and entries[1]["os"]["platform"] == "elsewhere"
    assert sum("another environment" in r.getMessage() for r in caplog.records) == 1
