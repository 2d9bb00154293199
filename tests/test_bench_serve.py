"""``python -m bench.serve`` end to end on a tiny pipeline: the app in a subprocess, two users, the report."""

from __future__ import annotations

import json

from bench.serve import main, percentile


def test_bench_serve_reports_load_memory_and_determinism(tiny_pipeline, tmp_path):
    code = main(["--users", "2", "--requests", "2", "--model", str(tiny_pipeline), "--steps", "2", "--threads", "1",
                 "--note", "a test run", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "serve.json").read_text())
    assert code == 0
    assert (result["requests"], result["served"], result["refused"], result["errors"]) == (4, 4, 0, 0)
    assert result["determinism_probes"] == 2 and result["deterministic_under_load"] is True
    assert result["server_rss_before_mib"] > 0 and result["server_rss_after_mib"] > 0
    assert 0 < result["latency_p50_s"] <= result["latency_p95_s"] <= result["latency_max_s"]
    assert result["environment"]["torch"] and result["server_tracebacks"] == 0
    md = (tmp_path / "serve.md").read_text()
    assert "| requests served / refused / errors | 4 / 0 / 0 of 4 |" in md and "Note: a test run" in md


def test_percentiles():
    assert percentile([], 50) is None and percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.05
