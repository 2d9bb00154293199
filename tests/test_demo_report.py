"""The build: its stage plan and its record, its pipeline folders, the report that reads the record, each Σ
curve's step-0 model and the plateau measure."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fixtures import TINY_DIT, random_dit

from pixsigma.config import KVCompress
from pixsigma.weights import KV_KEYS, save_dit
from shapes import CONFIGS, DEMO_DIR
from shapes.plan import plan_from_json, plan_to_json, read_build_record, stage_plan, write_build_record
from shapes.report import _stage_start, plateau_step


def test_stage_start_is_the_previous_export_in_the_next_stages_model(tmp_path):
    prev = random_dit(TINY_DIT)
    save_dit(prev, tmp_path / "final")
    nxt = replace(TINY_DIT.at_resolution(2 * TINY_DIT.resolution), kv_compress=KVCompress(2, (1,)))
    net = _stage_start(tmp_path / "final", nxt)
    assert net.config == nxt
    sd, ref = net.state_dict(), prev.state_dict()
    new = sorted(set(sd) - set(ref))
    assert new and all(KV_KEYS.match(k) for k in new)  # only the KV layer's merge is new
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, msg=k)
    w = sd["blocks.1.attn.sr.weight"]  # depthwise R×R conv at the average init
    torch.testing.assert_close(w, torch.full_like(w, 0.25))


def test_stage_start_refuses_weights_that_do_not_fit(tmp_path):
    save_dit(random_dit(TINY_DIT), tmp_path / "final")
    with pytest.raises(ValueError, match="does not fit the next stage"):
        _stage_start(tmp_path / "final", replace(TINY_DIT, depth=3))


def test_plateau_step_is_the_first_checkpoint_near_the_best():
    pts = [(3000, 0.20), (3100, 0.50), (3200, 0.61), (3300, 0.62), (3400, 0.60)]
    assert plateau_step(pts, 3000) == 200  # 0.61 is within 0.02 of the best 0.62
    assert plateau_step(pts, 3000, tol=0.0) == 300
    assert plateau_step([], 0) is None


def test_stage_plan_scales_batches_and_each_sigma_cache_to_what_its_stage_visits():
    plan = stage_plan(1000, alpha_batch_scale=4)
    assert [(st.name, st.steps, st.batch_size, st.images) for st in plan] == [
        ("alpha", 1000, 128, None), ("sigma_vae", 100, 32, 3200), ("sigma_resup", 100, 16, 1600),
        ("sigma_kv", 100, 16, 1600)]
    assert [st.batch_size for st in stage_plan(1000)] == [32, 32, 16, 16]
    gpu = stage_plan(1000, alpha_batch_scale=4, sigma_batch_scale=4)
    assert [(st.batch_size, st.images) for st in gpu] == [(128, None), (128, 12800), (64, 6400), (64, 6400)]
    with pytest.raises(ValueError, match="alpha_batch_scale must be an integer >= 1, got 0"):
        stage_plan(1000, alpha_batch_scale=0)
    with pytest.raises(ValueError, match="sigma_batch_scale must be an integer >= 1, got 0"):
        stage_plan(1000, sigma_batch_scale=0)


def test_stage_plan_polish_is_a_finetune_of_the_finished_sigma_on_its_own_cache():
    import yaml

    plan = stage_plan(1000, sigma_batch_scale=2, polish_steps=700, polish_images=900)
    assert len(plan) == 5 and plan[:4] == stage_plan(1000, sigma_batch_scale=2)
    polish = plan[-1]
    assert (polish.name, polish.steps, polish.batch_size, polish.images, polish.resolution, polish.pipeline) == (
        "sigma_polish", 700, 32, 900, 256, "sigma")
    assert polish.cache not in {st.cache for st in plan[:4]}  # the stages' caches hold fewer images
    cfg = yaml.safe_load((CONFIGS / polish.config).read_text())
    assert cfg["stage"]["name"] == "finetune" and cfg["stage"]["load_from"].endswith("shapes_sigma_kv")
    with pytest.raises(ValueError, match="polish_steps must be an integer >= 0"):
        stage_plan(1000, polish_steps=-1)
    with pytest.raises(ValueError, match="polish_images must be an integer >= 1, got 0"):
        stage_plan(1000, polish_steps=10, polish_images=0)
    # the band run continues the polish on the same cache, with a share of its timesteps in the band
    plan = stage_plan(1000, polish_steps=700, polish_images=900, band_steps=300)
    band = plan[-1]
    assert len(plan) == 6 and plan[:5] == stage_plan(1000, polish_steps=700, polish_images=900)
    assert (band.name, band.steps, band.cache, band.images) == ("sigma_band", 300, polish.cache, 900)
    cfg = yaml.safe_load((CONFIGS / band.config).read_text())
    assert cfg["stage"]["name"] == "finetune" and cfg["stage"]["load_from"].endswith("shapes_sigma_polish")
    assert cfg["timestep_band"] == [200, 700, 0.5]
    with pytest.raises(ValueError, match="band_steps must be an integer >= 0 \\(0: no such run\\), got -2"):
        stage_plan(1000, band_steps=-2)


def test_stage_plan_complete_run_trains_on_its_own_complete_caption_data(tmp_path):
    import yaml

    from shapes.build import make_data
    from shapes.world import Scene, parse_prompt

    base = stage_plan(1000, polish_steps=700, polish_images=900, band_steps=300)
    plan = stage_plan(1000, polish_steps=700, polish_images=900, band_steps=300, complete_steps=400)
    done = plan[-1]
    assert plan[:-1] == base and {st.short for st in base} == {"raw"}
    assert (done.name, done.steps, done.images, done.short) == ("sigma_complete", 400, 900, "complete")
    assert done.cache not in {st.cache for st in base}  # its captions differ: its own T5 features
    cfg = yaml.safe_load((CONFIGS / done.config).read_text())
    assert cfg["stage"]["name"] == "finetune" and cfg["data"]["long_caption_ratio"] == 0.2
    with pytest.raises(ValueError, match="complete_steps must be an integer >= 0"):
        stage_plan(1000, complete_steps=-1)
    raw, complete = make_data(tmp_path, 16, 0), make_data(tmp_path, 16, 0, "complete")
    assert (raw.name, complete.name) == ("data", "data_complete")
    rows = [[json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines()] for d in (raw, complete)]
    assert [r["scene"] for r in rows[0]] == [r["scene"] for r in rows[1]]  # the same images
    named = [[len(parse_prompt(r["caption"]).objects) == len(Scene.from_dict(r["scene"]).objects) for r in rs]
             for rs in rows]
    assert all(named[1]) and not all(named[0])  # raw captions leave objects out of fuller scenes


def test_assemble_pipelines_replaces_stale_parts_with_the_builds(tmp_path):
    from shapes.build import assemble_pipelines

    parts, out = tmp_path / "parts", tmp_path / "demo"
    for p in ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma"):
        (parts / p).mkdir(parents=True)
        (parts / p / "weights").write_text(f"new {p}")
    (out / "sigma" / "vae").mkdir(parents=True)
    (out / "sigma" / "vae" / "stale.safetensors").write_text("an older VAE-Σ")
    assemble_pipelines(parts, out)
    assert sorted(f.name for f in (out / "sigma" / "vae").iterdir()) == ["weights"]
    assert (out / "sigma" / "vae" / "weights").read_text() == "new vae_sigma"
    assert (out / "alpha" / "vae" / "weights").read_text() == "new vae_alpha"
    assert (out / "alpha" / "text_encoder" / "weights").read_text() == "new text_encoder"
    assert json.loads((out / "sigma" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] \
        == "v_prediction"
    assert not [p for p in out.rglob(".*")]  # no temp or old folders left behind


def test_vae_round_trip_is_the_oracle_through_the_vae(tmp_path):
    """The ceiling row: each prompt's real scene encoded and decoded (so a blurring VAE scores below 100 %)."""
    from pixsigma.sampling import from_pil
    from shapes import shapesbench
    from shapes.report import vae_round_trip_fn
    from shapes.vae import VAESpec, build_vae

    vae = build_vae(VAESpec(block_out_channels=(8, 8, 8, 8), steps=1))  # untrained: a very lossy round trip
    vae.save_pretrained(tmp_path / "vae")
    prompts = [it.prompt for it in shapesbench.bench_items(2)]
    images = vae_round_trip_fn(tmp_path / "vae", 64)(prompts, 0)
    real = shapesbench.oracle_generate_fn(64, 64)(prompts, 0)
    assert [im.size for im in images] == [(64, 64)] * 2
    with torch.no_grad():
        want = vae.decode(vae.encode(from_pil(real)).latent_dist.mode()).sample
    got = from_pil(images)
    assert (got - want.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6  # the VAE's output, 8-bit rounded
    assert (got - from_pil(real)).abs().mean() > 0.05  # and not the oracle's scene itself


def test_table_only_rescores_the_table_and_keeps_the_builds_curves(tmp_path, monkeypatch):
    from shapes import report

    with pytest.raises(ValueError, match="--table-only works on an existing report"):
        report.rescore_table(tmp_path, 4, "cmd")
    old = {"table": {"PixArt-α (128 px)": {"attribute": 0.1}}, "curves": {"alpha": {"bench": [[10, 0.1]]}},
           "plateau_steps": {"alpha": 10}, "command": "python -m shapes.build"}
    (tmp_path / "shapesbench.json").write_text(json.dumps(old))
    row = {"n": 4, "attribute": 0.5, "count": 0.5, "colour": 0.5, "shape": 0.5, "position": 0.5, "size": 0.5,
           "attribute_long": 0.5, "attribute_short": 0.5, "fsd": 1.0, "per_prompt": [{"prompt": "a red star"}]}
    monkeypatch.setattr(report, "final_table", lambda out, n: {"PixArt-Σ (256 px, KV R=2)": {**row, "n": n}})
    s = report.rescore_table(tmp_path, 4, "python -m shapes.report --table-only")
    saved = json.loads((tmp_path / "shapesbench.json").read_text())
    assert saved == s
    assert saved["curves"] == old["curves"] and saved["plateau_steps"] == old["plateau_steps"]
    assert saved["command"] == old["command"] and saved["table_command"].endswith("--table-only")
    assert list(saved["table"]) == ["PixArt-Σ (256 px, KV R=2)"] and "per_prompt" not in saved["table"][
        "PixArt-Σ (256 px, KV R=2)"]
    assert "| PixArt-Σ (256 px, KV R=2) | 50.0 |" in (tmp_path / "shapesbench.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files


def test_new_folder_swaps_in_whole_or_leaves_the_old_one(tmp_path):
    from pixsigma.io import new_folder

    final = tmp_path / "vae"
    final.mkdir()
    (final / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="half-written"):
        with new_folder(final) as tmp:
            (tmp / "new.safetensors").write_text("half")
            raise RuntimeError("half-written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # the failed temp folder is gone
    assert sorted(p.name for p in final.iterdir()) == ["old.safetensors"]  # the old folder untouched
    with new_folder(final) as tmp:
        (tmp / "new.safetensors").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.safetensors"] and final.stat().st_mode & 0o755 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_extend_appends_a_finetune_continuation_after_the_last_stage(tmp_path, monkeypatch):
    """``--extend``: more training of the last stage's model becomes one more stage on the curves' step axis."""
    from types import SimpleNamespace

    import train.checkpoint as ckpt
    from shapes import report

    out = tmp_path / "demo"
    out.mkdir()
    with pytest.raises(ValueError, match="works on an existing report"):
        report.extend_curves(out, "polish", [tmp_path / "r1"], "cmd")
    old = {"table": {}, "alpha_steps": 1000, "command": "python -m shapes.build",
           "curves": {"alpha": {"start": 0, "steps": 1000, "loss": [[1, 0.5]], "bench": [[1000, 0.2]]},
                      "sigma_kv": {"start": 1000, "steps": 100, "loss": [[1001, 0.3]],
                                   "bench": [[1000, 0.3], [1100, 0.4]]}},
           "plateau_steps": {"alpha": 0, "sigma_kv": 100}}
    (out / "shapesbench.json").write_text(json.dumps(old))
    runs = []
    for name, steps in (("r1", 60), ("r2", 200)):
        run = tmp_path / name
        for s in (steps // 2, steps):
            (run / "checkpoints" / f"step_{s:08d}").mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"stage": "finetune", "state": "finished", "total_steps": steps,
                                                     "load_report": {"source": str(tmp_path / "start")}}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, steps)))
        runs.append(run)
    net = lambda step: SimpleNamespace(config=SimpleNamespace(resolution=256), step=step)  # noqa: E731
    monkeypatch.setattr(ckpt, "checkpoint_model", lambda p: net(int(p.name[5:])))
    monkeypatch.setattr("pixsigma.weights.load_dit", lambda p: net(400) if p == tmp_path / "start" else None)
    monkeypatch.setattr(report, "_pipe", lambda folder: object())
    monkeypatch.setattr(report, "_curve_point", lambda pipe, net, res: net.step / 1000 if res == 256 else None)
    (tmp_path / "start").mkdir()  # what r1 loaded (scored 0.4 below)
    report.extend_curves(out, "polish", runs, "python -m shapes.report --extend polish r1 r2")
    saved = json.loads((out / "shapesbench.json").read_text())
    c = saved["curves"]["polish"]
    assert list(saved["curves"]) == ["alpha", "sigma_kv", "polish"] and (c["start"], c["steps"]) == (1100, 260)
    # step 0 is the first run's start weights scored now; then each run's checkpoints, offset by the runs before
    assert c["bench"] == [[1100, 0.4], [1130, 0.03], [1160, 0.06], [1260, 0.1], [1360, 0.2]]
    assert [s for s, _ in c["loss"]] == [1101, 1160, 1161, 1360]
    assert saved["plateau_steps"] == {"alpha": 1000, "sigma_kv": 100, "polish": 0}  # recomputed for all
    assert saved["plateau_fraction_of_alpha"] == {"sigma_kv": 0.1, "polish": 0.0}
    assert saved["curves"]["sigma_kv"] == old["curves"]["sigma_kv"] and c["command"].endswith("--extend polish r1 r2")
    assert (out / "curves_shapesbench.png").is_file() and (out / "curves_loss.png").is_file()
    with pytest.raises(ValueError, match="already has a stage 'polish'"):
        report.extend_curves(out, "polish", runs, "cmd")
    (tmp_path / "start").rmdir()
    with pytest.raises(ValueError, match="started from .* are gone"):
        report.extend_curves(out, "more", runs, "cmd")
    (runs[0] / "status.json").write_text(json.dumps({"stage": "res_up", "state": "finished", "total_steps": 60}))
    with pytest.raises(ValueError, match="is not a finished finetune run \\(stage 'res_up'"):
        report.extend_curves(out, "more", runs, "cmd")
    assert json.loads((out / "shapesbench.json").read_text()) == saved  # a refused extension writes nothing


