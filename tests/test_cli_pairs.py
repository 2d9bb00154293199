"""``pixsigma generate`` runs every pair of features (bench/features.py) on the shipped demo Σ, in this process
(``pixsigma.cli.main``): each writes its PNGs, and their stored parameters record both features."""

from __future__ import annotations

import pytest

from bench.features import Inputs, cli_args, features_for, images_per_prompt, pair_id, pairs, unrecorded
from pixsigma.cli import main as cli
from pixsigma.config import KVCompress
from pixsigma.io import numbered_paths, read_params
from pixsigma.registry import LORA_ALIASES, MODEL_ALIASES

PROMPT = "a red star above a blue circle"
SIZE = 64  # a quarter of the demo's base: 16 tokens, generated as asked (--no-binning)
# Pool needs no trained weights, so any layers can switch; the demo's own is conv R=2 on 4-7.
KV = KVCompress(2, (2, 3, 4, 5, 6, 7), "pool")
LORA = "demo-tiny-huge"  # the demo Σ's shipped LoRA (pixsigma.registry.LORA_ALIASES)
PAIRS = sorted(pairs(features_for("cpu")), key=lambda p: any(f.speed == "compile" for f in p))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    assert (MODEL_ALIASES["demo"] / "controlnet").is_dir() and LORA in LORA_ALIASES  # shipped, never skipped
    return Inputs(SIZE, SIZE, LORA, KV).save(tmp_path_factory.mktemp("cli_inputs"))


@pytest.mark.parametrize("combo", PAIRS, ids=[pair_id(p) for p in PAIRS])
def test_cli_pair_on_the_demo(inputs, combo, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(["generate", PROMPT, "--model", "demo", "--out", str(out), "--steps", "2", "--seed", "3",
              "--width", str(SIZE), "--height", str(SIZE), "--no-binning", *cli_args(combo, inputs)])
    assert rc == 0, capsys.readouterr().err
    paths = numbered_paths(out, images_per_prompt(combo))
    assert sorted(tmp_path.glob("out*.png")) == sorted(paths)
    for path in paths:
        params = read_params(path)
        assert params["steps"] == 2 and params["width"] == SIZE and params["generated_size"] == [SIZE, SIZE]
        assert unrecorded(combo, params, inputs) == []
