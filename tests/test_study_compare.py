"""`study compare`: one method's headline cells across studies, each as its own report computes them."""

from __future__ import annotations

import pytest
import yaml

from clip_backdoor.cli import main as cli
from clip_backdoor.study import finding
from clip_backdoor.study.compare import compare_rows
from clip_backdoor.study.select import COLUMNS
from clip_backdoor.study.tables import write_csv


def make_study(root, name, trigger, accs, asr_ssl):
    """Seeds 0-2; CleanCLIP's one epoch per model: MMCL reaches ASR 2%, MMCL+SSL ``asr_ssl``."""
    rows = []
    for seed, (a, b) in enumerate(accs):
        for objective, acc, asr in (("mmcl", a, 0.02), ("mmcl+ssl", b, asr_ssl)):
            base = dict.fromkeys(COLUMNS)
            rows.append({**base, "seed": seed, "stage": "pretrain", "pretrain": objective, "epoch": 1,
                         "acc1": 0.5, "asr1": 0.99, "run": f"pretrain/{objective},seed={seed}"})
            rows.append({**base, "seed": seed, "stage": "clean", "pretrain": objective, "method": "cleanclip",
                         "lr": 1e-4, "k": 0, "start_epoch": 1, "epoch": 1, "acc1": acc, "asr1": asr,
                         "run": f"clean/{objective},seed={seed}/cleanclip/lr=1e-4"})
    study_dir = root / name
    study_dir.mkdir()
    write_csv(study_dir / "results.csv", rows)
    (study_dir / "study.yaml").write_text(yaml.safe_dump({"name": name, "attack": trigger}))
    return study_dir, rows


def test_each_study_gets_its_own_headline_cells_and_verdicts(tmp_path):
    accs = [(0.47, 0.25), (0.46, 0.22), (0.48, 0.27)]
    badnet = {"trigger": "badnet", "trigger_params": {"size": 8}}
    a, rows_a = make_study(tmp_path, "badnet", badnet, accs, 0.03)
    b, _ = make_study(tmp_path, "stripes", {"trigger": "badnet-stripes"}, accs, 0.60)
    records = compare_rows([a, b])
    assert [(r["study"], r["pre-training"]) for r in records] == [
        ("badnet", "MMCL"), ("", "MMCL+SSL"), ("stripes", "MMCL"), ("", "MMCL+SSL")]
    assert records[0]["trigger"] == "badnet (size 8)" and records[2]["trigger"] == "badnet-stripes"
    assert [r["seeds at ASR ≤ 5%"] for r in records] == ["3/3", "3/3", "3/3", "0/3"]
    best = [r["best acc at ASR ≤ 5% (%)"] for r in records]
    assert best[1] == "24.7 ± 6.3" and best[3] == "none"
    assert records[0]["poisoned acc / ASR (%)"] == "50.0 ± 0.0 / 99.0 ± 0.0"
    c = finding.compare(rows_a)  # the verdict is the study's own test
    assert records[0]["finding at ASR ≤ 5%"] == f"established (p = {c.test.p:.2g}, 3/3 seeds)"
    assert records[2]["finding at ASR ≤ 5%"].startswith("established")  # −100% imputed on MMCL+SSL
    assert compare_rows([a], method="par")[0]["seeds at ASR ≤ 5%"] == "—"  # no PAR runs there


def test_the_command_prints_and_writes_the_table_and_refuses_a_directory_without_results(tmp_path, capsys):
    a, _ = make_study(tmp_path, "one", {"trigger": "badnet"}, [(0.4, 0.3)] * 3, 0.03)
    out = tmp_path / "compare.md"
    assert cli(["study", "compare", str(a), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CleanCLIP (k = 0) across 1 studies" in printed and out.read_text() in printed
    (tmp_path / "empty").mkdir()
    assert cli(["study", "compare", str(a), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: no results.csv" in err[0]


def test_compare_refuses_an_unknown_flag(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(["study", "compare", str(tmp_path), "--bogus"])
    assert e.value.code == 2
