"""Beyond the paper: labelled objective entries (a dose-response over λ2), the dose-response table and
figure from results.csv, and the study configs in configs/ (each parses and expands)."""

from pathlib import Path

import pytest
import torch
import yaml

from clip_backdoor.errors import UserError
from clip_backdoor.study import dose, select
from clip_backdoor.study.expand import expand
from clip_backdoor.study.spec import load_spec, objective_names, parse_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny(**sections):
    spec = {"name": "tiny", "seeds": [0], "data": {"num_samples": 256, "workers": 0},
            "attack": {"n": 8}, "pretrain": {"objectives": ["mmcl"], "epochs": 1, "batch_size": 64},
            "cleaning": {"size": 64, "methods": ["cleanclip"], "lrs": [1e-4], "epochs": 1, "batch_size": 32},
            "eval": {"n": 40}}
    for name, values in sections.items():
        spec[name] = {**spec[name], **values}
    return spec


DOSES = {"pretrain": {"objectives": ["mmcl"] + [{"name": "mmcl+ssl", "ssl_weight": w, "label": f"ssl={w:g}"}
                                                for w in (0.25, 0.5, 1, 2)]}}


def test_labelled_objectives_expand_into_a_dose_response(tmp_path):
    spec = parse_spec(tiny(**DOSES))
    plan = expand(spec, tmp_path / "s")
    labels = ["mmcl", "ssl=0.25", "ssl=0.5", "ssl=1", "ssl=2"]
    assert [r.pretrain for r in plan.runs if r.stage == "pretrain"] == labels
    weights = {r.pretrain: (r.cfg.objective.mmcl_weight, r.cfg.objective.ssl_weight)
               for r in plan.runs if r.stage == "pretrain"}
    assert weights == {"mmcl": (1.0, 0.0), "ssl=0.25": (1.0, 0.25), "ssl=0.5": (1.0, 0.5),
                       "ssl=1": (1.0, 1.0), "ssl=2": (1.0, 2.0)}
    assert plan.run("pretrain/ssl=0.5,seed=0").cfg.run_dir == str(tmp_path / "s" / "pretrain/ssl=0.5,seed=0")
    clean = plan.run("clean/ssl=2,seed=0/cleanclip/lr=1e-4")
    assert clean.depends_on == "pretrain/ssl=2,seed=0"
    assert clean.cfg.init_checkpoint.endswith("pretrain/ssl=2,seed=0/checkpoints/latest.pt")
    assert objective_names(spec.pretrain)["ssl=2"] == "mmcl+ssl"


@pytest.mark.parametrize("objectives, message", [
    (["mmcl", {"name": "mmcl+ssl", "ssl_weight": 2}, {"name": "mmcl+ssl", "ssl_weight": 4}],
     r"pretrain.objectives\[2\]: 'mmcl\+ssl' is listed twice \(give each entry its own label\)"),
    (["mmcl", {"name": "mmcl", "label": "a b"}], r"pretrain.objectives\[1\].label: 'a b' must be a word"),
    ([{"name": "mmcl", "label": "x"}, {"name": "mmcl+ssl", "label": "x"}],
     r"objectives\[1\]: 'x' is listed twice$"),
    ([{"label": "x"}], r"pretrain.objectives\[0\]: None is not one of"),
])
def test_bad_labels(objectives, message):
    with pytest.raises(UserError, match=message):
        parse_spec(tiny(pretrain={"objectives": objectives}))


def test_patch_path_becomes_absolute(tmp_path, monkeypatch):
    from clip_backdoor.attacks.triggers import save_patch

    save_patch(torch.rand(3, 4, 4), tmp_path / "p.png", image_size=32)
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny(attack={"n": 8, "trigger": "badclip", "trigger_params": {"patch": "p.png"}}))
    assert spec.attack.trigger_params["patch"] == str(tmp_path / "p.png")
    run = expand(spec, tmp_path / "s").runs[0]
    assert run.cfg.eval.trigger_params == {"patch": str(tmp_path / "p.png")}