def test_build_refuses_a_bad_plan_before_building_anything(tmp_path):
    from shapes.build import main

    with pytest.raises(ValueError, match="polish_steps must be an integer >= 0"):
        main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "demo"), "--polish-steps", "-1"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "demo").exists()  # no parts, data or folders


def test_build_record_round_trips_the_plan_and_refuses_what_is_not_one(tmp_path):
    plan = stage_plan(1000, sigma_batch_scale=2, polish_steps=700, polish_images=900, complete_steps=400)
    write_build_record(tmp_path, plan, "python -m shapes.build --complete-steps 400", {"alpha": 1.5})
    record = read_build_record(tmp_path)
    assert record["plan"] == plan and record["command"].endswith("--complete-steps 400")
    assert record["build_minutes"] == {"alpha": 1.5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
    with pytest.raises(ValueError, match="is not the work folder of a build"):
        read_build_record(tmp_path / "elsewhere")
    rows = plan_to_json(plan)
    with pytest.raises(ValueError, match="run 1 must be an object with the keys"):
        plan_from_json([rows[0], {**rows[1], "lr": 1e-4}])
    with pytest.raises(ValueError, match="run names must be distinct"):
        plan_from_json([rows[0], rows[1], rows[1]])
    with pytest.raises(ValueError, match="α must be the first run"):
        plan_from_json(rows[1:])
    with pytest.raises(ValueError, match="stage 'sigma_vae': steps must be an integer >= 1, got 0"):
        plan_from_json([rows[0], {**rows[1], "steps": 0}])
    with pytest.raises(ValueError, match="short must be one of raw, complete, got 'full'"):
        plan_from_json([rows[0], {**rows[1], "short": "full"}])


def test_report_rescores_the_plan_the_build_recorded_not_one_derived_from_flags(tmp_path, monkeypatch):
    """A build with a complete-caption run: the report (which has no flag for it) scores all its runs."""
    from shapes import report

    work, out = tmp_path / "work", tmp_path / "demo"
    out.mkdir()
    plan = stage_plan(100, polish_steps=30, band_steps=20, complete_steps=40)
    for st in plan:  # each run's losses; no checkpoints, so no model is loaded
        (work / "runs" / st.name).mkdir(parents=True)
        (work / "runs" / st.name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    write_build_record(work, plan, "python -m shapes.build --alpha-steps 100 --complete-steps 40", {"alpha": 2.0})
    row = {"n": 4, "attribute": 0.5, "count": 0.5, "colour": 0.5, "shape": 0.5, "position": 0.5, "size": 0.5,
           "attribute_long": 0.5, "attribute_short": 0.5, "fsd": 1.0, "per_prompt": []}
    monkeypatch.setattr(report, "final_table", lambda out, n: {"PixArt-Σ (256 px, KV R=2)": {**row, "n": n}})
    assert report.main(["--work", str(work), "--out", str(out), "--bench-n", "4"]) == 0
    saved = json.loads((out / "shapesbench.json").read_text())
    assert plan_from_json(saved["plan"]) == plan and plan[-1].name == "sigma_complete"
    assert list(saved["curves"]) == [st.name for st in plan]
    assert [(c["start"], c["steps"]) for c in saved["curves"].values()] == [
        (0, 100), (100, 10), (110, 10), (120, 10), (130, 30), (160, 20), (180, 40)]
    assert saved["curves"]["sigma_complete"]["loss"] == [[181, 0.5]]
    assert saved["command"].endswith("--complete-steps 40") and saved["build_minutes"] == {"alpha": 2.0}
    assert saved["table"]["PixArt-Σ (256 px, KV R=2)"]["n"] == 4
    # --table-only keeps the stored plan
    report.main(["--out", str(out), "--bench-n", "4", "--table-only"])
    assert json.loads((out / "shapesbench.json").read_text())["plan"] == saved["plan"]
    with pytest.raises(ValueError, match="is not the work folder of a build"):
        report.main(["--work", str(tmp_path / "nowhere"), "--out", str(out)])


def test_shipped_report_stores_the_plan_its_build_command_makes():
    """The plan key of assets/demo/shapesbench.json is the plan of its recorded build command."""
    import shlex

    shipped = json.loads((DEMO_DIR / "shapesbench.json").read_text())
    plan = plan_from_json(shipped["plan"])
    args = shlex.split(shipped["command"])
    flag = {a: int(b) for a, b in zip(args, args[1:]) if a in ("--alpha-steps", "--alpha-batch-scale")}
    assert plan == stage_plan(flag["--alpha-steps"], alpha_batch_scale=flag["--alpha-batch-scale"])
    assert [(st.name, st.steps) for st in plan] == [(k, c["steps"]) for k, c in list(shipped["curves"].items())[:4]]


def test_build_and_report_share_the_plan_module_and_never_import_each_other():
    import ast
    import subprocess
    import sys

    def imported(module: str) -> set[str]:  # every import in the file, at module or function level
        tree = ast.parse((CONFIGS.parent / (module.replace(".", "/") + ".py")).read_text())
        package = module.split(".")[:-1]

        def absolute(n: ast.ImportFrom) -> str:  # shapes/ imports its siblings relatively (docs/development.md)
            base = package[: len(package) - n.level + 1] if n.level else []
            return ".".join([*base, *([n.module] if n.module else [])])

        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {absolute(n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {f"{absolute(n)}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        return names

    for module, other in (("shapes.build", "shapes.report"), ("shapes.report", "shapes.build")):
        assert "shapes.plan" in imported(module) and other not in imported(module), module
        code = f"import sys, {module}; print({other!r} in sys.modules, 'shapes.plan' in sys.modules)"
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert ran.stdout.split() == ["False", "True"], module


def test_build_records_its_plan_then_runs_the_report_on_its_work_folder(tmp_path, monkeypatch):
    """The build hands the report its plan through the work folder's record, and runs it in its own process."""
    from shapes import build

    ran, trained = [], []
    monkeypatch.setattr(build, "_run", lambda cmd, log, threads: ran.append(cmd[1:]))
    monkeypatch.setattr("shapes.build_parts.needs_refinement", lambda folder, spec: False)
    monkeypatch.setattr(build, "assemble_pipelines", lambda parts, out: None)
    monkeypatch.setattr(build, "make_data", lambda work, n, seed, short: tmp_path / f"data_{short}")
    monkeypatch.setattr(build, "train_stage", lambda st, prev, *a: trained.append((st.name, prev and prev.name)))
    monkeypatch.setattr(build, "export", lambda work, out, plan: None)
    work, out = tmp_path / "work", tmp_path / "demo"
    args = ["--work", str(work), "--out", str(out), "--alpha-steps", "100", "--complete-steps", "40",
            "--bench-n", "8", "--precision", "no"]
    assert build.main(args) == 0
    plan = stage_plan(100, complete_steps=40)
    assert trained == [(st.name, prev.name if prev else None) for prev, st in zip([None, *plan], plan)]
    record = read_build_record(work)
    assert record["plan"] == plan and record["command"] == "python -m shapes.build " + " ".join(args)
    assert set(record["build_minutes"]) == {"parts", "data", *(st.name for st in plan)}
    assert ran[-1] == ["-m", "shapes.report", "--work", str(work), "--out", str(out), "--bench-n", "8"]
