"""Serving under load and abuse: bounded inputs, refusals that name the parameter (gradio_client and raw HTTP),
one log line per refusal, the queue-full message, bounded disk, several devices (tiny real pipelines)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures import FlakyPipe, free_port

from pixsigma.config import parse_layers
from pixsigma.pipeline import PixSigmaPipeline
from pixsigma_ui.engine import KV_RATIOS, MAIN, MAX_SEED, AppEngine
from pixsigma_ui.generate_tab import make_generate_fn
from pixsigma_ui.inputs import MAX_MESSAGE_CHARS
from pixsigma_ui.pool import EnginePool
from pixsigma_ui.queue_full import queue_full_message
from pixsigma_ui.retention import GRACE_S, Retention, prune, prune_files, prune_gradio_cache
from pixsigma_ui.server import build_demo, parse_args

# The generate endpoint's first inputs in order; a raw HTTP call sends every input, the later ones at their defaults.
GENERATE_INPUTS = ("prompt", "negative_prompt", "style", "aspect_ratio", "resolution", "steps", "guidance", "sampler",
                   "seed", "randomize_seed", "num_images", "kv_mode", "kv_ratio", "kv_layers", "kv_operator",
                   "expand_prompt")
GOOD = dict(prompt="a red circle", negative_prompt="", style="(none)", aspect_ratio="1:1", resolution=128, steps=1,
            guidance=4.5, sampler="default", seed=1, randomize_seed=False, num_images=1, kv_mode="model", kv_ratio=2,
            kv_layers="1", kv_operator="pool", expand_prompt=True)


class GatedPipe(FlakyPipe):
    """The real pipeline, each run held at its first step until ``gate`` is set / all ``barrier`` runs are there."""

    def __init__(self, pipe, gate: threading.Event | None = None, barrier: threading.Barrier | None = None):
        super().__init__(pipe)
        self.gate, self.barrier = gate, barrier

    def generate(self, request, callback=None):
        def hold(step, total, latents):
            if step == 1 and self.barrier is not None:
                self.barrier.wait(60)  # every run of the pool is in flight at once, or this breaks
            if self.gate is not None:
                self.gate.wait(60)
            if callback:
                callback(step, total, latents)

        return super().generate(request, hold)


class Served:
    """A launched app on 127.0.0.1: its URL, a gradio_client and raw HTTP calls."""

    def __init__(self, engine, tmp: Path, **kwargs):
        self.outputs = tmp / "outputs"
        self.demo = build_demo(engine, outputs=self.outputs, **kwargs)
        self.port = free_port()
        self.demo.launch(server_port=self.port, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        self.url = f"http://127.0.0.1:{self.port}"
        from gradio_client import Client

        self.client = Client(self.url + "/", verbose=False)
        self.generate_fn = make_generate_fn(engine, tmp / "signature")  # only its parameters are read

    def close(self):
        self.demo.sweeper.stop()
        self.demo.close()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def call(self, **inputs) -> tuple[str, object]:
        """A raw HTTP call of /generate with ``inputs`` over GOOD's (NaN and infinities go as JSON's NaN and
        Infinity); the (event, decoded data) of its last SSE message."""
        values = {**GOOD, **inputs}
        later = [p.default for name, p in inspect.signature(self.generate_fn).parameters.items()
                 if name not in GENERATE_INPUTS and name != "progress"]
        status, reply = self.post("/gradio_api/call/generate",
                                  {"data": [values[k] for k in GENERATE_INPUTS] + later})
        assert status == 200, reply
        with urllib.request.urlopen(f"{self.url}/gradio_api/call/generate/{reply['event_id']}", timeout=120) as r:
            lines = r.read().decode().strip().splitlines()
        events = [ln[len("event: "):] for ln in lines if ln.startswith("event: ")]
        datas = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
        return events[-1], json.loads(datas[-1])


@pytest.fixture(scope="module")
def served(pipe, tmp_path_factory):
    s = Served(AppEngine({MAIN: pipe}, {MAIN: "tiny"}), tmp_path_factory.mktemp("served"))
    try:
        yield s
    finally:
        s.close()


# -- 1. bounds before expansion -------------------------------------------------------------------------------------


def test_a_huge_layer_range_is_refused_before_it_is_expanded():
    tracemalloc.start()
    try:
        for spec in ("0-10000000", "0-1000000000", "5-" + "9" * 900):
            with pytest.raises(ValueError, match="do not exist: this model has layers 0-27") as e:
                parse_layers(spec, 28)
            assert len(str(e.value)) <= MAX_MESSAGE_CHARS
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # ten million layer numbers would be hundreds of MB
    with pytest.raises(ValueError, match="at most 1000 are accepted"):
        parse_layers("1," * 600)
    assert parse_layers("0-3,7", 8) == (0, 1, 2, 3, 7)


def test_the_huge_layer_range_through_the_api_is_refused_at_once_and_short(served):
    from gradio_client.exceptions import AppError

    start = time.monotonic()
    with pytest.raises(AppError) as e:
        served.client.predict(**{**GOOD, "kv_mode": "on", "kv_layers": "0-10000000"}, api_name="/generate")
    assert time.monotonic() - start < 30  # generous: the unbounded parse took 100 s and 1.7 GB
    message = str(e.value)
    assert "'0-10000000' do not exist: this model has layers 0-1" in message and len(message) <= MAX_MESSAGE_CHARS


def test_every_refusal_is_capped(served):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        served.client.predict(**{**GOOD, "sampler": "x" * 100_000}, api_name="/generate")
    assert "sampler 'xxxx" in str(e.value) and len(str(e.value)) <= MAX_MESSAGE_CHARS


def test_warnings_are_capped_too(pipe, tmp_path):
    generate = make_generate_fn(AppEngine({MAIN: pipe}, {MAIN: "tiny"}), tmp_path)
    with pytest.warns(UserWarning) as warned:
        list(generate(**{**GOOD, "prompt": " ".join(f"zebra{i}" for i in range(300))}))
    messages = [str(w.message) for w in warned]
    assert any(m.startswith("300 word(s) unknown to tiny") for m in messages)
    assert all(len(m) <= MAX_MESSAGE_CHARS for m in messages)


# -- 2. refusals name the parameter, the value and what is accepted (gradio_client) ----------------------------------


@pytest.mark.parametrize("inputs, words", [
    (dict(kv_mode="on", kv_ratio=0), ["kv_ratio", "from 2 to 8", "got 0"]),
    (dict(kv_mode="on", kv_ratio=9), ["kv_ratio", "from 2 to 8", "got 9"]),
    (dict(num_images=1000), ["num_images", "from 1 to 2", "got 1000"]),
    (dict(steps=0), ["steps", "from 1 to 30", "got 0"]),
    (dict(steps=31), ["steps", "from 1 to 30", "got 31"]),
    (dict(guidance=-1), ["guidance", "from 0 to 20", "got -1"]),
    (dict(resolution=1000), ["resolution", "1000", "accepted: 128, 256"]),
    (dict(seed=-5), ["seed", "from 0 to 4294967295", "-1 for a random one", "got -5"]),
    (dict(seed=MAX_SEED + 1), ["seed", "from 0 to 4294967295", f"got {MAX_SEED + 1}"]),
    (dict(aspect_ratio="0:1"), ["aspect_ratio", "'0:1'", "e.g. 1:1"]),
])
def test_api_refusals_name_the_parameter_value_and_range(served, inputs, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        served.client.predict(**{**GOOD, **inputs}, api_name="/generate")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "less than minimum" not in str(e.value) and "greater than maximum" not in str(e.value)


def test_compare_refusals_name_the_parameter(served):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="kv_ratio: the KV compression ratio must be an integer from 2 to 8, got 1"):
        served.client.predict(prompt="a red circle", steps=1, kv_ratio=1, kv_layers="1", api_name="/compare")
    with pytest.raises(AppError, match="steps must be a whole number, got '2' \\(text\\)"):
        served.client.predict(prompt="a red circle", steps="2", kv_layers="1", api_name="/compare")


# -- 3. raw HTTP with wrong types ------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs, words", [
    (dict(steps="10"), ["steps must be a whole number, got '10' (text)"]),
    (dict(seed=float("nan")), ["seed must be a whole number, got nan"]),
    (dict(guidance=float("inf")), ["guidance must be a number, got inf"]),
    (dict(num_images=True), ["num_images must be a whole number, got True"]),
    (dict(randomize_seed="yes"), ["randomize_seed must be true or false, got 'yes'"]),
    (dict(prompt=["a", "list"]), ["prompt must be text"]),
    (dict(kv_mode="on", kv_layers=7), ["kv_layers must be text, got 7"]),
    (dict(sampler=None), ["sampler None is unknown; accepted: default"]),
])
def test_raw_http_wrong_types_get_a_message_naming_the_parameter(served, inputs, words):
    event, data = served.call(**inputs)
    message = data["error"]  # was None: gradio hid the server's TypeError
    assert event == "error" and isinstance(message, str), data
    assert all(w in message for w in words), message


# -- 4. one log line per refusal, a traceback per server fault -------------------------------------------------------


def test_a_refusal_is_one_log_line_and_a_server_fault_keeps_its_traceback(pipe, tmp_path, caplog, capfd):
    from gradio_client.exceptions import AppError

    served = Served(AppEngine({MAIN: FlakyPipe(pipe, fail=9, error=KeyError("a bug in the server"))}, {MAIN: "tiny"}),
                    tmp_path)
    try:
        capfd.readouterr()
        with caplog.at_level(logging.INFO, logger="pixsigma.app"):
            with pytest.raises(AppError, match="steps"):
                served.client.predict(**{**GOOD, "steps": 0}, api_name="/generate")
            refusal = [r for r in caplog.records if r.name == "pixsigma.app"]
            assert len(refusal) == 1 and refusal[0].exc_info is None
            assert refusal[0].getMessage().startswith("refused: steps must be an integer from 1 to 30")
            assert "Traceback" not in capfd.readouterr().err
            caplog.clear()
            with pytest.raises(AppError, match="the server failed on this request"):
                served.client.predict(**GOOD, api_name="/generate")
            fault = [r for r in caplog.records if r.name == "pixsigma.app"]
            assert len(fault) == 1 and fault[0].levelno == logging.ERROR
            assert fault[0].exc_info is not None and "a bug in the server" in caplog.text
    finally:
        served.close()


# -- 6. seed -1, the KV ratio range ----------------------------------------------------------------------------------


def test_seed_minus_one_means_random(served):
    seeds = set()
    for randomize in (True, False, False):
        seeds.add(served.client.predict(**{**GOOD, "seed": -1, "randomize_seed": randomize}, api_name="/generate")[3])
    assert len(seeds) == 3 and all(0 <= s <= MAX_SEED for s in seeds)
    assert served.client.predict(**{**GOOD, "seed": 7}, api_name="/generate")[3] == 7


def test_the_apps_kv_ratio_range_is_the_engines(served, pipe):
    sliders = [c for c in served.demo.blocks.values() if getattr(c, "label", None) in ("R (KV ratio)", "KV ratio R")]
    assert len(sliders) == 2 and all((s.minimum, s.maximum) == KV_RATIOS for s in sliders)
    engine = AppEngine({MAIN: pipe})
    assert engine.kv_setting("on", KV_RATIOS[1], (1,)).ratio == KV_RATIOS[1]
    with pytest.raises(ValueError, match="from 2 to 8"):
        engine.kv_setting("on", KV_RATIOS[1] + 1, (1,))


# -- 7. the queue-full refusal ---------------------------------------------------------------------------------------


def test_queue_full_refusal_states_the_limit_and_when_to_retry(pipe, tmp_path, monkeypatch):
    gate = threading.Event()
    pipe_ = GatedPipe(pipe, gate)
    served = Served(AppEngine({MAIN: pipe_}, {MAIN: "tiny"}), tmp_path, queue_size=1)
    try:
        def until(done, timeout_s: float = 120) -> None:
            deadline = time.monotonic() + timeout_s
            while not done() and time.monotonic() < deadline:
                time.sleep(0.05)

        running = served.client.submit(**GOOD, api_name="/generate")
        until(lambda: len(pipe_.runs) == 1)  # it runs, held at step 1 (sent at once, the second could be refused)
        waiting = served.client.submit(**GOOD, api_name="/generate")
        until(lambda: len(served.demo._queue) == 1)  # the second waits
        assert len(served.demo._queue) == 1, (pipe_.runs, running.status(), waiting.status())
        from gradio_client.exceptions import AppError

        expected = "the queue is full: 1 requests are already waiting, the most this server accepts; retry in about "
        with pytest.raises(AppError, match=expected):  # gradio_client shows our words, not its own fixed text
            served.client.predict(**GOOD, api_name="/generate")
        event, data = served.call()  # a raw HTTP call reads them in its event stream
        assert event == "error" and data["error"].startswith(expected)

        async def moved(*args):
            raise AttributeError("gradio's internals moved")

        monkeypatch.setattr("pixsigma_ui.queue_full._complete_with_error", moved)
        fn_index = next(i for i, f in served.demo.fns.items() if f.api_name == "generate")
        status, reply = served.post("/gradio_api/queue/join", {"data": list(GOOD.values()), "fn_index": fn_index,
                                                                "session_hash": "abuser"})
        assert status == 503 and reply["detail"].startswith(expected)  # the fallback: gradio's 503, our words
        gate.set()
        assert running.result(timeout=60)[3] == waiting.result(timeout=60)[3] == 1  # and it keeps serving
    finally:
        gate.set()
        served.close()
    assert queue_full_message(16, 29.2).endswith("16 requests are already waiting, the most this server accepts; "
                                                 "retry in about 30 s")


# -- 5. bounded disk -------------------------------------------------------------------------------------------------


def write(path: Path, size: int, age_s: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_prune_removes_old_files_then_the_oldest_beyond_the_size_and_empty_folders(tmp_path):
    now = time.time()
    keep = Retention(hours=1, mb=3 / 1024)  # 3 KiB
    old = write(tmp_path / "a" / "old.png", 100, 2 * 3600, now)
    files = [write(tmp_path / "b" / f"{i}.png", 1024, 600 - 60 * i, now) for i in range(5)]  # oldest first
    fresh = write(tmp_path / "fresh.png", 1024, GRACE_S / 2, now)  # being written: never removed for size
    removed = prune(tmp_path, keep, now)
    assert removed == [old, *files[:3]]  # the age bound, then the oldest until 3 KiB remain
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted([*files[3:], fresh])
    assert not (tmp_path / "a").exists()  # the folder the old file left empty
    assert prune(tmp_path, keep, now) == []
    assert prune_files([tmp_path / "missing.png"], keep, now) == []
    with pytest.raises(ValueError, match="keep-outputs-hours must be a number >= 0, got -1"):
        Retention(hours=-1)


def test_outputs_and_gradios_cache_stay_within_bounds(pipe, tmp_path):
    served = Served(AppEngine({MAIN: pipe}, {MAIN: "tiny"}), tmp_path, keep=Retention(hours=1, mb=10))
    try:
        for seed in (1, 2):
            served.client.predict(**{**GOOD, "seed": seed}, api_name="/generate")
        assert len(list(served.outputs.glob("*.png"))) == 2
        cached = {Path(f) for s in served.demo.temp_file_sets for f in s if f.endswith(".png")}
        assert len(cached) >= 2 and all(p.exists() for p in cached)
        later = time.time() + 2 * 3600
        assert len(prune(served.outputs, Retention(1, 10), later)) == 2
        removed = prune_gradio_cache(served.demo, Retention(hours=1, mb=10), later)
        assert cached <= set(removed) and not any(p.exists() or p.parent.exists() for p in cached)
        assert not any(str(p) in s for s in served.demo.temp_file_sets for p in cached)
    finally:
        served.close()


def test_the_outputs_folder_is_pruned_after_each_save(pipe, tmp_path):
    engine = AppEngine({MAIN: pipe}, {MAIN: "tiny"})
    write(tmp_path / "out" / "yesterday.png", 10, 25 * 3600, time.time())
    list(make_generate_fn(engine, tmp_path / "out", Retention(hours=24))(**GOOD))
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name == "yesterday.png"] == []
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_options_for_retention_and_devices():
    o = parse_args([])
    assert (o.keep_outputs_hours, o.keep_outputs_mb, o.devices) == (24.0, 1000.0, None)
    o = parse_args(["--keep-outputs-hours", "2", "--keep-outputs-mb", "50", "--devices", "cpu,cpu"])
    assert (o.keep_outputs_hours, o.keep_outputs_mb, o.devices) == (2.0, 50.0, "cpu,cpu")


# -- several devices -------------------------------------------------------------------------------------------------


def test_two_engines_serve_two_requests_at_once(tiny_pipeline, tmp_path):
    barrier = threading.Barrier(2)
    pipes = [GatedPipe(PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu"), barrier=barrier)
             for _ in range(2)]
    pool = EnginePool([AppEngine({MAIN: p}, {MAIN: "tiny"}) for p in pipes])
    assert pool.concurrency == 2 and pool.devices == ["cpu", "cpu"]
    served = Served(pool, tmp_path)
    try:
        fns = [f for f in served.demo.fns.values() if f.api_name in ("generate", "compare")]
        assert {f.concurrency_limit for f in fns} == {2} and len({f.concurrency_id for f in fns}) == 1
        with ThreadPoolExecutor(2) as ex:  # the barrier breaks unless both run at the same time
            seeds = list(ex.map(lambda s: served.client.predict(**{**GOOD, "seed": s}, api_name="/generate")[3],
                                (3, 4)))
        assert seeds == [3, 4] and [len(p.runs) for p in pipes] == [1, 1]
    finally:
        served.close()


def test_a_pool_needs_the_same_models_everywhere(pipe):
    with pytest.raises(ValueError, match="the same models"):
        EnginePool([AppEngine({MAIN: pipe}, {MAIN: "a"}), AppEngine({MAIN: pipe}, {MAIN: "b"})])


# -- the Train tab's events follow the same rules --------------------------------------------------------------------


def test_train_start_checks_its_inputs_by_name(pipe, tmp_path, caplog):
    import gradio as gr

    from pixsigma_ui.train_tab import RunManager

    demo = build_demo(AppEngine({MAIN: pipe}), outputs=tmp_path / "out", runs=RunManager(tmp_path / "runs", {}))
    demo.sweeper.stop()
    start = next(f for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_start"
                 and f.fn.__module__ == "pixsigma_ui.train_tab")  # the lab has its own Start
    assert start.preprocess is False  # gradio's unnamed "Value 0 is less than minimum value 1." never answers
    with caplog.at_level(logging.INFO, logger="pixsigma.app"):
        with pytest.raises(gr.Error, match="steps must be a whole number, got '10' \\(text\\)") as e:
            start.fn("finetune", None, "", "10", 1e-4, 4)
        assert e.value.print_exception is False
        with pytest.raises(gr.Error, match="no config for stage 'finetune'"):
            start.fn("finetune", None, "", 10, 1e-4, 4)
    assert [r.getMessage()[:9] for r in caplog.records if r.name == "pixsigma.app"] == ["refused: "] * 2


def test_the_devices_option_loads_the_models_once_per_device(tiny_pipeline):
    from pixsigma_ui.server import load_engine

    pool = load_engine(parse_args(["--model", str(tiny_pipeline), "--devices", "cpu, cpu"]), None)
    assert isinstance(pool, EnginePool) and pool.devices == ["cpu", "cpu"] and pool.concurrency == 2
    first, second = (e.pipes[MAIN] for e in pool.engines)
    assert first is not second and first.transformer is not second.transformer
    single = load_engine(parse_args(["--model", str(tiny_pipeline), "--device", "cpu"]), None)
    assert not isinstance(single, EnginePool) and single.concurrency == 1