# --------------------------------------------------------------------------------------------
# The dose-response table, on constructed results with a known answer
# --------------------------------------------------------------------------------------------
def results(points):
    """points: {(label, seed): (poisoned acc, asr, [(lr, epoch, acc, asr), ...])} -> results rows."""
    rows = []
    for (label, seed), (acc0, asr0, cleaned) in points.items():
        for lr in sorted({p[0] for p in cleaned}):
            rows.append({"seed": seed, "stage": "clean", "pretrain": label, "method": "cleanclip", "lr": lr,
                         "k": 0, "epoch": 0, "acc1": acc0, "asr1": asr0})
        for lr, epoch, acc, asr in cleaned:
            rows.append({"seed": seed, "stage": "clean", "pretrain": label, "method": "cleanclip", "lr": lr,
                         "k": 0, "epoch": epoch, "acc1": acc, "asr1": asr})
    return select.typed_rows([{k: str(v) for k, v in r.items()} for r in rows])


POINTS = {
    ("mmcl", 0): (0.40, 0.98, [(1e-4, 1, 0.38, 0.30), (1e-4, 2, 0.30, 0.04), (1e-3, 1, 0.35, 0.01)]),
    ("mmcl", 1): (0.50, 0.96, [(1e-4, 1, 0.45, 0.02), (1e-3, 1, 0.20, 0.00)]),
    ("ssl=1", 0): (0.40, 0.99, [(1e-4, 1, 0.40, 0.90), (1e-3, 1, 0.10, 0.05)]),
    ("ssl=1", 1): (0.40, 0.97, [(1e-4, 1, 0.39, 0.95), (1e-3, 1, 0.05, 0.30)]),
    ("ssl=2", 0): (0.30, 1.00, [(1e-4, 1, 0.30, 0.99)]),
    ("ssl=2", 1): (0.30, 1.00, [(1e-4, 1, 0.28, 0.97)]),
}


def test_dose_table_known_answer():
    rows = results(POINTS)
    # Other methods and k > 0 cleaning sets are not the dose-response's (they would win here).
    others = [{**r, "method": "mmcl"} for r in rows[:4]] + [{**r, "k": 2} for r in rows[:4]]
    for r in others:
        r["acc1"], r["asr1"] = (0.45, 0.0) if r["epoch"] else (r["acc1"], r["asr1"])
    table = dose.dose_table(rows + others, {"mmcl": 0.0, "ssl=1": 1.0, "ssl=2": 2.0})
    assert [r["ssl_weight"] for r in table] == [0.0, 1.0, 2.0]
    mmcl, one, two = table
    assert mmcl["n_cleaned"] == 2 and mmcl["best_acc1_mean"] == pytest.approx((0.35 + 0.45) / 2)
    assert mmcl["rel_change_mean"] == pytest.approx(((0.35 - 0.4) / 0.4 + (0.45 - 0.5) / 0.5) / 2)
    assert mmcl["min_asr1_mean"] == pytest.approx(0.005) and mmcl["poisoned_asr1_mean"] == pytest.approx(0.97)
    assert one["n_cleaned"] == 1 and one["best_acc1_mean"] == pytest.approx(0.10)
    assert one["best_acc1_std"] is None and one["min_asr1_mean"] == pytest.approx((0.05 + 0.30) / 2)
    assert one["per_seed_rel_change"] == "-0.7500;"
    assert two["n_cleaned"] == 0 and two["best_acc1_mean"] is None
    assert two["min_asr1_mean"] == pytest.approx(0.98)
    md = dose.dose_markdown(table)
    # ± is the t interval over seeds: 2 seeds at 97% and 99% give 98.0 ± 12.706 · 1.414 / √2
    assert "| 2 | ssl=2 | 30.0 ± 0.0 | 100.0 ± 0.0 | — | — | 0/2 | 98.0 ± 12.7 | not established |" in md
    assert "| 0 | mmcl |" in md and "(reference) | (reference) |" in md  # 2 seeds: too few for a test
    assert "no λ2 differs from λ2 = 0 established (none of 2 tested)" in md


