"""A finished training run as a model of Generate and Compare: listed, loaded per request, served by the API.

One tiny real run (2 steps of ``finetune`` from the tiny pipeline, by the real trainer) is made per module.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures import app_client, make_images, write_config
from PIL import Image

from pixsigma.pipeline import PixSigmaPipeline
from pixsigma_ui.compare_tab import make_compare_fn
from pixsigma_ui.engine import ALPHA, MAIN, AppEngine
from pixsigma_ui.generate_tab import make_generate_fn
from pixsigma_ui.model_picker import check_model, model_choices
from pixsigma_ui.run_models import RunModels, attach_runs, finished_runs


@pytest.fixture(scope="module")
def runs_dir(tiny_pipeline, tmp_path_factory):
    """runs/ft-tiny: finished (final/), runs/chain/kv: finished one level deeper, runs/going: no final/ yet."""
    from train.config import load_config
    from train.loop import train

    root = tmp_path_factory.mktemp("lab_runs")
    data = make_images(root / "data")
    runs = root / "runs"
    cfg = write_config(root / "ft.yaml", output_dir=str(runs / "ft-tiny"), stage={"name": "finetune",
                       "load_from": str(tiny_pipeline / "transformer")},
                       data={"source": str(data), "text_encoder": str(tiny_pipeline), "vae": str(tiny_pipeline)})
    assert train(load_config(cfg))["state"] == "finished"
    shutil.copytree(runs / "ft-tiny", runs / "chain" / "kv")  # a chain keeps its stages in a folder of their own
    (runs / "going" / "final").mkdir(parents=True)  # being exported: no pixsigma.json yet
    (runs / "going" / "status.json").write_text(json.dumps({"state": "running", "step": 1}))
    return runs


@pytest.fixture(scope="module")
def engine(pipe, runs_dir):
    e = AppEngine({MAIN: pipe, ALPHA: pipe}, {MAIN: "tiny-sigma", ALPHA: "tiny-alpha"})
    attach_runs(e, runs_dir)
    return e


def direct(tiny_pipeline, runs_dir, name, request):
    """The run's image made without the app: its final/ loaded over the pipeline folder it trained with."""
    pipe = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), transformer=str(runs_dir / name / "final"),
                                            device="cpu")
    return np.asarray(pipe.generate(request).images[0])


def test_finished_runs_are_model_choices_newest_first(engine, runs_dir):
    found = finished_runs(runs_dir)
    assert sorted(r.name for r in found) == ["chain/kv", "ft-tiny"]  # "going" has no complete final/
    run = next(r for r in found if r.name == "ft-tiny")
    assert (run.key, run.stage, run.step) == ("run:ft-tiny", "finetune", 2)
    choices = model_choices(engine)
    assert choices[:2] == [("PixArt-Σ: tiny-sigma", MAIN), ("PixArt-α: tiny-alpha", ALPHA)]
    assert ("your run: ft-tiny (finetune, step 2)", "run:ft-tiny") in choices
    assert {v for _, v in choices[2:]} == {"run:ft-tiny", "run:chain/kv"}


@pytest.mark.parametrize("model, message", [
    ("run:going", "model 'run:going' is not a finished run under "),
    ("run:../../etc", "model 'run:../../etc' is not a finished run"),
    ("beta", "model 'beta' is not offered; accepted: main, alpha, run:"),
])
def test_a_model_that_is_not_offered_is_refused_naming_the_choices(engine, model, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        check_model(engine, model)


def test_generate_with_a_run_equals_its_pipeline_loaded_directly(engine, tiny_pipeline, runs_dir, tmp_path):
    gen = make_generate_fn(engine, tmp_path)
    *_, (paths, summary, _, seed) = list(gen("a red square", steps=3, seed=4, randomize_seed=False,
                                              model="run:ft-tiny"))
    request = engine.make_request("a red square", steps=3, seed=4, model="run:ft-tiny")
    got = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert np.array_equal(got, direct(tiny_pipeline, runs_dir, "ft-tiny", request))
    *_, (main_paths, *_rest) = list(gen("a red square", steps=3, seed=4, randomize_seed=False))
    main = np.asarray(Image.open(main_paths[0]).convert("RGB"))
    assert not np.array_equal(main, got)  # the shipped Σ was not swapped for the run, nor the run for Σ
    assert engine.pipes[MAIN] is not engine.pipes["run:ft-tiny"]


def test_run_pipelines_are_cached_least_recently_used_first(tiny_pipeline, runs_dir):
    loads = []

    def load(*args, **kwargs):
        loads.append(kwargs["transformer"])
        return PixSigmaPipeline.from_pretrained(*args, **kwargs)

    models = RunModels(runs_dir, str(tiny_pipeline), keep=1, load=load)
    e = AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")})
    e.runs = models
    e.info("run:ft-tiny")
    e.info("run:ft-tiny")
    assert len(loads) == 1 and "run:ft-tiny" in e.pipes
    e.info("run:chain/kv")  # keep=1: ft-tiny is dropped from the engine too
    assert models.loaded() == ["run:chain/kv"] and "run:ft-tiny" not in e.pipes and MAIN in e.pipes
    e.info("run:ft-tiny")
    assert len(loads) == 3 and loads[-1].endswith("ft-tiny/final")


def test_compare_shows_sigma_the_run_and_alpha(engine, tiny_pipeline, runs_dir):
    outs = list(make_compare_fn(engine)("a red square", seed=3, steps=2, kv_layers="1", model="run:chain/kv"))
    last = outs[-1]
    assert len(last) == 9
    run_panel = last[8]
    assert run_panel.label.startswith("your run: chain/kv (finetune, step 2) · ")
    request = engine.make_request("a red square", steps=2, seed=3, model="run:chain/kv")
    assert np.array_equal(np.asarray(Image.open(run_panel.value["path"]).convert("RGB")),
                          direct(tiny_pipeline, runs_dir, "chain/kv", request))
    assert len(list(make_compare_fn(engine)("a red square", steps=1, kv_layers="1"))[-1]) == 9  # no run: skipped
    with pytest.raises(Exception, match="Compare's model is a finished run"):
        list(make_compare_fn(engine)("a red square", steps=1, kv_layers="1", model="alpha"))


def test_api_lists_runs_and_generates_with_one(engine, tiny_pipeline, runs_dir, tmp_path):
    with app_client(engine, tmp_path) as client:
        listed = client.predict(api_name="/runs")
        assert {r["model"] for r in listed} == {"run:ft-tiny", "run:chain/kv"}
        assert {r["stage"] for r in listed} == {"finetune"} and all(r["step"] == 2 for r in listed)
        _, info, files, seed = client.predict(prompt="a blue circle", steps=2, seed=9, randomize_seed=False,
                                              model="run:ft-tiny", api_name="/generate")
        assert seed == 9 and "2 steps" in info
        got = np.asarray(Image.open(files[0]).convert("RGB"))
        request = engine.make_request("a blue circle", steps=2, seed=9, model="run:ft-tiny")
        assert np.array_equal(got, direct(tiny_pipeline, runs_dir, "ft-tiny", request))
        out = client.predict(prompt="a blue circle", seed=9, steps=2, kv_layers="1", model="run:ft-tiny",
                             api_name="/compare")
        assert len(out) == 9 and out[8]["label"].startswith("your run: ft-tiny")
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="is not a finished run"):
            client.predict(prompt="a blue circle", steps=2, model="run:nope", api_name="/generate")

