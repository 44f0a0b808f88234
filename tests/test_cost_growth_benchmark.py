"""benchmarks/cost_growth.py runs its 8 points end to end and reports sizes that grow as named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_cost_growth_benchmark_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_growth.py"
    spec = importlib.util.spec_from_file_location("cost_growth_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost_growth.json"
    assert module.main(["--epochs", "1", "--cleaning-epochs", "1", "--scale", "0.2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    by_kind = {}
    for r in result["rows"]:
        by_kind.setdefault(r["grows"], []).append(r)
        assert r["seconds"] > 0 and r["ms_per_unit"] == 1000 * r["seconds"] / r["size"]
    assert [[r["size"] for r in rows] for rows in by_kind.values()] == [[500, 1000, 2000], [100, 200, 400],
                                                                         [40, 80, 160]]
    # the evaluation row's demo-sized point is the pairs row's demo-sized run, not a second one
    assert by_kind["evaluation images (pre-training run)"][1]["seconds"] == \
        by_kind["pre-training pairs"][1]["seconds"]
