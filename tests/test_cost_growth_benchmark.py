"""benchmarks/cost_growth.py runs its 8 points end to end and reports sizes that grow as named."""

from __future__ import annotations

import json

from _scripts import load_script


def test_cost_growth_benchmark_smoke(tmp_path, monkeypatch):
    module = load_script("benchmarks/cost_growth.py")
    # tiny sizes (the suite's budget): one batch of 128 to four, cleaning sets of one to four batches of 25
    monkeypatch.setattr(module, "DEMO", {"pairs": 256, "eval_n": 40, "cleaning": 50})
    monkeypatch.setattr(module, "POINTS", {"pairs": (128, 256, 512), "eval_n": (20, 40, 80),
                                           "cleaning": (25, 50, 100)})
    out = tmp_path / "cost_growth.json"
    assert module.main(["--epochs", "1", "--cleaning-epochs", "1", "--scale", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    by_kind = {}
    for r in result["rows"]:
        by_kind.setdefault(r["grows"], []).append(r)
        assert r["seconds"] > 0 and r["ms_per_unit"] == 1000 * r["seconds"] / r["size"]
    assert [[r["size"] for r in rows] for rows in by_kind.values()] == [[256, 512, 1024], [40, 80, 160],
                                                                         [50, 100, 200]]
    # the evaluation row's demo-sized point is the pairs row's demo-sized run, not a second one
    assert by_kind["evaluation images (pre-training run)"][1]["seconds"] == \
        by_kind["pre-training pairs"][1]["seconds"]