def test_dose_table_counts_each_seed_once_with_a_validation_split_and_tests_against_lambda_zero():
    """With a validation split every seed has a test- and a validation-selected row; the table takes
    the validation-selected ones (as the headline) and counts each seed once. Three seeds where λ2 = 2
    needs a much larger accuracy cut to reach ASR ≤ 5%: the paired test against λ2 = 0 establishes it."""
    points = {}
    for seed in range(3):
        points[("mmcl", seed)] = (0.40, 0.98, [(1e-4, 1, 0.38 - 0.01 * seed, 0.02)])
        points[("ssl=1", seed)] = (0.40, 0.98, [(1e-4, 1, (0.39, 0.35, 0.38)[seed], 0.03)])
        points[("ssl=2", seed)] = (0.40, 0.98, [(1e-4, 1, 0.10 + 0.01 * seed, 0.01)])
    rows = results(points)
    for r in rows:
        r["val_acc1"], r["val_asr1"] = r["acc1"], r["asr1"]
    mmcl, one, two = dose.dose_table(rows, {"mmcl": 0.0, "ssl=1": 1.0, "ssl=2": 2.0})
    assert (mmcl["n_seeds"], mmcl["n_cleaned"], mmcl["selected_on"]) == (3, 3, "validation")
    assert mmcl["vs0_cost_status"] is None  # the reference itself
    # extra cost per seed = rel change at 0 − at 2 = (0.38 − 0.01 s − 0.10 − 0.01 s) / 0.40
    expected = [(0.28 - 0.02 * s) / 0.40 for s in range(3)]
    assert two["vs0_cost_diff"] == pytest.approx(sum(expected) / 3) and two["vs0_cost_n"] == 3
    assert two["vs0_cost_status"] == "established" and two["vs0_cost_p"] < 0.05
    assert one["vs0_cost_status"] == "not established"  # differences −0.01, +0.02, −0.02 over 0.40: noise
    md = dose.dose_markdown([mmcl, one, two])
    assert "validation-selected, test-reported" in md and "from λ2 = 2" in md


def test_dose_figure_and_files(tmp_path):
    study = tmp_path / "study"
    (study / "report").mkdir(parents=True)
    spec = {"pretrain": {"objectives": ["mmcl", {"name": "mmcl+ssl", "label": "ssl=1"},
                                        {"name": "mmcl+ssl", "label": "ssl=2", "ssl_weight": 2}]}}
    (study / "study.yaml").write_text(yaml.safe_dump(spec))
    assert dose.ssl_weights(study / "study.yaml") == {"mmcl": 0.0, "ssl=1": 1.0, "ssl=2": 2.0}
    paths = dose.write_dose_response(study, results(POINTS), study / "report")
    assert {p.name for p in paths} == {"dose_response.csv", "dose_response.md", "dose_response.png",
                                       "dose_response.svg"}
    assert isinstance(dose.figure_dose_response([]), str)
    (study / "study.yaml").write_text(yaml.safe_dump({"pretrain": {"objectives": ["mmcl", "mmcl+ssl"]}}))
    assert dose.write_dose_response(study, results(POINTS), study / "report") == []  # two doses: not one


# --------------------------------------------------------------------------------------------
# The configs of configs/ parse and expand (their smoke runs are in the README)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["beyond.yaml", "beyond-stripes.yaml", "threshold.yaml",
                                  "trigger-matters.yaml"])
def test_beyond_configs_parse_and_expand(name, tmp_path):
    spec = load_spec(CONFIGS / name)
    plan = expand(spec, tmp_path / spec.name)
    assert len(spec.seeds) == 3 and spec.run.device == "cpu" and spec.data.kind == "synthetic"
    assert plan.runs


def test_badclip_config_parses_given_a_patch(tmp_path):
    from clip_backdoor.attacks.triggers import save_patch

    save_patch(torch.rand(3, 8, 8), tmp_path / "patch.png", image_size=32)
    override = f"attack.trigger_params.patch={tmp_path / 'patch.png'}"
    spec = load_spec(CONFIGS / "beyond-badclip.yaml", [override])
    assert spec.attack.trigger == "badclip" and expand(spec, tmp_path / "s").runs
