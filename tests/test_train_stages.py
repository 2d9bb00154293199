"""A tiny run of every stage, chained as in the paper: α from scratch -> new VAE -> res-up -> KV -> finetune."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import make_encoders, make_images, write_config

from pixsigma.config import PRESETS
from pixsigma.weights import load_dit
from train import encoders
from train.config import load_config
from train.extract import extract
from train.loop import train
from train.runfiles import read_status
from train.stages import model_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return {"root": root, "enc": make_encoders(root / "enc_alpha"),
            "enc2": make_encoders(root / "enc_sigma", seed=1, scaling=0.7), "imgs": make_images(root / "imgs")}


def _run(world, name, **cfg):
    path = write_config(world["root"] / f"{name}.yaml", output_dir=str(world["root"] / name), **cfg)
    return load_config(path), train(load_config(path))


def _no_builders(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a run with a feature cache built T5 or the VAE")

    monkeypatch.setattr(encoders, "build_text_encoder", refuse)
    monkeypatch.setattr(encoders, "build_vae", refuse)


def test_stage_chain(world, monkeypatch):
    root, enc, enc2, imgs = world["root"], world["enc"], world["enc2"], world["imgs"]
    online = {"source": str(imgs), "text_encoder": str(enc), "vae": str(enc)}

    # 1. from scratch, from images, with validation images decoded by the VAE
    _, res = _run(world, "alpha", stage="from_scratch", data=online, sample_every=2, sample_prompts=["a red square"],
                  sample_steps=2)
    status = read_status(root / "alpha")
    assert res["state"] == status["state"] == "finished" and status["step"] == status["total_steps"] == 2
    assert status["samples"] and all((root / "alpha" / "samples").glob("step_00000002_0.png"))
    assert set(res["exports"]) == {"final", "final_diffusers"}
    alpha = load_dit(root / "alpha" / "final")
    assert alpha.config.resolution == 64 and not alpha.config.kv_compress.active
    as_diffusers = load_dit(root / "alpha" / "final_diffusers").state_dict()
    assert all(torch.equal(v, as_diffusers[k]) for k, v in alpha.state_dict().items())

    # 2. VAE adaptation on a feature cache of the new VAE: T5 and the VAE are never built by the run
    cached = {"source": str(imgs), "cache": str(root / "cache_sigma"), "text_encoder": str(enc), "vae": str(enc2)}
    cfg = load_config(write_config(root / "sigma_vae.yaml", output_dir=str(root / "sigma_vae"), data=cached,
                                   stage={"name": "vae_adapt", "load_from": str(root / "alpha")}))
    with pytest.raises(FileNotFoundError, match="python -m train.extract"):
        train(cfg)  # no cache yet: told to extract first
    assert read_status(root / "sigma_vae")["state"] == "error"
    extract(cfg)
    index = json.loads((root / "cache_sigma" / "index.json").read_text())
    assert index["vae"]["scaling_factor"] == 0.7 and len(index["samples"]) == 8
    with monkeypatch.context() as m:
        _no_builders(m)
        _, res = _run(world, "sigma_vae", stage={"name": "vae_adapt", "load_from": str(root / "alpha")}, data=cached)
    assert res["state"] == "finished"

    # 3. res-up 64 -> 128 px: PE interpolation and base size follow, buckets are the 128 px ones
    _, res = _run(world, "sigma_128", stage={"name": "res_up", "load_from": str(root / "sigma_vae"),
                                             "resolution": 128}, data={**online, "vae": str(enc2)})
    up = load_dit(root / "sigma_128" / "final")
    assert (up.config.sample_size, up.config.pe_interpolation) == (16, 2.0)

    # 4. KV compression on layer 1: the conv keys are reported missing (average init), diffusers export skipped
    _, res = _run(world, "sigma_kv", stage={"name": "kv_compress", "load_from": str(root / "sigma_128"),
                                            "kv": {"ratio": 2, "layers": "1"}}, data={**online, "vae": str(enc2)})
    report = read_status(root / "sigma_kv")["load_report"]
    assert sorted(report["missing"]) == ["blocks.1.attn.norm.bias", "blocks.1.attn.norm.weight",
                                         "blocks.1.attn.sr.bias", "blocks.1.attn.sr.weight"]
    assert report["unexpected"] == [] and set(res["exports"]) == {"final"}
    kv = load_dit(root / "sigma_kv" / "final")
    assert kv.config.kv_compress.layers == (1,) and kv.config.kv_compress.ratio == 2

    # 5. finetune keeps the loaded model (KV included), here from a checkpoint folder
    ckpt = next((root / "sigma_kv" / "checkpoints").iterdir())
    _, res = _run(world, "sigma_ft", stage={"name": "finetune", "load_from": str(ckpt)},
                  data={**online, "vae": str(enc2)})
    ft = load_dit(root / "sigma_ft" / "final")
    assert ft.config == kv.config
    before = kv.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in ft.state_dict().items())  # it trained


def test_stage_mistakes_are_named(world):
    base = {"data": {"source": str(world["imgs"])}}
    cfg = load_config(write_config(world["root"] / "bad1.yaml", stage={"name": "finetune", "load_from": "x",
                                                                       "resolution": 128}, **base))
    with pytest.raises(ValueError, match="changing resolution is the res_up stage"):
        model_config(cfg, PRESETS["tiny"])  # checked once the loaded model is known
    cfg = load_config(write_config(world["root"] / "bad5.yaml", stage={"name": "res_up", "load_from": "x",
                                                                       "resolution": 64}, **base))
    with pytest.raises(ValueError, match="must differ"):
        model_config(cfg, PRESETS["tiny"])
    cfg = load_config(write_config(world["root"] / "bad6.yaml", stage="from_scratch", model="tiny",
                                   model_args={"depht": 2}, **base))
    with pytest.raises(ValueError, match=r"unknown model_args \['depht'\]; accepted: .*'depth'"):
        model_config(cfg, None)
    with pytest.raises(ValueError, match="stage.load_from"):
        load_config(write_config(world["root"] / "bad2.yaml", stage="res_up", **base))
    with pytest.raises(ValueError, match="unknown optim keys"):
        load_config(write_config(world["root"] / "bad3.yaml", stage="from_scratch", optim={"lrr": 1}, **base))
    with pytest.raises(ValueError, match="only used by the kv_compress"):
        load_config(write_config(world["root"] / "bad4.yaml", stage={"name": "finetune", "load_from": "x",
                                                                     "kv": {"ratio": 2, "layers": [1]}}, **base))
