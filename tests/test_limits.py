"""The smaller hardening findings: PNG metadata is always valid JSON, a ControlNet's broken JSON names its file,
``kill -TERM`` of the app removes its temp outputs, gradio's cache sweep never evicts other users' results for
one big upload, the app's image inputs refuse a huge image in its own words, and the app's flags reach launch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
from bad_images import huge_paletted_png
from fixtures import CONTROL_DIT, random_dit
from PIL import Image

from pixsigma.controlnet_weights import load_controlnet, trained_control_type
from pixsigma.io import read_params, save_png
from pixsigma.weights import CheckpointError
from pixsigma_ui import inputs, server
from pixsigma_ui.retention import GRACE_S, Retention, prune_gradio_cache
from pixsigma_ui.uploads import UploadLimits

REPO = Path(__file__).resolve().parent.parent


def _refuse_constants(name):
    raise AssertionError(f"{name} is not JSON")


def test_png_metadata_is_valid_json_whatever_the_numbers(tmp_path):
    params = {"guidance": math.inf, "loras": [{"scale": -math.inf}], "alpha": math.nan, "steps": 4, "shift": 1.5}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", params)
    with Image.open(path) as im:
        text = im.text["parameters"]
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text, parse_constant=_refuse_constants) == {
        "alpha": "nan", "guidance": "inf", "loras": [{"scale": "-inf"}], "shift": 1.5, "steps": 4}
    assert read_params(path)["guidance"] == "inf"


@pytest.mark.parametrize("name, text, message", [
    ("controlnet.json", "{broken", r"controlnet.json is not valid JSON \(Expecting property name"),
    ("controlnet.json", "[1, 2]", r"controlnet.json must hold a JSON object, got list"),
    ("controlnet.json", '{"other": 1}', r'controlnet.json has no "controlnet" object'),
    ("config.json", "{broken", r"config.json is not valid JSON"),
])
def test_a_controlnet_folder_with_broken_json_names_the_file(tmp_path, name, text, message):
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=f"^{folder}/{message}"):
        load_controlnet(folder, random_dit(CONTROL_DIT))
    if name == "controlnet.json" and text == "{broken":
        with pytest.raises(CheckpointError, match="controlnet.json is not valid JSON"):
            trained_control_type(folder)


def test_kill_term_removes_the_temp_outputs_folder(tmp_path):
    code = ("from pixsigma_ui.retention import temp_outputs_folder, exit_on_sigterm\n"
            "import time\nf = temp_outputs_folder()\n(f / 'a.png').write_bytes(b'x')\nexit_on_sigterm()\n"
            "print(f, flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert (folder / "a.png").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert not folder.exists()
    finally:
        proc.kill()
        proc.wait()


class FakeBlocks:
    def __init__(self):
        self.upload_file_set: set[str] = set()
        self.results: set[str] = set()
        self.temp_file_sets = [self.upload_file_set, self.results]


def test_one_big_upload_never_evicts_other_users_results(tmp_path):
    now = time.time()
    blocks = FakeBlocks()

    def cached(name, size, age, into):
        path = tmp_path / name / "f.bin"
        path.parent.mkdir()
        path.write_bytes(bytes(size))
        os.utime(path, (now - age, now - age))
        into.add(str(path))
        return path

    results = [cached(f"r{i}", 4096, 600 + i, blocks.results) for i in range(20)]  # others' results: 80 KiB
    small = cached("u-small", 1024, 900, blocks.upload_file_set)  # someone's input image
    big = cached("u-big", 64 * 1024, 300, blocks.upload_file_set)  # the attacker's
    fresh = cached("u-fresh", 64 * 1024, GRACE_S / 2, blocks.upload_file_set)  # being uploaded now
    expired = cached("r-old", 10, 2 * 3600, blocks.results)
    removed = prune_gradio_cache(blocks, Retention(hours=1, mb=100 / 1024), now)  # 100 KiB
    assert set(removed) == {expired, big}
    assert all(p.exists() for p in [*results, small, fresh])
    assert str(big) not in blocks.upload_file_set and not big.parent.exists()


def test_a_huge_uploaded_image_is_refused_in_the_apps_words(tmp_path, monkeypatch):
    huge = huge_paletted_png(tmp_path / "huge.png")
    monkeypatch.setattr(inputs, "upload_pixels", 1024 * 1024)

    @inputs.guarded
    def handler(path):
        return inputs.open_upload(Path(path), "init_image")

    with pytest.raises(gr.Error) as e:
        handler(str(huge))
    assert e.value.message == ("init_image is 400,000,000 pixels; at most 1,048,576 pixels, e.g. 1024×1024 are "
                               "accepted")
    mid = tmp_path / "mid.png"
    Image.new("L", (2000, 1000)).save(mid)
    with pytest.raises(gr.Error, match=r"init_image is 2000×1000 \(2,000,000 pixels\); at most 1,048,576"):
        handler(str(mid))


def test_the_apps_flags_reach_the_uploads_and_gradios_launch(tmp_path, monkeypatch):
    seen = {}

    class Demo:
        def launch(self, **kw):
            seen["launch"] = kw

    def build(engine, **kw):
        seen["runs"] = kw["runs"]
        return Demo()

    monkeypatch.setattr(server, "load_engine", lambda opts, alpha: object())
    monkeypatch.setattr(server, "attach_runs", lambda engine, runs: None)
    monkeypatch.setattr(server, "build_demo", build)
    monkeypatch.setattr(server, "exit_on_sigterm", lambda: seen.setdefault("sigterm", True))
    monkeypatch.setattr(server, "resolve_model", lambda m: tmp_path)
    monkeypatch.setattr(inputs, "upload_pixels", inputs.upload_pixels)
    server.main(["--enable-training", "--runs-dir", str(tmp_path / "runs"), "--max-upload-mb", "50",
              "--max-image-pixels", "1000000", "--data-root", str(tmp_path), "--max-unpacks", "3"])
    assert seen["launch"]["max_file_size"] == 50 * 2**20 and seen["sigterm"]
    limits = seen["runs"].uploads.limits
    assert (limits.upload_mb, limits.image_pixels, limits.unpacks, limits.data_roots) == (
        50, 1_000_000, 3, (tmp_path.resolve(),))
    assert inputs.upload_pixels == 1_000_000
    defaults = server.parse_args([])
    assert UploadLimits() == server.limits_from_args(defaults)  # the flags' defaults are the documented ones
    with pytest.raises(SystemExit, match="^error: --max-unpacks must be a whole number > 0, got 0$"):
        server.main(["--max-unpacks", "0"])
