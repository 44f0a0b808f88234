"""The study report on small synthetic studies: every file, the numbers in its tables, byte-identical
reruns, and what it does with missing metrics and unfinished studies.

The synthetic results are built by formula so that the headline's CleanCLIP cell is known by hand:
on the MMCL model, lr 1e-4 reaches ASR 0 at epoch 3 with accuracy acc0 − 0.06, which beats every
other point with ASR ≤ 5%.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from clip_backdoor.errors import UserError
from clip_backdoor.study.figures import FIGURE_NAMES
from clip_backdoor.study.report import write_report
from clip_backdoor.study.select import COLUMNS

STUDY_YAML = "name: tiny-study\nseeds: [0, 1]\nclean:\n  methods: [cleanclip, mmcl]  # <b>escaped</b>\n"


def synthetic_rows(seeds=(0, 1), objectives=("mmcl", "mmcl+ssl"), methods=("cleanclip", "mmcl"),
                   lrs=(1e-5, 1e-4, 1e-3), epochs=3, ks=(0, 5)) -> list[dict]:
    rows = []
    for seed in seeds:
        acc0, asr0 = 0.50 + 0.01 * seed, 0.99
        for objective in objectives:
            for e in range(1, epochs + 1):
                rows.append(dict(seed=seed, stage="pretrain", pretrain=objective, epoch=e, step=10 * e,
                                 acc1=acc0 * e / epochs, asr1=asr0 * e / epochs, loss=1 / e,
                                 run=f"pretrain/{objective}/seed={seed}"))
            for method in methods:
                for k in ks:
                    for strength, lr in enumerate(lrs):
                        run = f"clean/{objective}/{method}/lr={lr:g},k={k}/seed={seed}"
                        for e in range(epochs + 1):
                            asr = max(0.0, round(0.99 - 0.33 * strength * e, 6))
                            if method == "mmcl" or (objective == "mmcl+ssl" and strength < 2):
                                asr = 0.99  # MMCL-only never cleans; MMCL+SSL needs the large lr
                            if k:
                                asr = max(asr, 0.4)
                            acc = acc0 - 0.02 * strength * e
                            if objective == "mmcl+ssl" and strength == 2 and e:
                                acc -= 0.3  # large lr removes the backdoor and collapses accuracy
                            rows.append(dict(seed=seed, stage="clean", pretrain=objective, method=method,
                                             lr=lr, k=k, epoch=e, step=5 * e, acc1=round(acc, 6),
                                             acc5=min(1, acc + .3), asr1=asr, asr5=asr, n=200, n_asr=180,
                                             loss=0.5, run=run))
    return rows


def write_study(study_dir, rows, columns=COLUMNS, study_yaml=STUDY_YAML):
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r[c] for c in columns})
    if study_yaml is not None:
        (study_dir / "study.yaml").write_text(study_yaml)
    return study_dir


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("study") / "tiny", synthetic_rows())
    index = write_report(study)
    return study, index


# --------------------------------------------------------------------------------------------
# A complete study
# --------------------------------------------------------------------------------------------
def test_every_file_is_written(full_report):
    study, index = full_report
    out = study / "report"
    assert index == out / "index.html"
    for name in FIGURE_NAMES:
        with Image.open(out / f"{name}.png") as image:
            assert image.width > 600 and image.height > 300
            pixels = np.asarray(image.convert("RGB")).astype(np.int32)
        # Not blank: varied pixels, many colours, and some of them far from grey (the methods' colours).
        assert pixels.std() > 10, name
        assert len(np.unique(pixels @ np.array([65536, 256, 1]))) > 100, name  # distinct colours
        coloured = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 60
        assert coloured.mean() > 0.001, (name, coloured.mean())
        svg = (out / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<dc:date>" not in svg
    for name in ("headline.md", "selection.md", "runs.md", "selection.csv", "selection_per_seed.csv",
                 "poisoned.csv", "runs.csv"):
        assert (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_page_shows_every_figure_the_tables_and_the_config(full_report):
    _, index = full_report
    page = index.read_text()
    for name in FIGURE_NAMES:
        assert f'<img src="{name}.png"' in page and f'href="{name}.svg"' in page
    assert page.count("How to read:") == len(FIGURE_NAMES)
    assert "<h1>Study report: tiny-study</h1>" in page
    assert "# &lt;b&gt;escaped&lt;/b&gt;" in page  # study.yaml shown verbatim, HTML-escaped
    assert "<td>44.5 ± 6.4</td><td>2/2</td><td>-11.9 ± 1.5%</td><td>0.0 ± 0.0</td>" in page
    assert "Not drawn" not in page


def test_headline_has_the_hand_computed_cells(full_report):
    study, _ = full_report
    lines = (study / "report" / "headline.md").read_text().splitlines()
    # acc0 = 0.50 / 0.51 per seed; best at ASR ≤ 5%: acc0 − 0.06 (lr 1e-4, epoch 3); ± is the 95% t
    # interval over 2 seeds, 12.706 · s / √2 = 12.706 · 0.005. Keeping ≥ 90% of acc0 allows a drop of
    # 0.05 (0.051), i.e. strength × epoch ≤ 2: ASR 0.99 − 0.66 = 33%.
    assert ("| MMCL | 50.5 ± 6.4 / 99.0 ± 0.0 | CleanCLIP | 44.5 ± 6.4 | 2/2 | -11.9 ± 1.5% | 0.0 ± 0.0 "
            "| 33.0 ± 0.0 |" in lines)
    assert "|  |  | MMCL only | none | 0/2 |  | 99.0 ± 0.0 | 99.0 ± 0.0 |" in lines
    assert "|  |  | CleanCLIP, k=5 | none | 0/2 |  | 40.0 ± 0.0 | 40.0 ± 0.0 |" in lines
    # MMCL+SSL: only the large lr cleans, at epoch 2 (ASR 0), with the collapse: acc0 − 0.08 − 0.3;
    # nothing that keeps 90% of the accuracy lowers the ASR.
    assert any(line.startswith("| MMCL+SSL |") and "| CleanCLIP | 12.5 ± 6.4 |" in line
               and line.endswith("| 99.0 ± 0.0 |") for line in lines)


def test_selection_csv_numbers(full_report):
    study, _ = full_report
    table = read_csv(study / "report" / "selection.csv")
    by_key = {(r["pretrain"], r["method"], r["k"], r["rule"]): r for r in table}
    best = by_key[("mmcl", "cleanclip", "0", "asr<=5%")]
    assert float(best["acc1_mean"]) == pytest.approx(0.445)
    assert best["lrs"] == "1e-4;1e-4" and best["epochs"] == "3;3" and best["n_found"] == "2"
    last = by_key[("mmcl", "cleanclip", "0", "last-epoch")]   # accuracy alone picks the smallest lr
    assert last["lrs"] == "1e-5;1e-5" and float(last["asr1_mean"]) == pytest.approx(0.99)
    assert by_key[("mmcl", "mmcl", "5", "asr<=1%")]["status"] == "none"
    assert len(table) == 2 * 2 * 2 * 7  # objectives × methods × k × rules
    per_seed = read_csv(study / "report" / "selection_per_seed.csv")
    assert len(per_seed) == 2 * len(table)


def test_runs_table_has_one_row_per_run_at_its_last_epoch(full_report):
    study, _ = full_report
    runs = read_csv(study / "report" / "runs.csv")
    assert len(runs) == 2 * (2 + 2 * 2 * 2 * 3)  # seeds × (pretrain runs + cleaning runs)
    assert {r["epoch"] for r in runs} == {"3"}
    assert runs[0]["stage"] == "pretrain"
    poisoned = read_csv(study / "report" / "poisoned.csv")
    assert [r["pretrain"] for r in poisoned] == ["mmcl", "mmcl+ssl"]
    assert float(poisoned[0]["acc1_mean"]) == pytest.approx(0.505)


def test_rerun_is_byte_identical(full_report, tmp_path):
    study, _ = full_report
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    write_report(copy)
    for path in sorted((study / "report").iterdir()):
        assert (copy / "report" / path.name).read_bytes() == path.read_bytes(), path.name


# --------------------------------------------------------------------------------------------
# Missing metrics, unfinished studies, bad input
# --------------------------------------------------------------------------------------------
def small_rows(**kwargs):
    return synthetic_rows(seeds=(0,), objectives=("mmcl",), methods=("cleanclip",), lrs=(1e-4, 1e-3),
                          epochs=2, **kwargs)


def test_study_without_asr_columns(tmp_path):
    columns = [c for c in COLUMNS if not c.startswith("asr")]
    study = write_study(tmp_path / "s", small_rows(ks=(0,)), columns=columns)
    page = write_report(study).read_text()
    out = study / "report"
    assert (out / "pretraining.png").exists()
    for name in ("acc_vs_asr", "trajectories", "k_poisons"):
        assert not (out / f"{name}.png").exists()
    assert page.count("Not drawn") == 3 and "No ASR in the results" in page
    assert "no ASR" in (out / "headline.md").read_text()
    last = [r for r in read_csv(out / "selection.csv") if r["rule"] == "last-epoch"]
    assert last and last[0]["status"] == "ok"


def test_study_with_only_pretraining_so_far(tmp_path):
    rows = [r for r in small_rows() if r["stage"] == "pretrain"]
    study = write_study(tmp_path / "s", rows, study_yaml=None)
    page = write_report(study).read_text()
    assert (study / "report" / "pretraining.png").exists()
    assert not (study / "report" / "acc_vs_asr.png").exists()
    assert "No cleaning runs in the results yet" in page
    assert "has no cleaning runs yet" in page
    assert "study.yaml not found" in page
    assert "(no cleaning runs yet)" in (study / "report" / "headline.md").read_text()


def test_header_only_results(tmp_path):
    study = write_study(tmp_path / "s", [])
    page = write_report(study).read_text()
    assert "results.csv has no rows yet" in page
    assert page.count("Not drawn") == len(FIGURE_NAMES)


def test_unfinished_runs_are_named(tmp_path):
    rows = [r for r in small_rows() if not (r["stage"] == "clean" and r["lr"] == 1e-3 and r["k"] == 5
                                           and r["epoch"] == 2)]
    rows += [dict(r, seed=1) for r in small_rows(ks=(0,))]  # a second seed without its k = 5 runs
    study = write_study(tmp_path / "s", rows)
    page = write_report(study).read_text()
    assert "1 run(s) stopped before epoch 2" in page and "seed 0, lr 1e-3, k=5: epoch 1" in page
    assert "CleanCLIP, k=5: results for 1 of 2 seeds" in page


def test_figures_from_an_earlier_report_do_not_outlive_their_data(tmp_path):
    study = write_study(tmp_path / "s", small_rows())
    write_report(study)
    assert (study / "report" / "k_poisons.svg").exists()
    write_study(study, small_rows(ks=(0,)))
    page = write_report(study).read_text()
    assert not (study / "report" / "k_poisons.svg").exists()
    assert not (study / "report" / "k_poisons.png").exists()
    assert "Not drawn: the study has no cleaning runs with poisons in the cleaning set" in page


def test_missing_results_or_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="study directory not found"):
        write_report(tmp_path / "nope")
    (tmp_path / "s").mkdir()
    with pytest.raises(UserError, match="results file not found"):
        write_report(tmp_path / "s")
