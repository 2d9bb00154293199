"""The app's handlers and its HTTP API (gradio_client) on a tiny real pipeline."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import numpy as np
import pytest
import torch
from fixtures import FlakyPipe, app_client
from PIL import Image

from pixsigma.io import read_params
from pixsigma.pipeline import PixSigmaPipeline
from pixsigma_ui.compare_tab import difference, make_compare_fn
from pixsigma_ui.engine import ALPHA, MAIN, AppEngine
from pixsigma_ui.generate_tab import aspect_choices, make_generate_fn, parse_aspect
from pixsigma_ui.server import QUEUE_SIZE, build_demo, parse_args
from pixsigma_ui.styles import NO_STYLE, examples_for, style_by_name, styles_for


@pytest.fixture(scope="module")
def engine(pipe):
    return AppEngine({MAIN: pipe, ALPHA: pipe}, {MAIN: "tiny-sigma", ALPHA: "tiny-alpha"})


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    with app_client(engine, tmp_path_factory.mktemp("outputs")) as c:
        yield c


def run_all(gen):
    return list(gen)


def test_generate_handler_streams_previews_then_pngs_with_parameters(engine, tmp_path):
    generate = make_generate_fn(engine, tmp_path)
    with pytest.warns(UserWarning, match="plain, mint, background"):  # the tiny vocabulary lacks the style's words
        outs = run_all(generate("a red circle", style="Mint background", resolution=128, steps=5, seed=5,
                                randomize_seed=False, num_images=2))
    previews, final = outs[:-1], outs[-1]
    assert len(previews) == 4  # a preview at steps 1-4 of 5 (every step // 5 = 1), none at the last
    assert previews[0][1] == "denoising… step 1/5" and len(previews[0][0]) == 2
    paths, summary, files, seed = final
    assert seed == 5 and paths == files and len(paths) == 2
    assert "128×128 px · seed 5 · 5 steps" in summary and " s** · peak memory" in summary
    params = read_params(paths[1])
    assert params["prompt"] == "a red circle on a plain mint background" and params["user_prompt"] == "a red circle"
    assert params["seed"] == 5 and params["steps"] == 5 and params["image_index"] == 1
    assert params["style"] == "Mint background"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.rsplit("/", 1)[1] for p in paths)


def test_randomized_seeds_differ_and_are_reported(engine, tmp_path):
    generate = make_generate_fn(engine, tmp_path)
    seeds = {run_all(generate("a red circle", resolution=128, steps=1, seed=0, randomize_seed=True))[-1][3]
             for _ in range(3)}
    assert len(seeds) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(aspect_ratio="wide"), "must be 'width:height' with positive numbers, e.g. 1:1, 4:3"),
    (dict(sampler="plms"), "accepted: default, dpm-solver"),
    (dict(style="Noir"), "unknown style 'Noir'; accepted: \\(none\\), White background"),
    (dict(kv_mode="on", kv_layers="3"), "layers '3' do not exist: this model has layers 0-1"),
    (dict(kv_mode="on", kv_layers="1-x"), "bad layer range '1-x'"),
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),
    (dict(seed="abc", randomize_seed=False), "seed must be a whole number"),
    (dict(guidance=None), "guidance must be a number, got None"),
    (dict(resolution=1024), "accepted: 128, 256, 512"),
])
def test_invalid_values_become_gr_error_saying_what_is_accepted(engine, tmp_path, kwargs, message):
    generate = make_generate_fn(engine, tmp_path)
    with pytest.raises(gr.Error, match=message):
        run_all(generate("a red circle", **{"steps": 1, **kwargs}))


def test_prompt_problems_warn(engine, tmp_path):
    generate = make_generate_fn(engine, tmp_path)
    with pytest.warns(UserWarning, match="2 word\\(s\\) unknown to tiny-sigma, which it cannot draw: zebra, sofa"):
        run_all(generate("a red zebra on a sofa", resolution=128, steps=1))
    long_prompt = " ".join(["red"] * 350)  # 350 words + </s> = 351 tokens; the model reads 300
    with pytest.warns(UserWarning, match="the last 51 tokens were dropped"):
        run_all(generate(long_prompt, resolution=128, steps=1))


def test_out_of_memory_is_a_message_and_the_app_keeps_serving(pipe, tmp_path):
    engine = AppEngine({MAIN: FlakyPipe(pipe, fail=1)})
    generate = make_generate_fn(engine, tmp_path)
    with pytest.raises(gr.Error, match="out of memory .* To lower memory use: fewer images; a lower base resolution"):
        run_all(generate("a red circle", resolution=128, steps=1, num_images=2))
    assert len(run_all(generate("a red circle", resolution=128, steps=1))[-1][0]) == 1


def test_compare_handler_fills_every_panel_with_its_latency(engine):
    outs = run_all(make_compare_fn(engine)("a red circle", seed=2, steps=2, aspect_ratio="1:1", kv_ratio=2,
                                           kv_layers="1"))
    assert len(outs) == 3  # α, Σ full (= Σ: this model has no KV of its own), Σ KV
    last = outs[-1]
    alpha, sigma, slider, ab_note, full, kv, diff, kv_note, run = last
    assert run is gr.skip() or run == gr.skip()  # no run asked: its panel is left as it was
    assert alpha.label.startswith("PixArt-α (tiny-alpha) · 256×256 · ") and alpha.label.endswith(" s")
    assert sigma.label.startswith("PixArt-Σ (tiny-sigma)") and full.label.startswith("Σ full attention")
    assert sigma.value == full.value  # the same run, shown twice rather than run twice
    assert "R=2 (pool)" in kv.label and kv.value != full.value
    assert isinstance(slider, tuple) and [im.size for im in slider] == [(256, 256)] * 2
    assert isinstance(diff, Image.Image) and diff.size == (256, 256)
    assert "α " in ab_note and "full attention" in kv_note and "difference shown ×4" in kv_note


def test_a_models_prompt_expansion_is_shown_and_can_be_turned_off(pipe, tiny_pipeline, tmp_path):
    import shutil

    from pixsigma.pipeline import SamplingDefaults
    from shapes.prompts import expand_prompt

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline, folder)
    SamplingDefaults(prompt_expander="shapes").write(folder)
    expanding = AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(folder), device="cpu"), ALPHA: pipe})
    generate = make_generate_fn(expanding, tmp_path / "out")
    args = dict(resolution=128, steps=2, seed=7, randomize_seed=False)
    paths, summary, _, _ = run_all(generate("a red circle", **args))[-1]
    dense = expand_prompt("a red circle", 7)
    assert f"the model read (prompt expanded): *{dense}*" in summary
    params = read_params(paths[0])
    assert params["expanded_prompts"] == [dense] and params["user_prompt"] == "a red circle"
    paths, summary, _, _ = run_all(generate("a red circle", expand_prompt=False, **args))[-1]
    assert "prompt expanded" not in summary and "expanded_prompts" not in read_params(paths[0])
    ab_note = run_all(make_compare_fn(expanding)("a red circle", seed=7, steps=1, kv_layers="1"))[-1][3]
    assert f"*{dense}*" in ab_note  # Σ's rewrite; α (no expander) read the prompt as typed


def test_compare_without_alpha_says_how_to_get_it(pipe):
    outs = run_all(make_compare_fn(AppEngine({MAIN: pipe}))("a red circle", steps=1, kv_layers="1"))
    assert "start the app with `--alpha-model`" in outs[-1][3]


def test_difference_view():
    a = Image.new("RGB", (8, 8), (100, 100, 100))
    b = Image.new("RGB", (8, 8), (110, 90, 100))
    assert np.asarray(difference(a, b))[0, 0].tolist() == [40, 40, 0]


def test_aspect_choices_name_the_bucket_size():
    assert parse_aspect("16:9") == pytest.approx(9 / 16)
    labels = dict((v, k) for k, v in aspect_choices(1024))
    assert labels["1:1"] == "1:1  (1024×1024)" and labels["16:9"] == "16:9  (1344×768)"


def test_styles():
    assert style_by_name("Photographic", True).apply("a cat", "blurry")[0].startswith("cinematic photo of a cat")
    assert style_by_name(NO_STYLE, False).apply(" a cat ", "") == ("a cat", "")
    assert all("{prompt}" in s.template for s in styles_for(True) + styles_for(False))
    assert len(examples_for(False)) >= 3 and len(examples_for(True)) >= 3


def test_queue_is_bounded_and_one_request_per_device(engine):
    demo = build_demo(engine)
    assert demo._queue.max_size == QUEUE_SIZE
    heavy = {f.api_name: f for f in demo.fns.values() if f.api_name in ("generate", "compare")}
    assert {f.concurrency_id for f in heavy.values()} == {"device:cpu"}
    assert {f.concurrency_limit for f in heavy.values()} == {1}


def test_options_and_environment(monkeypatch):
    monkeypatch.setenv("PIXSIGMA_MODEL", "/models/sigma")
    monkeypatch.setenv("PIXSIGMA_ALPHA_MODEL", "none")
    monkeypatch.setenv("PIXSIGMA_ENABLE_TRAINING", "1")
    o = parse_args([])
    assert (o.model, o.alpha_model, o.enable_training) == ("/models/sigma", "none", True)
    o = parse_args(["--model", "demo", "--port", "7999", "--host", "0.0.0.0", "--share"])
    assert (o.model, o.port, o.host, o.share) == ("demo", 7999, "0.0.0.0", True)
    monkeypatch.delenv("PIXSIGMA_ENABLE_TRAINING")
    assert parse_args([]).enable_training is False


class Built(Exception):
    """Stops the app once its engine is loaded, before it serves."""


def test_the_app_takes_an_unset_dtype_from_default_dtype(tiny_pipeline, monkeypatch):
    from pixsigma_ui import server

    asked, engines = [], []

    def spy(device):  # bf16, not the CPU's fp32: a CPU pipeline in bf16 got its dtype from here
        asked.append(device)
        return "bf16"

    def stop(engine, **kwargs):
        engines.append(engine)
        raise Built

    monkeypatch.setattr("pixsigma.pipeline.default_dtype", spy)
    monkeypatch.setattr(server, "build_demo", stop)
    with pytest.raises(Built):  # no --dtype: the app's default
        server.main(["--model", str(tiny_pipeline), "--alpha-model", "none", "--device", "cpu"])
    assert engines[0].pipes[MAIN].dtype == torch.bfloat16 and asked == [torch.device("cpu")]


def test_pixsigma_app_hands_every_later_word_to_the_apps_own_main(monkeypatch):
    from pixsigma.cli import main
    from pixsigma_ui import server

    calls = []
    monkeypatch.setattr(server, "main", lambda argv, prog: calls.append((argv, prog)))
    assert main(["app", "--model", "demo", "--port", "7861", "--help"]) == 0
    assert calls == [(["--model", "demo", "--port", "7861", "--help"], "pixsigma app")]


# -- the HTTP API, through gradio_client --------------------------------------------------------------


def test_api_generate(client, engine):
    images, summary, files, seed = client.predict(prompt="a red circle above a blue square", resolution=128, steps=3,
                                                  seed=21, randomize_seed=False, num_images=2, expand_prompt=False,
                                                  api_name="/generate")  # expand_prompt: the API names it too
    assert seed == 21 and len(images) == 2 and len(files) == 2 and "seed 21" in summary
    params = read_params(files[0])
    assert params["prompt"] == "a red circle above a blue square" and params["steps"] == 3
    reference = engine.run(engine.make_request("a red circle above a blue square", resolution=128, steps=3, seed=21,
                                               num_images=2))
    for path, im in zip(files, reference.result.images):
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(im))


def test_api_refuses_bad_values_with_the_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="this model has layers 0-1"):
        client.predict(prompt="a red circle", steps=1, kv_mode="on", kv_layers="0-7", api_name="/generate")


def test_api_two_simultaneous_requests_get_the_images_their_seeds_define(client, engine):
    seeds = (101, 202)

    def call(seed):
        return client.predict(prompt="a green star", resolution=128, steps=3, seed=seed, randomize_seed=False,
                              api_name="/generate")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(call, seeds))
    got = [np.asarray(Image.open(r[2][0]).convert("RGB")) for r in results]
    assert [r[3] for r in results] == list(seeds)
    for seed, image in zip(seeds, got):
        ref = engine.run(engine.make_request("a green star", resolution=128, steps=3, seed=seed)).result.images[0]
        np.testing.assert_array_equal(image, np.asarray(ref))
    assert not np.array_equal(got[0], got[1])


def test_api_compare(client):
    out = client.predict(prompt="a red circle", seed=1, steps=2, kv_layers="1", api_name="/compare")
    alpha, sigma, slider, ab_note, full, kv, diff, kv_note, run = out  # run: the model= panel (none asked)
    panels = (alpha, sigma, full, kv)  # updates carrying the image and a label with its latency
    assert all(p["label"].endswith(" s") for p in panels)
    assert all(Image.open(p).size == (256, 256) for p in (*(p["value"] for p in panels), diff, *slider))
    assert "Σ" in ab_note and "KV compression" in kv_note
