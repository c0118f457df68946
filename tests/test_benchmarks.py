"""The scale benchmark's report, from the records of its GPU runs committed in benchmarks/results."""

import json
from pathlib import Path

from benchmarks.scale import table

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "2026-11-27-h200-scale-glm47-2layer"


def test_report_from_recorded_gpu_runs():
    records = json.loads((RESULTS / "n16-32-v1.json").read_text())
    text = table(records)
    assert "| stock | 16 | 1 | MoE |" in text and "| glmrel | 32 | 1 | MoE |" in text
    assert "| 16 | 1 | MoE | 80.6 | 64.8 | 1.24x |" in text, "ratio = stock / glmrel of calibrate + smooth"
    assert "stock: per extra sample, peak GPU +807.7 MiB, peak host +1150.1 MiB" in text
    assert "glmrel: per extra sample, peak GPU +21.1 MiB, peak host +43.5 MiB" in text


def test_recorded_runs_are_the_engines_they_claim():
    for f in RESULTS.glob("*.json"):
        for r in json.loads(f.read_text()):
            assert r["engine"] in ("stock", "glmrel")
            if r["engine"] == "stock":
                assert r["expert_tokens_kept"] == 0, "stock keeps every token (no sampled caches)"
            assert "H200" in (r["gpu"] or ""), f"{f.name}: recorded on {r['gpu']}"
