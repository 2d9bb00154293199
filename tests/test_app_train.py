"""The Train tab's run manager: detached trainer processes coupled only through the run-folder files.

A stand-in trainer module (written here, same CLI and file protocol as ``python -m train``)
keeps these tests to seconds; the browser test drives the real trainer where its configs exist.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gradio as gr
import pytest
from fixtures import fake_manager, wait_for
from PIL import Image

from pixsigma.pipeline import PixSigmaPipeline
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.server import build_demo
from pixsigma_ui.train_tab import Recipe, RunManager, find_recipes, log_tail, read_metrics
from pixsigma_ui.uploads import UploadLimits, Uploads


@pytest.fixture
def manager(tmp_path, monkeypatch):
    m = fake_manager(tmp_path, monkeypatch)
    yield m
    for child in m._children.values():  # never leave a trainer behind
        child.kill()
        child.wait()


def test_start_returns_at_once_and_the_run_reports_through_its_files(manager):
    name = manager.start("finetune", steps=5, lr=3e-4, batch=2)
    assert name.startswith("finetune-") and manager.runs() == [name]
    s = wait_for(manager, name, lambda s: s["state"] == "finished" and not s["alive"])
    assert (s["step"], s["total_steps"]) == (5, 5)
    folder = manager.folder(name)
    metrics = read_metrics(folder)
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5] and metrics["loss"].iloc[-1] == pytest.approx(0.2)
    launch = json.loads((folder / "launch.json").read_text())
    assert launch["cmd"][1:4] == ["-m", "fake_trainer", str(manager.recipes["finetune"][0].config)]
    assert {"steps=5", "optim.lr=0.0003", "batch_size=2", f"output_dir={folder}"} <= set(launch["cmd"])
    assert "[train] argv" in log_tail(folder)


def test_stop_checkpoints_and_resume_continues(manager, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0.05")
    name = manager.start("kv_compress", steps=400)
    wait_for(manager, name, lambda s: s.get("step", 0) >= 2)
    manager.stop(name)
    stopped = wait_for(manager, name, lambda s: s["state"] == "stopped" and not s["alive"])
    assert 2 <= stopped["step"] < 400
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0")
    manager.resume(name)
    wait_for(manager, name, lambda s: s["state"] == "finished")
    steps = read_metrics(manager.folder(name))["step"].tolist()
    assert steps == list(range(1, 401))  # continued where the checkpoint was, no step twice
    assert "--resume" in log_tail(manager.folder(name), lines=400)


def test_one_live_run_at_a_time(manager, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0.05")
    first = manager.start("finetune", steps=400)
    wait_for(manager, first, lambda s: s["alive"])
    with pytest.raises(ValueError, match=f"run {first} is still going: stop it first"):
        manager.start("res_up", steps=5)
    with pytest.raises(ValueError, match="is still running"):
        manager.resume(first)
    manager.stop(first)
    wait_for(manager, first, lambda s: not s["alive"])
    with pytest.raises(ValueError, match="is not running"):
        manager.stop(first)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage="from_nothing"), "stage must be one of vae_adapt, res_up, kv_compress, finetune"),
    (dict(steps=0), "steps must be an integer from 1 to 100000"),
    (dict(batch=1000), "batch size must be an integer from 1 to 256"),
    (dict(lr=5.0), "learning rate must be a number in \\(0, 1\\]"),
    (dict(data="/no/such/folder"), "data '/no/such/folder' is not a folder this app reads"),
    (dict(data="no/such/folder"), "data 'no/such/folder' does not exist"),  # under the runs folder
])
def test_bad_values_are_refused(manager, kwargs, message):
    with pytest.raises(ValueError, match=message):
        manager.start(**{"stage": "finetune", **kwargs})
    assert manager.runs() == []


def test_runs_started_in_the_same_second_get_their_own_folders(manager, monkeypatch):
    import pixsigma_ui.train_tab

    monkeypatch.setattr(pixsigma_ui.train_tab.time, "strftime", lambda fmt, *t: "20260101-120000")  # one second
    first = manager.start("finetune", steps=1)
    wait_for(manager, first, lambda s: not s["alive"] and s["state"] == "finished")
    second = manager.start("finetune", steps=1)
    assert (first, second) == ("finetune-20260101-120000", "finetune-20260101-120000-2")
    assert set(manager.runs()) == {first, second}
    wait_for(manager, second, lambda s: not s["alive"] and s["state"] == "finished")


def test_missing_stage_config_is_named(tmp_path):
    m = RunManager(tmp_path / "runs", {"finetune": [Recipe(tmp_path / "f.yaml")]})
    with pytest.raises(ValueError, match="no config for stage 'res_up'; configs found: finetune: f.yaml"):
        m.start("res_up")
    with pytest.raises(ValueError, match="no config 'g.yaml' for stage finetune; accepted: f.yaml"):
        m.start("finetune", "g.yaml")


def test_a_reloaded_app_finds_runs_and_sees_dead_ones(manager, tmp_path):
    name = manager.start("finetune", steps=3)
    wait_for(manager, name, lambda s: s["state"] == "finished")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = manager.runs_dir / "finetune-crashed"
    crashed.mkdir()
    (crashed / "status.json").write_text(json.dumps({"state": "running", "step": 7, "total_steps": 9,
                                                     "pid": dead.pid}))
    again = RunManager(manager.runs_dir, manager.recipes, module="fake_trainer", precheck=False)  # a restarted app
    assert set(again.runs()) == {name, "finetune-crashed"}
    assert again.state(name)["state"] == "finished"
    assert again.state("finetune-crashed")["state"] == "died" and again.state("finetune-crashed")["step"] == 7
    with pytest.raises(ValueError, match="was not started from this app"):
        again.resume("finetune-crashed")
    with pytest.raises(ValueError, match="no run '../etc'"):
        again.folder("../etc")


def test_log_tail_shows_a_progress_bar_as_a_terminal_would(tmp_path):
    (tmp_path / "stdout.txt").write_text("loading\nstep 1\rstep 2\rstep 3\n[train] finished\n")
    assert log_tail(tmp_path) == "loading\nstep 3\n[train] finished"


def test_recipes_come_from_the_stage_each_config_names(tmp_path):
    (tmp_path / "_shapes_base.yaml").write_text("data: {source: data/shapes}\n")
    (tmp_path / "_xl_base.yaml").write_text("stage: {name: res_up}\n")
    (tmp_path / "shapes_sigma_kv.yaml").write_text("base: _shapes_base.yaml\nstage: {name: kv_compress}\n")
    (tmp_path / "xl_2k.yaml").write_text("base: _xl_base.yaml\nsteps: 10\n")  # its stage comes from its base
    (tmp_path / "shapes_resup.yml").write_text("stage: res_up\n")
    (tmp_path / "broken.yaml").write_text("stage: [\n")
    (tmp_path / "notes.txt").write_text("stage: finetune\n")
    found = find_recipes([tmp_path, tmp_path / "missing"], "/models/sigma", "demo")
    assert {k: [r.title for r in v] for k, v in found.items()} == {
        "res_up": ["shapes_resup.yml", "xl_2k.yaml"],  # shapes-world recipes first
        "kv_compress": ["shapes_sigma_kv.yaml"],
        "finetune": ["fine-tune demo on the shapes world"]}
    assert found["finetune"][0] == Recipe(tmp_path / "_shapes_base.yaml",
                                          ("stage.name=finetune", "stage.load_from=/models/sigma"),
                                          "fine-tune demo on the shapes world")
    assert "finetune" not in find_recipes([tmp_path])  # no model to fine-tune


def test_a_recipe_launches_with_its_overrides_and_user_data_replaces_the_cache(manager, tmp_path):
    manager.recipes["finetune"] = [Recipe(manager.recipes["finetune"][0].config, ("stage.load_from=/m",), "ft")]
    data = tmp_path / "my_images"
    data.mkdir()
    manager.uploads = Uploads(manager.runs_dir, UploadLimits(data_roots=(tmp_path,)))  # --data-root TMP
    name = manager.start("finetune", "ft", data=str(data), steps=1)
    cmd = json.loads((manager.folder(name) / "launch.json").read_text())["cmd"]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets[0] == "stage.load_from=/m" and f"data.source={data}" in sets and "data.cache=" in sets
    wait_for(manager, name, lambda s: not s["alive"])


def test_the_train_tab_exists_only_when_enabled(tiny_pipeline, tmp_path):
    engine = AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")})

    def tabs(demo):
        return [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]

    assert tabs(build_demo(engine)) == ["Generate", "Compare"]
    assert tabs(build_demo(engine, runs=RunManager(tmp_path, {}))) == ["Generate", "Compare", "Train"]


def test_samples_are_read_from_status(manager):
    from pixsigma_ui.train_tab import samples_of

    name = manager.start("finetune", steps=2)
    s = wait_for(manager, name, lambda s: s["state"] == "finished")
    folder = manager.folder(name)
    assert samples_of(folder, s) == []  # listed but not written yet: not shown
    Image.new("RGB", (4, 4)).save(folder / "samples" / "latest.png")
    assert samples_of(folder, s) == [str(folder / "samples" / "latest.png")]


def test_loss_plot_axes_are_numeric_even_before_the_first_step(tmp_path):
    from pixsigma_ui.train_tab import metrics_frame

    plot = gr.LinePlot(x="step", y="loss")
    assert plot.postprocess(metrics_frame([])).datatypes == {"step": "quantitative", "loss": "quantitative"}
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # caught mid-write
    assert plot.postprocess(read_metrics(tmp_path)).data == [[1, 0.5]]
