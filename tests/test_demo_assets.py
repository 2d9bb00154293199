"""The shipped demo pair: loads offline from assets/, generates from the CLI, and fits the size budget."""

import numpy as np
import pytest
from PIL import Image

from pixsigma.cli import main as cli
from pixsigma.io import read_params
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from shapes import DEMO_DIR

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


@pytest.mark.parametrize("name", ["sigma", "alpha"])
def test_demo_folders_sample_as_measured(name):
    """The table's sampling is the folders' own: ancestral Euler, the build's steps and guidance."""
    import json

    from pixsigma.pipeline import SamplingDefaults
    from shapes.build import DEMO_EXPANDER, DEMO_GUIDANCE, DEMO_STEPS

    folder = DEMO_DIR / name
    assert SamplingDefaults.read(folder) == SamplingDefaults(DEMO_STEPS, DEMO_GUIDANCE, DEMO_EXPANDER[name])
    assert DEMO_EXPANDER == {"sigma": "shapes", "alpha": None}  # Σ reads dense captions; α never learned them
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerAncestralDiscreteScheduler" and sched["prediction_type"] == "v_prediction"


def test_demo_unknown_words_are_reported():
    pipe = PixSigmaPipeline.from_pretrained("demo", device="cpu")
    assert pipe.unknown_words("a red giraffe above a blue ring") == ["giraffe"]


def test_cli_generates_from_the_shipped_model(tmp_path, capsys):
    from shapes.prompts import expand_prompt

    out, typed = tmp_path / "star.png", tmp_path / "typed.png"
    args = ["generate", "a red star above a blue ring", "--model", "demo", "--seed", "1", "--steps", "4"]
    assert cli([*args, "--out", str(out)]) == 0
    params = read_params(out)
    assert Image.open(out).size == (256, 256) and params["model"] == "demo"
    dense = expand_prompt("a red star above a blue ring", 1)  # Σ's folder names the shapes expander
    assert params["expanded_prompts"] == [dense] and "star.png read the expanded prompt " in capsys.readouterr().out
    assert cli([*args, "--out", str(typed), "--no-expand"]) == 0
    assert "expanded_prompts" not in read_params(typed) and "expanded" not in capsys.readouterr().out
    assert np.asarray(Image.open(out)).tobytes() != np.asarray(Image.open(typed)).tobytes()


def test_shipped_shapesbench_report_is_complete():
    """The model card's table comes from assets/demo/shapesbench.json, written by the build's report step."""
    import json

    report = json.loads((DEMO_DIR / "shapesbench.json").read_text())
    assert report["command"].startswith("python -m shapes.")
    rows = report["table"]
    names = {"PixArt-α (128 px)", "PixArt-Σ (256 px, KV R=2)", "PixArt-Σ without KV", "PixArt-Σ, prompts expanded",
             "real images (ceiling)", "real images through VAE-α (128 px)", "real images through VAE-Σ (256 px)"}
    assert names <= set(rows)
    for name, row in rows.items():
        assert row["n"] >= 200, name
        assert all(0.0 <= row[m] <= 1.0 for m in ("attribute", "count", "colour", "shape", "position")), name
    assert rows["real images (ceiling)"]["attribute"] > 0.9  # the bench reads real scenes back
    # the better VAE (Σ's) must not be what caps Σ: its round trip of real scenes scores near the oracle
    assert rows["real images through VAE-Σ (256 px)"]["attribute"] > rows["real images through VAE-α (128 px)"][
        "attribute"] and rows["real images through VAE-Σ (256 px)"]["attribute"] > 0.95
    stages = report["curves"]
    assert list(stages)[:4] == ["alpha", "sigma_vae", "sigma_resup", "sigma_kv"]  # then any finetune continuation
    assert all(st.startswith("sigma_") for st in list(stages)[4:])
    assert all(len(s["bench"]) >= 2 and s["loss"] for s in stages.values())
    for png in ("curves_loss.png", "curves_shapesbench.png"):
        assert Image.open(DEMO_DIR / png).size[0] > 400
    table = (DEMO_DIR / "shapesbench.md").read_text()
    assert "PixArt-Σ (256 px, KV R=2)" in table and table in (DEMO_DIR / "README.md").read_text()  # the model card


def test_shipped_vae_sigma_is_the_decoder_refined_one():
    """The shipped VAE-Σ went through phase 2 of its spec (decoder-only, encoder frozen) and is the better VAE."""
    import json

    from shapes.vae import VAE_SPECS

    sigma = json.loads((DEMO_DIR / "sigma" / "vae" / "metrics.json").read_text())
    alpha = json.loads((DEMO_DIR / "alpha" / "vae" / "metrics.json").read_text())
    spec = VAE_SPECS["sigma"]
    assert sigma["decoder_steps"] == spec.decoder_steps and sigma["spec"]["decoder_noise"] == spec.decoder_noise
    assert sigma["psnr_db"] > sigma["psnr_db_phase1"] > alpha["psnr_db"]
