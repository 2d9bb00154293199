"""The weak-to-strong chain end to end on the tiny preset: chain.json, the plot, status from files, reruns."""

from __future__ import annotations

import json
import shutil

import pytest

from train.chain import CHAIN_JSON, CHAIN_PLOT, CHAIN_RUN, Chain, chain_status, run_chain, stop_chain

SCHEMA = {"name", "stage", "steps", "seconds", "final_loss", "shapesbench"}
BENCH_KEYS = {"attribute", "count", "colour", "shape", "position", "n"}


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    runs = tmp_path_factory.mktemp("chain")
    events = []
    summary = run_chain("tiny", runs, "shipped", on_event=events.append)
    return runs, summary, events


def test_chain_json_has_the_issue_schema_for_every_stage(tiny_chain):
    runs, summary, events = tiny_chain
    on_disk = json.loads((runs / CHAIN_JSON).read_text())
    assert on_disk == summary and on_disk["preset"] == "tiny"
    assert [(s["name"], s["stage"]) for s in on_disk["stages"]] == [
        ("alpha", "from_scratch"), ("sigma_vae", "vae_adapt"), ("sigma_resup", "res_up"), ("sigma_kv", "kv_compress")]
    for s in on_disk["stages"]:
        assert SCHEMA <= set(s) and set(s["shapesbench"]) == BENCH_KEYS and s["shapesbench"]["n"] == 2
        assert set(s["start_shapesbench"]) == BENCH_KEYS
    alpha, *sigma = on_disk["stages"]
    assert (alpha["steps"], alpha["start"], alpha["final_loss"]) == (0, "shipped", None)  # scored, not trained
    assert [s["steps"] for s in sigma] == [2, 2, 2] and all(s["final_loss"] > 0 and s["seconds"] > 0 for s in sigma)
    assert [s["start"] for s in sigma] == ["shipped alpha", "previous run", "previous run"]
    assert all(s["curve"][0][0] == 0 and s["curve"][-1][0] == 2 for s in sigma)
    assert (runs / CHAIN_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert {e["point"] for e in events if e["event"] == "score"} == {"start", "final"}
    assert events[-1]["event"] == "chain" and events[-1]["state"] == "done"


def test_status_is_read_from_files(tiny_chain):
    runs, _, _ = tiny_chain
    st = chain_status(runs)
    assert (st["state"], st["preset"], st["start_from"]) == ("done", "tiny", "shipped")
    assert [s["state"] for s in st["stages"]] == ["done"] * 4
    kv = st["stages"][-1]
    assert (kv["step"], kv["total_steps"]) == (2, 2) and kv["loss"][-1][0] == 2 and kv["score"]["n"] == 2
    assert len(kv["samples"]) == 2 and all(p.endswith(".png") for p in kv["samples"])
    assert chain_status(runs / "nothing")["state"] == "none"


def test_rerun_skips_finished_stages_and_finishes_an_interrupted_one(tiny_chain):
    runs, summary, _ = tiny_chain
    shutil.rmtree(runs / "sigma_kv" / "final")  # as if killed after its last checkpoint, before the export
    events = []
    again = run_chain("tiny", runs, "shipped", on_event=events.append)
    states = [(e["name"], e["state"]) for e in events if e["event"] == "stage" and e["state"] in ("skipped", "running")]
    assert states == [("sigma_vae", "skipped"), ("sigma_resup", "skipped"), ("sigma_kv", "running")]
    assert (runs / "sigma_kv" / "final").is_dir()
    assert [s["name"] for s in again["stages"]] == [s["name"] for s in summary["stages"]]


def test_a_dead_chain_reads_as_failed_and_stop_asks_the_running_stage(tmp_path):
    (tmp_path / "sigma_vae").mkdir()
    (tmp_path / CHAIN_RUN).write_text(json.dumps({"pid": 2 ** 22 + 7, "state": "running", "current": "sigma_vae"}))
    assert chain_status(tmp_path)["state"] == "failed"
    stop_chain(tmp_path)
    assert (tmp_path / "STOP").is_file() and (tmp_path / "sigma_vae" / "STOP").is_file()


def test_bad_preset_or_start_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^preset must be one of tiny, quick, full, got 'huge'$"):
        Chain("huge", tmp_path)
    with pytest.raises(ValueError, match="^start_from must be one of shipped, scratch, got 'nowhere'$"):
        Chain("tiny", tmp_path, "nowhere")
