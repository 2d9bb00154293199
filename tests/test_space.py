"""``pixsigma space``: the Space folder's front matter, requirements and starter, one written for the demo and
served offline from its own folder; and ZeroGPU: the per-request duration and the call path, with a fake
``spaces`` module."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from fixtures import free_port, offline_env, wheel, wheel_env

from pixsigma.config import DiTConfig
from pixsigma.space import SpaceOptions, front_matter, installed_files, pins, write_space
from pixsigma_ui import zerogpu
from pixsigma_ui.engine import MAIN, AppEngine, Limits
from pixsigma_ui.zerogpu import (
    FLOOR_S,
    MARGIN,
    MAX_S,
    REQUEST_SECONDS,
    STEP_SECONDS,
    duration_for,
    estimate_seconds,
    gpu_decorator,
    step_seconds,
)

SIGMA = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"


def yaml_block(text: str) -> list[str]:
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


# -- the folder's files ------------------------------------------------------------------------------------------


def test_front_matter_names_the_hub_models_to_preload_and_the_tested_versions():
    opts = SpaceOptions(model=SIGMA, alpha_model=None, controlnet="someone/pixart-controlnet",
                        loras=("demo-tiny-huge", "someone/style-lora"), hardware="l4x1")
    lines = yaml_block(front_matter(opts))
    ids = [SIGMA, "someone/pixart-controlnet", "someone/style-lora"]  # shipped names load from the folder
    assert lines[lines.index("models:") + 1: lines.index("models:") + 4] == [f"  - {i}" for i in ids]
    assert lines[lines.index("preload_from_hub:") + 1:][:3] == [f"  - {i}" for i in ids]
    assert {"sdk: gradio", f"sdk_version: {version('gradio')}", "app_file: app.py", "suggested_hardware: l4x1",
            f'python_version: "{sys.version_info.major}.{sys.version_info.minor}"'} <= set(lines)
    assert opts.app_args() == ["--model", SIGMA, "--alpha-model", "none", "--controlnet",
                               "someone/pixart-controlnet", "--device", "cuda"]
    demo = yaml_block(front_matter(SpaceOptions()))
    assert "suggested_hardware: zero-a10g" in demo and "models:" not in demo and "preload_from_hub:" not in demo
    assert SpaceOptions().app_args()[-4:] == ["--device", "cpu", "--dtype", "bf16"]  # ZeroGPU: CPU at import
    assert SpaceOptions(hardware="cpu", train=True).app_args()[-3:] == ["--enable-training", "--device", "cpu"]


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "/home/me/my-model"}, "SpaceOptions.model='/home/me/my-model': a Space can load a shipped model"),
    ({"loras": ("style.safetensors",)}, "'style.safetensors' is neither a shipped LoRA"),
    ({"hardware": "gpu"}, "SpaceOptions.hardware='gpu'; accepted: zerogpu, cpu, cpu-basic"),
])
def test_what_a_space_cannot_serve_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        SpaceOptions(**kwargs)


def test_requirements_pin_the_installed_versions_and_the_train_extra_only_with_the_train_tab():
    app_only, with_train = pins(wheel(), ("app",)), pins(wheel(), ("app", "train"))
    names = {p.split("==")[0].lower() for p in app_only}
    assert {"torch", "diffusers", "transformers", "peft", "pandas", "pyyaml"} <= names  # peft: the engine's LoRAs
    assert not names & {"gradio", "accelerate", "came-pytorch", "pytest"}  # gradio: the Space's sdk_version has it
    assert {"accelerate", "came-pytorch", "matplotlib"} <= {p.split("==")[0].lower() for p in with_train}
    for pin in with_train:
        name, v = pin.split("==")
        assert v == version(name).split("+")[0]


def test_writing_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_space(tmp_path, SpaceOptions(), wheel())


def test_the_demo_space_serves_a_generate_request_from_its_own_folder(tmp_path):
    from gradio_client import Client

    space = tmp_path / "space"
    files = write_space(space, SpaceOptions(), wheel())
    assert {p.name for p in space.iterdir()} == {"README.md", "app.py", "requirements.txt", "pixsigma", "pixsigma_ui",
                                                 "pixsigma-0.1.0.dist-info"}
    assert (space / "pixsigma/data/assets/demo/sigma/model_index.json").is_file()
    assert not (space / "pixsigma/data/configs").exists()  # no Train tab, no training configs
    starter = files.app.read_text()
    assert 'os.environ.setdefault("GRADIO_CACHE_MODE", "lazy")' in starter
    assert "from pixsigma_ui.server import main" in starter  # the package's app, vendored beside it
    port = free_port()
    log = (tmp_path / "space.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=space,
                            env=offline_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "space.log").read_text()
                time.sleep(1)
        images, summary, _, seed = client.predict(prompt="a red star", steps=2, seed=5, randomize_seed=False,
                                                  api_name="/generate")
        assert len(images) == 1 and seed == 5 and "2 steps" in summary
        assert "expanded" in summary  # the demo's expander, found through the Space's own dist-info
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "Traceback" not in (tmp_path / "space.log").read_text()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_pixsigma_space_from_a_pip_installed_wheel_vendors_the_installed_files(tmp_path):
    """No clone: ``pixsigma space`` of a non-editable install copies the installed package's own files, byte for
    byte the folder written from the wheel itself (pip's install records left out)."""
    pixsigma = wheel_env() / "bin" / "pixsigma"
    done = subprocess.run([str(pixsigma), "space", "installed"], cwd=tmp_path, env=offline_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("wrote the Space installed (")
    got, want = tree(tmp_path / "installed"), tree(write_space(tmp_path / "from-wheel", SpaceOptions(), wheel()).folder)
    assert sorted(got) == sorted(want)
    assert "pixsigma/data/assets/demo/sigma/model_index.json" in got and "pixsigma_ui/server.py" in got
    assert not any("__pycache__" in n or n.endswith(("/RECORD", "/INSTALLER", "/direct_url.json")) for n in got)
    assert [n for n in got if got[n] != want[n]] == []


def test_the_installed_files_are_refused_when_the_pixsigma_running_is_not_the_installed_one():
    with pytest.raises(ValueError, match="is not the installed distribution's"):
        installed_files()  # this clone's pixsigma, not the one an (editable) install's RECORD names


# -- ZeroGPU -----------------------------------------------------------------------------------------------------


def test_the_estimate_is_steps_times_images_times_the_tables_cost_with_margin_floor_and_cap():
    assert estimate_seconds(1, 256, 1) == FLOOR_S
    expected = (REQUEST_SECONDS + 20 * 4 * STEP_SECONDS[1024]) * MARGIN
    assert estimate_seconds(20, 1024, 4) == max(FLOOR_S, -(-expected // 1))
    assert estimate_seconds(100, 4096, 4) == MAX_S
    assert estimate_seconds(40, 2048, 2) > estimate_seconds(20, 2048, 2) > estimate_seconds(20, 1024, 2)
    assert step_seconds(768) == pytest.approx(STEP_SECONDS[1024] * (768 / 1024) ** 2)  # by pixels within a band
    assert step_seconds(8192) == pytest.approx(STEP_SECONDS[4096] * 4)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        estimate_seconds(0, 1024, 1)


def test_the_duration_reads_the_handlers_own_arguments_and_defaults():
    def generate(prompt: str, negative_prompt: str = "", resolution: int = 1024, steps: int = 20,
                 num_images: int = 1, progress: object = None):
        yield prompt

    def compare(prompt: str, seed: int = 0, steps: int = 14):
        yield prompt

    gen, cmp = duration_for(generate, 1024), duration_for(compare, 512)
    assert gen("a cat") == estimate_seconds(20, 1024, 1)
    assert gen("a cat", "", 2048, 30, 4) == estimate_seconds(30, 2048, 4)  # as gradio passes them: positionally
    assert gen("a cat", steps=50, num_images=2) == estimate_seconds(50, 1024, 2)
    assert cmp("a cat", 1, 10) == estimate_seconds(10, 512, zerogpu.COMPARE_IMAGES)
    assert gen("a cat", steps="many") == FLOOR_S  # refused by the handler anyway: no long reservation


class FakeSpaces(types.ModuleType):
    """``spaces`` as a ZeroGPU Space has it: ``spaces.GPU(duration=…)`` and ``spaces.config.Config.zero_gpu``."""

    def __init__(self, zero_gpu: bool) -> None:
        super().__init__("spaces")
        self.config = types.SimpleNamespace(Config=types.SimpleNamespace(zero_gpu=zero_gpu))
        self.calls: list[tuple[str, int]] = []

        def gpu(duration):
            def mark(fn):
                def run(*args, **kwargs):  # ZeroGPU asks the callable with the call's own arguments
                    self.calls.append((fn.__name__, duration(*args, **kwargs)))
                    return fn(*args, **kwargs)
                return run
            return mark

        self.GPU = gpu


def test_a_space_call_reserves_its_estimate_and_moves_the_models_to_cuda_inside_it(pipe, monkeypatch):
    engine = AppEngine({MAIN: pipe})
    assert gpu_decorator(engine, spaces=None)(len) is len  # no `spaces` installed here: the identity
    fake = FakeSpaces(zero_gpu=True)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    gpu = gpu_decorator(engine)
    assert engine.limits == Limits.for_device("cuda", zerogpu.ZEROGPU_MEMORY, engine.info().resolution)
    moved = []
    monkeypatch.setattr(engine, "move_to", lambda device: moved.append(device))

    def generate(prompt: str, steps: int = 8, num_images: int = 1):
        yield f"{prompt} on {'cuda' if moved else 'cpu'}"

    wrapped = gpu(generate)
    assert inspect.isgeneratorfunction(zerogpu.on_cuda(engine, generate))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert list(wrapped("a cat", 8, 2)) == ["a cat on cpu"] and moved == []  # no GPU attached: nothing moves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # inside a ZeroGPU call
    assert list(wrapped("a cat", 8, 2)) == ["a cat on cuda"] and moved == ["cuda"]
    res = engine.info().resolution
    assert fake.calls == [("generate", estimate_seconds(8, res, 2))] * 2


def test_without_zerogpu_the_engine_keeps_its_limits(pipe, monkeypatch):
    engine = AppEngine({MAIN: pipe})
    before = engine.limits
    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces(zero_gpu=False))
    gpu_decorator(engine)
    assert engine.limits is before


def test_moving_the_engine_keeps_each_models_lock_under_its_new_device():
    class Pipe:
        transformer = types.SimpleNamespace(config=DiTConfig(depth=2, hidden_size=64, num_heads=2))

        def __init__(self) -> None:
            self.device = torch.device("cpu")

        def to(self, device):
            self.device = torch.device(device)
            return self

    engine = AppEngine({MAIN: Pipe(), "alpha": Pipe()})
    (lock,) = engine._locks.values()
    engine.move_to("meta")
    assert engine._locks == {"meta": lock} and engine.device == torch.device("meta")
    assert all(p.device == torch.device("meta") for p in engine.pipes.values()) and not lock.locked()


def test_the_space_folder_holds_no_repository_paths(tmp_path):
    files = write_space(tmp_path / "s", SpaceOptions(model=SIGMA, alpha_model=None, hardware="cpu"), wheel())
    assert not (files.folder / "pixsigma/data/assets/demo").exists()  # a hub model: the demo is not shipped
    assert Path(__file__).resolve().parents[1].as_posix() not in files.app.read_text() + files.readme.read_text()
