"""The Train tab's lab: the chain's stages as the page draws them, read from files alone, and Start refusals.

The run folders are written here as the chain and the trainer write them (``train.runfiles`` names); the real
chain runs in ``test_chain.py`` and the real tab in ``tests/browser/test_lab_browser.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pixsigma_ui.lab_state import lab_view
from pixsigma_ui.lab_tab import chain_line, stage_text
from pixsigma_ui.train_tab import STAGES, RunManager, find_recipes
from train.chain import CHAIN_PLAN, CHAIN_RUN, chain_status

REPO = Path(__file__).resolve().parents[1]
SCORE = {"attribute": 0.4125, "count": 0.5, "colour": 0.625, "shape": 0.25, "position": 0.375, "n": 48}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.fixture
def runs(tmp_path):
    """runs/lab: a quick chain at its VAE stage (α shipped and scored); runs/ft-old: a finetune run that died."""
    runs, lab = tmp_path / "runs", tmp_path / "runs" / "lab"
    write(lab / CHAIN_PLAN, {"preset": "quick", "start_from": "shipped", "stages": [
        {"name": n, "config": c, "steps": s, "resolution": r} for n, c, s, r in (
            ("alpha", "shapes_alpha.yaml", 300, 128), ("sigma_vae", "shapes_sigma_vae.yaml", 100, 128),
            ("sigma_resup", "shapes_sigma_resup.yaml", 60, 256), ("sigma_kv", "shapes_sigma_kv.yaml", 60, 256))]})
    write(lab / CHAIN_RUN, {"pid": os.getpid(), "preset": "quick", "start_from": "shipped", "state": "running",
                            "current": "sigma_vae", "started": time.time()})
    write(lab / "alpha" / "bench.json", {"source": "shipped", "stage": "from_scratch", "final": SCORE, "start": SCORE})
    vae = lab / "sigma_vae"
    write(vae / "bench.json", {"stage": "vae_adapt", "start": {**SCORE, "attribute": 0.1}})
    write(vae / "status.json", {"state": "running", "step": 30, "total_steps": 100, "last_loss": 0.25,
                                "stage": "vae_adapt", "pid": os.getpid(), "samples": [], "updated": time.time()})
    write(vae / "metrics.jsonl", "".join(json.dumps({"step": i, "loss": 1 / i, "steps_per_s": 2.0}) + "\n"
                                         for i in range(1, 31)))
    old = runs / "ft-old"
    write(old / "status.json", {"state": "running", "step": 4, "total_steps": 50, "stage": "finetune",
                                "pid": 2 ** 22 + 17, "error": None, "updated": time.time() - 60})  # no such process
    write(old / "launch.json", {"cmd": ["python", "-m", "train.prepare", "x.yaml"], "stage": "finetune"})
    return runs


def test_the_stages_are_drawn_from_the_files(runs):
    view = lab_view(runs)
    alpha, vae, resup, kv, ft = view.stages
    assert [s.title for s in view.stages] == ["α", "VAE", "res-up", "KV", "finetune"]
    assert alpha.state == "shipped" and "ShapesBench **0.412** (count 0.50 · colour 0.62" in stage_text(alpha)
    text = stage_text(vae)
    assert "**running** · step 30/100 · 2 steps/s · ETA 35s" in text and "loss 0.2500" in text
    assert "run `lab/sigma_vae`" in text and "ShapesBench **0.100**" in text  # its start, scored before training
    assert resup.state == kv.state == "not started" and "ShapesBench —" in stage_text(kv)
    assert ft.state == "died" and "run `ft-old`" in stage_text(ft)  # its trainer is gone: no "running" forever


def test_a_stage_is_preparing_while_the_chain_makes_its_inputs(runs):
    lab = runs / "lab"
    write(lab / CHAIN_RUN, {"pid": os.getpid(), "preset": "quick", "start_from": "shipped", "state": "running",
                            "current": "sigma_resup"})
    write(lab / "sigma_resup" / "prepare.json", {"phase": "features", "done": 40, "total": 128, "rate": 5.0,
                                                 "eta_s": 17.6, "message": "features: 40/128"})
    resup = lab_view(runs).stages[2]
    assert resup.state == "preparing" and resup.run.progress == "features · 40/128 · 5 images/s · ETA 18s"


def test_the_chain_header_and_a_second_reader_agree(runs):
    line = chain_line(chain_status(runs / "lab"))
    assert line.startswith("**Chain** (quick, α shipped): **running** · stage sigma_vae")
    assert chain_line(chain_status(runs / "none")).startswith("No chain yet")
    assert lab_view(runs) == lab_view(runs)  # nothing held in memory: any process reads the same


@pytest.fixture
def manager(runs, monkeypatch):
    m = RunManager(runs, find_recipes([REPO / "configs"], str(REPO / "assets" / "demo" / "sigma"), "demo"))
    spawned = []
    monkeypatch.setattr(m, "_spawn", lambda name, cmd, held=(): spawned.append((name, cmd)))
    m.spawned = spawned
    return m


def test_no_stage_starts_while_the_chain_runs(manager):
    with pytest.raises(ValueError, match="the chain is still going: stop it first"):
        manager.start("finetune")


@pytest.mark.parametrize("stage", STAGES)
def test_every_default_selection_starts_on_a_fresh_clone(manager, stage):
    """The form's defaults for each stage resolve (train.prepare.check_stage) with nothing made yet."""
    (manager.runs_dir / "lab" / CHAIN_RUN).unlink()
    name = manager.start(stage, steps=50, batch=4)
    assert manager.spawned[-1][1][1:3] == ["-m", "train.prepare"]
    assert (manager.runs_dir / name / "launch.json").is_file()
    assert not (manager.runs_dir / "data").exists()  # checked only: the run makes its inputs itself


