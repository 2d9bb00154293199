"""Config loading: layering, overrides, validation messages, and the shipped recipes chaining correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pixsigma.config import PRESETS, KVCompress
from pixsigma.weights import read_checkpoint
from train.config import build_config, load_config, parse_overrides
from train.stages import model_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def test_layering_stage_defaults_base_file_and_overrides(tmp_path):
    _write(tmp_path / "base.yaml", {"data": {"source": "imgs", "num_workers": 3}, "steps": 7, "batch_size": 5})
    path = _write(tmp_path / "kv.yaml", {"base": "base.yaml", "stage": {"name": "kv_compress", "load_from": "r",
                                                                        "kv": {"ratio": 2, "layers": "1-2"}},
                                         "batch_size": 6})
    cfg = load_config(path)
    assert cfg.name == "kv" and cfg.output_dir == "runs/kv"
    assert cfg.steps == 7 and cfg.batch_size == 6 and cfg.data.num_workers == 3  # base < file
    assert cfg.optim.warmup_steps == 0  # the kv_compress stage's own default
    assert cfg.stage.kv == KVCompress(ratio=2, layers=(1, 2))
    cfg = load_config(path, ["optim.lr=1e-4", "optim.betas=[0.8, 0.9, 0.99]", "steps=3", "data.cache="])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9, 0.99) and cfg.steps == 3 and cfg.data.cache is None
    assert cfg.optim.name == "came" and cfg.optim.eps == (1e-30, 1e-16) and cfg.caption_dropout == 0.1
    assert cfg.data.long_caption_ratio == 0.6 and cfg.optim.grad_clip == 0.01


def test_yaml_pitfalls_are_read_as_meant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: from_scratch\nmixed_precision: no\nsample_prompts: a red square\n"
                    "optim: {lr: 1e-4}\ndata: {source: x}\n")
    cfg = load_config(path)
    assert cfg.mixed_precision == "no" and cfg.sample_prompts == ("a red square",) and cfg.optim.lr == 1e-4


def test_python_config(tmp_path):
    (tmp_path / "c.py").write_text("config = {'stage': 'from_scratch', 'model': 'tiny', 'data': {'source': 'x'}}\n")
    cfg = load_config(tmp_path / "c.py")
    assert cfg.stage.name == "from_scratch" and cfg.model == "tiny" and cfg.data.long_caption_ratio == 0.0


@pytest.mark.parametrize("raw, message", [
    ({"stage": "nope"}, r"stage.name must be one of \('from_scratch'"),
    ({"stage": "from_scratch", "optim": {"name": "sgd"}}, r"optim.name must be one of \('came', 'adamw'\)"),
    ({"stage": "from_scratch", "optim": {"betas": [0.9, 0.99]}}, "optim.betas for came must be 3 numbers"),
    ({"stage": "from_scratch", "optim": {"name": "adamw", "betas": [0.9, 0.99], "eps": [1e-8]}}, None),
    ({"stage": "from_scratch", "mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"stage": "from_scratch", "optim": {"schedule": "linear"}},
     r"optim.schedule must be one of \('constant', 'cosine'\)"),
    ({"stage": "from_scratch", "model": "XXL"}, "model must be one of the presets"),
    ({"stage": "from_scratch", "steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"stage": "from_scratch", "optim": {"lr": "fast"}}, "optim.lr must be a number, got 'fast'"),
    ({"stage": "from_scratch", "data": {"long_caption_ratio": 1.5}}, r"data.long_caption_ratio must be .* \[0, 1\]"),
    ({"stage": "from_scratch", "data": {"max_images": 0}}, "data.max_images must be an integer >= 1, got 0"),
    ({"stage": "from_scratch", "sample_every": 5}, "sample_every > 0 needs sample_prompts"),
    ({"stage": "from_scratch", "snr_gamma": 0}, r"snr_gamma must be > 0 \(Min-SNR-γ; paper: 5\) or null"),
    ({"stage": "from_scratch", "snr_gamma": "high"}, "snr_gamma must be a number, got 'high'"),
    ({"stage": "from_scratch", "timestep_band": [700, 200, 0.5]},
     r"timestep_band must be \[low, high, share\] with integers 0 <= low <= high < 1000 and share in \(0, 1\]"),
    ({"stage": "from_scratch", "timestep_band": [200, 700]}, r"timestep_band must be .*got \[200, 700\]"),
    ({"stage": "from_scratch", "timestep_band": [200, 700, 0]}, r"share in \(0, 1\], or null \(uniform t\)"),
    ({"stage": "from_scratch", "timestep_band": [200, 1000, 0.5]}, r"high < 1000"),
    ({"stage": "from_scratch", "timestep_band": [200, 700, 0.5]}, None),
    ({"stage": "from_scratch", "stepz": 5}, r"unknown config keys \['stepz'\]"),
    ({"stage": {"name": "res_up", "load_from": "x", "resolution": 1000}}, "multiple of 16"),
    ({"stage": {"name": "kv_compress", "load_from": "x", "kv": {"ratio": 2, "layers": "3-1"}}}, "bad layer range"),
    ({"stage": {"name": "from_scratch", "load_from": "x"}}, "remove stage.load_from"),
])
def test_bad_values_are_named(raw, message):
    raw = {"data": {"source": "x", **raw.pop("data", {})}, **raw}
    if message is None:
        build_config(raw)
        return
    with pytest.raises(ValueError, match=message):
        build_config(raw)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="use key=value"):
        parse_overrides(["steps"])


def test_shipped_recipes_chain(tmp_path):
    """Every config in configs/ loads, and following load_from gives the paper's resolutions and KV layers."""
    files = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_"))
    cfgs = {p.stem: load_config(p) for p in files}
    assert {"shapes_alpha", "shapes_sigma_vae", "shapes_sigma_resup", "shapes_sigma_kv", "sigma_xl_512",
            "sigma_xl_1024", "sigma_xl_1024_kv", "sigma_xl_2k", "sigma_xl_2k_kv", "sigma_xl_4k"} <= set(cfgs)
    produced = {"pretrained/PixArt-XL-2-512x512.pth": PRESETS["XL_2_512"],
                "assets/demo/sigma": read_checkpoint(CONFIGS.parent / "assets/demo/sigma")[0]}  # the shipped Σ
    todo = dict(cfgs)
    while todo:
        ready = [n for n, c in todo.items() if c.stage.name == "from_scratch" or c.stage.load_from in produced]
        assert ready, f"configs whose load_from nothing produces: {sorted(todo)}"
        for name in ready:
            c = todo.pop(name)
            produced[c.output_dir] = model_config(c, produced.get(c.stage.load_from))
    got = {n: (produced[c.output_dir].resolution, produced[c.output_dir].kv_compress.layers) for n, c in cfgs.items()}
    deep = tuple(range(14, 28))
    assert got["shapes_alpha"] == got["shapes_sigma_vae"] == (128, ())
    assert got["shapes_sigma_resup"] == (256, ()) and got["shapes_sigma_kv"] == (256, (4, 5, 6, 7))
    assert produced["runs/shapes_sigma_kv"].pe_interpolation == 0.5
    assert got["sigma_xl_512"] == (512, ()) and got["sigma_xl_1024"] == (1024, ()) and got["sigma_xl_2k"] == (2048, ())
    assert got["sigma_xl_1024_kv"] == (1024, deep) and got["sigma_xl_2k_kv"] == (2048, deep)
    assert got["sigma_xl_4k"] == (4096, deep) and produced["runs/sigma_xl_4k"].pe_interpolation == 8.0
    assert cfgs["shapes_alpha"].data.long_caption_ratio == 0.0
    assert cfgs["shapes_sigma_kv"].data.long_caption_ratio == 0.6
    assert got["shapes_sigma_complete"] == got["shapes_sigma_kv"]  # the finetunes keep the shipped Σ's shape
    assert got["shapes_sigma_controlnet"] == got["shapes_sigma_kv"] and got["sigma_xl_controlnet"] == (1024, ())


def test_lr_schedules_warm_up_then_hold_or_anneal_to_zero():
    from train.optim import lr_factor

    assert [lr_factor(s, 4, 20) for s in (0, 3)] == [0.25, 1.0]
    assert lr_factor(19, 4, 20) == 1.0  # PixArt's constant schedule holds after warm-up
    cos = [lr_factor(s, 4, 20, "cosine") for s in range(21)]
    assert cos[:4] == [0.25, 0.5, 0.75, 1.0] and cos[12] == pytest.approx(0.5) and cos[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos[3:], cos[4:]))  # monotone after the warm-up
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and lr_factor(25, 0, 10, "cosine") == pytest.approx(0.0)


def test_cpu_bf16_training_uses_the_math_attention_kernel():
    import torch

    from train.loop import attention_kernels

    cpu = torch.device("cpu")
    with attention_kernels(cpu, "bf16"):  # the only backend enabled inside is MATH
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with attention_kernels(cpu, "no"):
        assert torch.backends.cuda.flash_sdp_enabled()
