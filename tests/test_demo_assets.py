"""The shipped demo pair: loads offline from assets/, generates from the CLI, and fits the size budget."""

import numpy as np
import pytest
from PIL import Image

from pixsigma.cli import main as cli
from pixsigma.demo import DEMO_DIR
from pixsigma.io import read_params
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline

MAX_ASSETS_MB = 40


def test_assets_fit_the_budget_and_are_safetensors():
    files = [p for p in DEMO_DIR.parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_ASSETS_MB * 2**20
    weights = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


@pytest.mark.parametrize("name,size,kv", [("demo", 256, True), ("demo-alpha", 128, False)])
def test_demo_models_generate_offline(name, size, kv):
    pipe = PixSigmaPipeline.from_pretrained(name, device="cpu")
    assert pipe.base_resolution == size and pipe.transformer.config.kv_compress.active == kv
    res = pipe.generate(GenerationRequest("a red star above a blue ring", seed=0, steps=4))
    img = np.asarray(res.images[0])
    assert img.shape == (size, size, 3) and img.std() > 5  # a picture, not a flat field


def test_demo_unknown_words_are_reported():
    pipe = PixSigmaPipeline.from_pretrained("demo", device="cpu")
    assert pipe.unknown_words("a red giraffe above a blue ring") == ["giraffe"]


def test_cli_generates_from_the_shipped_model(tmp_path):
    out = tmp_path / "star.png"
    assert cli(["generate", "a red star above a blue ring", "--model", "demo", "--out", str(out), "--seed", "1",
                "--steps", "4"]) == 0
    assert Image.open(out).size == (256, 256) and read_params(out)["model"] == "demo"
