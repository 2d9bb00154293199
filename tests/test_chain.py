"""The weak-to-strong chain end to end on the tiny preset: chain.json, the plot, status from files, reruns."""

from __future__ import annotations

import json
import shutil

import pytest

from pixsigma.registry import DEMO_DIR
from shapes.plan import StageRun, lab_plan, plan_to_json
from train.ablation import ABLATION_JSON, ABLATION_MD, run_kv_ablation, seconds_per_step
from train.chain import (
    CHAIN_JSON,
    CHAIN_PLOT,
    CHAIN_RUN,
    Chain,
    chain_status,
    intervals,
    run_chain,
    stage_overrides,
    stop_chain,
)
from train.protocol import paired_change

SCHEMA = {"name", "stage", "steps", "seconds", "final_loss", "shapesbench"}
BENCH_KEYS = {"attribute", "count", "colour", "shape", "position", "n", "interval", "conditions"}


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
    assert all(set(s["cpu_seconds"]) == {"prepare", "train", "score"} for s in sigma)  # CPU time beside the wall time
    assert set(alpha["cpu_seconds"]) == {"score"}
    assert [s["start"] for s in sigma] == ["shipped alpha", "previous run", "previous run"]
    assert all(s["curve"][0][0] == 0 and s["curve"][-1][0] == 2 for s in sigma)
    assert all(len(p) == 4 and p[2] <= p[1] <= p[3] for s in on_disk["stages"] for p in s["curve"])  # intervals
    assert (runs / CHAIN_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert {e["point"] for e in events if e["event"] == "score"} == {"start", "final", "expanded"}
    assert events[-1]["event"] == "chain" and events[-1]["state"] == "done"


def test_every_point_is_scored_under_the_recorded_protocol(tiny_chain):
    runs, summary, _ = tiny_chain
    proto = summary["protocol"]
    assert (proto["bench"], proto["n"], proto["steps"], proto["sampler"], proto["guidance"], proto["expander"]) == (
        "ShapesBench", 2, 2, "dpm-solver", 4.5, "shapes")
    for s in summary["stages"]:  # identical conditions at a stage's start and its end
        assert s["start_conditions"] == s["conditions"] == s["shapesbench"]["conditions"]
        lo, hi = s["shapesbench"]["interval"]
        assert lo <= s["shapesbench"]["attribute"] <= hi
        bench = json.loads((runs / s["name"] / "bench.json").read_text())
        assert len(bench["final"]["per_prompt"]) == 2  # what the interval resamples, kept with the run
    alpha, vae, resup, kv = summary["stages"]
    alike = {"expander": False, "sampling": "protocol"}
    assert alpha["conditions"] == {"pipeline": "alpha", "resolution": 128, **alike}
    assert vae["conditions"] == {"pipeline": "sigma", "resolution": 128, **alike}
    assert resup["conditions"] == kv["conditions"] == {"pipeline": "sigma", "resolution": 256, **alike}
    # at each boundary, both scores: the model before it under its own conditions, and under the new ones
    assert [s["boundary"]["changes"] for s in (vae, resup, kv)] == [["pipeline"], ["resolution"], []]
    assert [s["boundary"]["label"] for s in (vae, resup, kv)] == [
        "VAE alpha → sigma", "128 → 256 px, PE interpolation", "KV compression added"]
    for before, s in ((alpha, vae), (vae, resup), (resup, kv)):
        assert s["boundary"]["before"] == before["shapesbench"] and s["boundary"]["after"] == s["start_shapesbench"]
    # the ends once more with the expander on, under otherwise the same conditions
    assert alpha["expanded_shapesbench"]["conditions"] == {**alpha["conditions"], "expander": True}
    assert kv["expanded_shapesbench"]["conditions"] == {**kv["conditions"], "expander": True}
    rec = summary["recovery"]
    assert [r["name"] for r in rec["stages"]] == ["sigma_vae", "sigma_resup", "sigma_kv"]
    assert rec["final_vs_alpha"]["alpha"] == alpha["shapesbench"]["attribute"]
    assert rec["final_vs_alpha_sigma_side"]["alpha"] == vae["start_shapesbench"]["attribute"]
    assert isinstance(rec["met"], bool)
    # the final against each α on the same prompts and seeds: the paired test on the runs' per-prompt scores
    per = {name: json.loads((runs / name / "bench.json").read_text()) for name in ("alpha", "sigma_vae", "sigma_kv")}
    final = per["sigma_kv"]["final"]["per_prompt"]
    assert rec["final_vs_alpha"]["paired"] == paired_change(per["alpha"]["final"]["per_prompt"], final)
    assert rec["final_vs_alpha_sigma_side"]["paired"] == paired_change(per["sigma_vae"]["start"]["per_prompt"], final)


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


def test_kv_ablation_trains_each_variant_from_the_same_resup_export(tiny_chain):
    runs, _, _ = tiny_chain
    result = run_kv_ablation(Chain("tiny", runs))
    v = result["variants"]
    assert list(v) == ["conv_deep", "pool_deep", "discard_deep", "conv_shallow"]
    assert [(r["operator"], r["layers"]) for r in v.values()] == [("conv", "4-7"), ("pool", "4-7"),
                                                                  ("discard", "4-7"), ("conv", "0-3")]
    assert v["conv_deep"]["run_dir"] == str(runs / "sigma_kv")  # the chain's own KV run: the same variant
    for name in ("pool_deep", "discard_deep", "conv_shallow"):
        run = runs / "ablation_kv" / name
        assert v[name]["run_dir"] == str(run) and (run / "final").is_dir()
        assert f"operator: {v[name]['operator']}" in (run / "config.yaml").read_text()
        assert str(runs / "sigma_resup") in (run / "config.yaml").read_text()
    assert all(r["steps"] == 2 and r["shapesbench"]["n"] == 2 for r in v.values())
    assert json.loads((runs / ABLATION_JSON).read_text()) == result
    assert "| pool_deep | pool | 4-7 |" in (runs / ABLATION_MD).read_text()
    assert all(set(r["shapesbench"]["interval"]) and "per_prompt" not in r["shapesbench"] for r in v.values())
    diffs = result["differences"]
    assert [(d["variant"], d["versus"]) for d in diffs] == [("pool_deep", "conv_deep"), ("discard_deep", "conv_deep"),
                                                            ("conv_shallow", "conv_deep")]
    assert all(d["real"] == (not d["interval"][0] <= 0 <= d["interval"][1]) for d in diffs)
    assert "pool_deep vs conv_deep:" in (runs / ABLATION_MD).read_text()


def test_checkpoints_are_saved_on_a_grid_through_the_scored_steps(tmp_path):
    assert intervals(40, 1) == (20, 20) and intervals(60, 0, 20) == (20, 60) and intervals(60, 1, 20) == (15, 30)
    assert intervals(500, 4, 50) == (50, 100) and intervals(40, 0, 100) == (40, 40)
    st = StageRun("sigma_vae", "shapes_sigma_vae.yaml", "c", 60, "sigma", 128, 16, 960)
    sets = stage_overrides(st, None, tmp_path, 0, None, 20)
    assert {"save_every=20", "keep_last=5", "steps=60", "data.max_images=960"} <= set(sets)
    rows = [{"step": 1, "time": 100.0}, {"step": 5, "time": 130.0}, {"step": 9, "time": 134.0}]
    assert seconds_per_step(rows) == 4.25 and seconds_per_step(rows[:1]) is None
    burst = [{"step": s, "time": 100 + s / 1e4} for s in range(1, 11)] + [{"step": s, "time": 120.0 + s / 1e4}
                                                                         for s in range(11, 21)]
    assert seconds_per_step(burst + [{"step": 30, "time": 130.002}]) == pytest.approx(1.5, abs=1e-3)


def test_a_dead_chain_reads_as_failed_and_stop_asks_the_running_stage(tmp_path):
    (tmp_path / "sigma_vae").mkdir()
    (tmp_path / CHAIN_RUN).write_text(json.dumps({"pid": 2 ** 22 + 7, "state": "running", "current": "sigma_vae"}))
    assert chain_status(tmp_path)["state"] == "failed"
    stop_chain(tmp_path)
    assert (tmp_path / "STOP").is_file() and (tmp_path / "sigma_vae" / "STOP").is_file()


def test_bad_preset_or_start_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^preset must be one of tiny, quick, quick-fast, full, got 'huge'$"):
        Chain("huge", tmp_path)
    with pytest.raises(ValueError, match="^start_from must be one of shipped, scratch, got 'nowhere'$"):
        Chain("tiny", tmp_path, "nowhere")


def test_the_full_preset_is_the_shipped_pairs_recipe():
    """``full`` must retrain what ships: the build's stored plan, then the polish and band runs its curves extend."""
    shipped = json.loads((DEMO_DIR / "shapesbench.json").read_text())
    full = lab_plan("full").plan
    assert plan_to_json(full[:4]) == shipped["plan"]
    extra = {st.name: st.steps for st in full[4:]}
    assert {k: extra[k] for k in ("sigma_polish", "sigma_band")} == {k: shipped["curves"][k]["steps"]
                                                                     for k in ("sigma_polish", "sigma_band")}
    assert [st.name for st in full][-1] == "sigma_lcm"
