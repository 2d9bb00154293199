"""bench/smoke.py at tiny shapes on the CPU: every feature in every speed mode runs, stays within the stated
tolerance of eager, and lands in one table (markdown and JSON); --max-seconds stops early and says so."""

from __future__ import annotations

import json

from bench.features import features_for
from bench.smoke import NOT_RUN, SCALES, SPEED_RTOL
from bench.smoke import main as smoke

MODES = ("eager", "sdpa", "compile")


def test_every_feature_in_every_speed_mode(tmp_path, capsys):
    rc = smoke(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "smoke.json").read_text())
    md = (tmp_path / "smoke.md").read_text()
    scale = SCALES["tiny"]
    names = ["plain", *(f.name for f in features_for("cpu") if f.group != "speed")]
    want = {(m, n, scale.base) for m in MODES for n in names} | {(m, "plain", s) for m in MODES for s in scale.big}
    got = [(r["mode"], r["features"], r["size"]) for r in table["rows"]]
    assert sorted(got) == sorted(want) and len(got) == len(want)
    failed = [f"{r['mode']} {r['features']} {r['size']}: {r['status']}" for r in table["rows"] if r["status"] != "ok"]
    assert failed == [], "\n".join(failed)
    assert rc == 0 and table["failed"] == 0 and not table["partial"]
    assert table["tolerance"] == SPEED_RTOL[scale.dtype]
    for r in table["rows"]:
        assert r["seconds"] > 0
        if r["mode"] != "eager":
            assert 0 <= r["error_vs_eager"] <= table["tolerance"]
        row = f"| {r['mode']} | {r['features']} | {r['size']} | ok |"
        assert sum(line.startswith(row) for line in md.splitlines()) == 1, row
    assert f"0 failed of {len(want)} rows" in capsys.readouterr().out


def test_max_seconds_writes_a_partial_table(tmp_path):
    assert smoke(["--device", "cpu", "--tiny", "--modes", "eager", "--max-seconds", "0.001",
                  "--out", str(tmp_path)]) == 3
    table = json.loads((tmp_path / "smoke.json").read_text())
    assert table["partial"] and table["failed"] == 0
    assert {r["status"] for r in table["rows"]} == {NOT_RUN}
    assert "(stopped at --max-seconds: partial)" in (tmp_path / "smoke.md").read_text()


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    assert smoke(["--device", "cpu", "--tiny", "--modes", "graphs", "--out", str(tmp_path)]) == 2
    assert "--modes graphs: accepted eager, sdpa, compile, graphs (graphs only on CUDA)" in capsys.readouterr().err
    assert smoke(["--device", "cpu", "--max-seconds", "0", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "smoke.json").exists()