@pytest.mark.parametrize("kwargs, message", [
    ({"data": "/no/such/folder"}, "data '/no/such/folder' is not a folder this app reads"),
    ({"data": "no/such/folder"}, "data 'no/such/folder' does not exist"),  # under the runs folder
    ({"images": 0}, "images must be an integer from 1 to 100000, got 0"),
])
def test_what_cannot_be_made_is_refused_at_start_with_no_folder(manager, kwargs, message):
    (manager.runs_dir / "lab" / CHAIN_RUN).unlink()
    before = sorted(p.name for p in manager.runs_dir.iterdir())
    with pytest.raises(ValueError, match=message):
        manager.start("finetune", **kwargs)
    assert sorted(p.name for p in manager.runs_dir.iterdir()) == before and not manager.spawned


def test_a_config_whose_start_is_missing_is_refused_naming_it(manager, tmp_path):
    from pixsigma_ui.train_tab import Recipe

    (manager.runs_dir / "lab" / CHAIN_RUN).unlink()
    manager.recipes["finetune"] = [Recipe(REPO / "configs" / "_shapes_base.yaml",
                                          ("stage.name=finetune", f"stage.load_from={tmp_path / 'gone'}"), "x")]
    with pytest.raises(ValueError, match=f"stage.load_from {tmp_path / 'gone'} does not exist"):
        manager.start("finetune")
    assert not manager.spawned


def test_a_stage_box_names_its_plan_step():
    from pixsigma_ui.lab_tab import plan_name

    assert [plan_name("quick", "shipped", s) for s in ("from_scratch", "vae_adapt", "res_up", "kv_compress")] == [
        "alpha", "sigma_vae", "sigma_resup", "sigma_kv"]
    with pytest.raises(ValueError, match="the quick chain has no finetune stage; its stages: alpha, sigma_vae"):
        plan_name("quick", "shipped", "finetune")


def test_start_stage_runs_the_chain_up_to_that_stage_only(tmp_path):
    """A box's Start: the chain until that stage (earlier ones first), the later boxes still not started."""
    from train.chain import run_chain

    lab = tmp_path / "runs" / "lab"
    with pytest.raises(ValueError, match="until must be one of the plan's stages alpha, sigma_vae, sigma_resup, "
                                         "sigma_kv, got 'polish'"):
        run_chain("tiny", lab, "shipped", until="polish")
    summary = run_chain("tiny", lab, "shipped", until="sigma_vae")
    assert [s["name"] for s in summary["stages"]] == ["alpha", "sigma_vae"]
    states = [s.state for s in lab_view(tmp_path / "runs").stages]
    assert states == ["shipped", "finished", "not started", "not started", "not started"]
    assert [s["state"] for s in chain_status(lab)["stages"]] == ["done", "done", "pending", "pending"]


def _zip(path: Path, captioned: bool) -> Path:
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(path, "w") as z:
        for i in range(2):
            png = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(png, "PNG")
            z.writestr(f"set/{i}.png", png.getvalue())
            if captioned:
                z.writestr(f"set/{i}.txt", f"a blue square number {i}")
        if captioned:  # an unreadable image is skipped and counted, never fatal
            z.writestr("set/broken.png", b"not a png")
            z.writestr("set/broken.txt", "a broken image")
    return path


def test_an_uploaded_zip_is_unpacked_under_the_runs_folder_and_checked(tiny_pipeline, tmp_path):
    import gradio as gr

    from pixsigma.pipeline import PixSigmaPipeline
    from pixsigma_ui.engine import MAIN, AppEngine
    from pixsigma_ui.server import build_demo

    runs = tmp_path / "runs"
    demo = build_demo(AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")}),
                      outputs=tmp_path / "out", runs=RunManager(runs, {}))
    demo.sweeper.stop()
    on_upload = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_upload")

    def upload(path):
        return on_upload(path, gr.Request(session_hash="s"))  # one unpack at a time per session

    folder = Path(upload(str(_zip(tmp_path / "mine.zip", captioned=True))))
    assert folder.parent == runs / "uploads" and sorted(p.name for p in folder.rglob("*.txt")) == \
        ["0.txt", "1.txt", "broken.txt"]
    with pytest.raises(gr.Error, match=r"no captions found \(2 images, none with a caption\)"):
        upload(str(_zip(tmp_path / "bare.zip", captioned=False)))
