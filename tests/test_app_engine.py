"""AppEngine: limits, request validation, streaming, per-device locking, OOM recovery (tiny real pipeline)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fixtures import FlakyPipe

from pixsigma.config import PRESETS, KVCompress, parse_layers
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma_ui.engine import (
    ALPHA,
    MAIN,
    AppEngine,
    Done,
    Limits,
    OutOfMemory,
    Step,
    layers_spec,
    offered_resolutions,
)


@pytest.fixture(scope="module")
def engine(pipe):
    return AppEngine({MAIN: pipe}, {MAIN: "tiny"})


def pixels(done: Done) -> list[np.ndarray]:
    return [np.asarray(im) for im in done.result.images]


def test_limits_follow_the_device():
    cpu = Limits.for_device("cpu", native_resolution=256)
    assert (cpu.max_steps, cpu.max_images, cpu.max_resolution) == (30, 2, 512)
    assert Limits.for_device("cpu", native_resolution=1024).max_resolution == 1024  # a model's own size stays usable
    small = Limits.for_device("cuda", 8 * 2**30)
    big = Limits.for_device("cuda", 80 * 2**30)
    assert small.max_resolution == 1024 and big.max_resolution == 4096
    assert big.max_pixels == 4096 * 4096 and big.max_images == 4
    with pytest.raises(ValueError, match="max_images must be at most 4"):
        Limits(max_steps=10, max_images=8, max_resolution=512, max_pixels=10**6)


def test_offered_resolutions_reach_4k_only_for_xl():
    assert offered_resolutions(PRESETS["XL_2_1024"], 4096) == (256, 512, 1024, 2048, 4096)
    assert offered_resolutions(PRESETS["XL_2_1024"], 2048) == (256, 512, 1024, 2048)
    assert offered_resolutions(PRESETS["demo"], 4096) == (64, 128, 256)  # demo: 128 px native
    assert offered_resolutions(PRESETS["XL_2_2K"], 1024) == (512, 1024, 2048)  # native kept above the cap


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=31), "steps must be an integer from 1 to 30"),
    (dict(num_images=3), "number of images must be from 1 to 2"),
    (dict(sampler="plms"), "accepted: default, dpm-solver, sa-solver, ddim, euler"),
    (dict(resolution=300), "accepted: 128, 256, 512"),
    (dict(guidance=25.0), "guidance must be a number from 0 to 20"),
    (dict(seed=-1), "seed must be an integer from 0 to 4294967295"),
    (dict(aspect_ratio=9.0), "aspect ratio"),
    (dict(prompt="   "), "the prompt is empty"),
    (dict(prompt="x" * 20_000), "at most 10000 are accepted"),
])
def test_bad_requests_are_refused_saying_what_is_accepted(engine, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.make_request(kwargs.pop("prompt"), **kwargs)


def test_pixel_budget_bounds_images_times_size(pipe):
    engine = AppEngine({MAIN: pipe}, limits=Limits(max_steps=30, max_images=4, max_resolution=512,
                                                   max_pixels=512 * 512))
    assert engine.make_request("a red circle", num_images=1, resolution=512).width == 512
    with pytest.raises(ValueError, match="2 image\\(s\\) of 512×512 px exceed this device's limit of 0.3 megapixels"):
        engine.make_request("a red circle", num_images=2, resolution=512)


def test_kv_settings(engine):
    assert engine.kv_setting("model") is None
    assert engine.kv_setting("off") == KVCompress()
    assert engine.kv_setting("on", 2, (1,), "pool") == KVCompress(2, (1,), "pool")
    with pytest.raises(ValueError, match="this model has layers 0-1"):
        engine.kv_setting("on", 2, (5,))
    with pytest.raises(ValueError, match="needs layers, e.g. '1-1'"):
        engine.kv_setting("on", 2, ())
    with pytest.raises(ValueError, match="'model', 'off' or 'on'"):
        engine.kv_setting("half")
    assert engine.info().suggested_kv == KVCompress(2, (1,), "pool")


def test_layers_spec_round_trips():
    for layers in [(14, 15, 16, 27), (0,), (), (0, 1, 2, 5, 7, 8)]:
        assert parse_layers(layers_spec(layers)) == layers
    assert layers_spec(tuple(range(14, 28))) == "14-27"


def test_aspect_ratio_snaps_to_the_bucket(engine):
    wide = engine.make_request("a red circle", aspect_ratio=9 / 16, resolution=256)
    assert (wide.height, wide.width) == (192, 336)  # the 256 table's 0.57 bucket: 1024's 768x1344 quartered
    square = engine.make_request("a red circle", resolution=128)
    assert (square.width, square.height) == (128, 128)


def test_requests_default_to_the_model_folders_sampling(engine, tiny_pipeline, tmp_path):
    import shutil

    from pixsigma.pipeline import SamplingDefaults

    info = engine.info(MAIN)
    assert (info.steps, info.guidance) == (20, 4.5)  # a folder without sampling.json: PixArt's
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline, folder)
    SamplingDefaults(steps=3, guidance=2.0, prompt_expander="shapes").write(folder)
    own = AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(folder), device="cpu")})
    assert (own.info(MAIN).steps, own.info(MAIN).guidance) == (3, 2.0)
    assert own.info(MAIN).prompt_expander == "shapes" and info.prompt_expander is None
    req = own.make_request("a red circle", resolution=128)
    assert (req.steps, req.guidance, req.expand_prompt) == (3, 2.0, True)
    assert own.make_request("a red circle", resolution=128, steps=5, guidance=1.0).steps == 5
    assert own.make_request("a red circle", resolution=128, expand_prompt=False).expand_prompt is False
    with pytest.raises(ValueError, match="expand_prompt must be true or false"):
        own.make_request("a red circle", resolution=128, expand_prompt="no")


def test_stream_gives_every_step_previews_then_the_pipeline_result(engine, pipe):
    request = engine.make_request("a red circle above a blue square", steps=4, seed=3, num_images=2, resolution=128)
    events = list(engine.stream(request, preview_every=2))
    steps, done = events[:-1], events[-1]
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(isinstance(e, Step) for e in steps)
    assert [e.previews is not None for e in steps] == [False, True, False, False]  # the last step shows the image
    assert len(steps[1].previews) == 2
    assert isinstance(done, Done) and done.result.seed == 3 and len(done.result.images) == 2
    assert done.result.images[0].size == (128, 128)
    assert done.memory_kind == "process RSS" and done.peak_memory_bytes > 0
    direct = pipe.generate(GenerationRequest("a red circle above a blue square", width=128, height=128, steps=4,
                                             seed=3, num_images=2))
    for a, b in zip(pixels(done), [np.asarray(im) for im in direct.images]):
        np.testing.assert_array_equal(a, b)


def test_simultaneous_requests_each_get_their_own_images(pipe):
    engine = AppEngine({MAIN: pipe, ALPHA: pipe})  # both on the CPU: one lock
    assert engine.concurrency == 1
    jobs = {"off": engine.make_request("a red circle", steps=3, seed=11, resolution=128, kv=KVCompress()),
            "kv": engine.make_request("a blue square", steps=3, seed=12, resolution=128,
                                      kv=KVCompress(2, (0, 1), "conv"))}
    reference = {k: pixels(engine.run(r)) for k, r in jobs.items()}
    assert not np.array_equal(reference["off"][0], reference["kv"][0])
    results, barrier = {}, threading.Barrier(2)

    def worker(key):
        barrier.wait()
        results[key] = pixels(engine.run(jobs[key], MAIN if key == "off" else ALPHA))

    threads = [threading.Thread(target=worker, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for key in jobs:
        np.testing.assert_array_equal(results[key][0], reference[key][0])


def test_out_of_memory_names_the_savers_and_the_engine_keeps_serving(pipe):
    flaky = FlakyPipe(pipe, fail=1)
    engine = AppEngine({MAIN: flaky})
    request = engine.make_request("a red circle", steps=2, seed=1, num_images=2, resolution=128)
    with pytest.raises(OutOfMemory) as info:
        engine.run(request)
    message = str(info.value)
    assert "fewer images" in message and "KV compression" in message and "lower base resolution" in message
    assert "2 image(s) of 128×128" in message
    done = engine.run(request)  # the lock was released and the next request works
    assert len(done.result.images) == 2


def test_other_errors_pass_through(pipe):
    engine = AppEngine({MAIN: FlakyPipe(pipe, fail=1, error=KeyError("boom"))})
    with pytest.raises(KeyError, match="boom"):
        engine.run(engine.make_request("a red circle", steps=1, resolution=128))


def test_closing_the_stream_cancels_the_run(pipe):
    closed = threading.Event()

    class HeldAfterStep1(FlakyPipe):  # the worker waits after step 1 until the consumer has closed the stream
        def generate(self, request, callback=None):
            def hold(step, total, latents):
                callback(step, total, latents)
                if step == 1:
                    closed.wait(30)
            return super().generate(request, hold)

    flaky = HeldAfterStep1(pipe)
    engine = AppEngine({MAIN: flaky})
    stream = engine.stream(engine.make_request("a red circle", steps=25, resolution=128))
    assert next(stream).step == 1
    stream.close()
    closed.set()
    done = engine.run(engine.make_request("a red circle", steps=2, resolution=128))  # waits for the lock
    assert len(done.result.images) == 1
    assert flaky.runs[0] == [1, 2]  # the cancelled run stopped at the step after the close, not at 25
    assert flaky.runs[1] == [1, 2]


def test_unknown_model_is_refused(engine):
    with pytest.raises(ValueError, match="model 'alpha' is not loaded; loaded: \\['main'\\]"):
        engine.info(ALPHA)


def test_info_reports_the_loaded_model_while_a_request_switches_kv(pipe):
    gate = threading.Event()

    class Paused(FlakyPipe):
        def generate(self, request, callback=None):
            def hold(step, total, latents):
                gate.wait(30)
                callback(step, total, latents)

            return self.pipe.generate(request, hold)

    engine = AppEngine({MAIN: Paused(pipe)})
    kv = KVCompress(2, (1,), "pool")
    events: list = []
    consumer = threading.Thread(target=lambda: events.extend(
        engine.stream(engine.make_request("a red circle", steps=2, resolution=128, kv=kv))))
    consumer.start()
    try:
        for _ in range(500):  # until the worker is inside the run, with the KV switched
            if pipe.transformer.config.kv_compress == kv:
                break
            time.sleep(0.01)
        assert pipe.transformer.config.kv_compress == kv
        assert engine.info().kv == KVCompress() and engine.info().suggested_kv.operator == "pool"
    finally:
        gate.set()
        consumer.join(30)
    assert isinstance(events[-1], Done) and pipe.transformer.config.kv_compress == KVCompress()
