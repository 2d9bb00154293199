"""Weights in and out: original <-> diffusers keys, every on-disk layout, errors naming file and key."""

import json

import pytest
import torch
from fixtures import random_dit
from safetensors.torch import save_file

from pixsigma.cli import main as cli
from pixsigma.config import DiTConfig, KVCompress
from pixsigma.weights import (
    CheckpointError,
    from_diffusers_state_dict,
    infer_config,
    load_dit,
    load_state_dict_file,
    read_checkpoint,
    save_diffusers_transformer,
    save_dit,
    save_original,
    to_diffusers_state_dict,
)

# Head dim 72 like the released models, so shape inference can be tested exactly.
CFG = DiTConfig(depth=3, hidden_size=144, num_heads=2, caption_channels=24, sample_size=16, pe_interpolation=0.25)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_key_round_trip_and_names():
    sd = random_dit(CFG).state_dict()
    d = to_diffusers_state_dict(sd)
    assert "transformer_blocks.2.attn1.to_k.weight" in d and "adaln_single.linear.bias" in d
    assert "caption_projection.linear_2.weight" in d and "proj_out.weight" in d
    assert torch.equal(d["transformer_blocks.0.attn2.to_v.bias"], sd["blocks.0.cross_attn.kv_linear.bias"][144:])
    assert _same(from_diffusers_state_dict(d), sd)


def test_kv_model_refuses_diffusers_layout():
    sd = random_dit(CFG.with_kv(KVCompress(2, (2,)))).state_dict()
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attn\.sr.*cannot run in diffusers"):
        to_diffusers_state_dict(sd)


@pytest.mark.parametrize("fmt", ["pth_wrapped", "pth_bare", "safetensors"])
def test_original_files_load_with_inferred_architecture(tmp_path, fmt):
    model = random_dit(CFG.with_kv(KVCompress(2, (1, 2))))
    sd = model.state_dict()
    sd["y_embedder.y_embedding"] = torch.randn(300, 24)  # extras the official files carry
    sd["pos_embed"] = torch.randn(1, 64, 144)
    if fmt == "safetensors":
        path = tmp_path / "PixArt-Sigma-XL-2-512-MS.safetensors"
        save_file(sd, path)
    else:
        path = tmp_path / "PixArt-Sigma-XL-2-512-MS.pth"
        torch.save({"state_dict": sd} if fmt == "pth_wrapped" else sd, path)
    loaded = load_dit(path)
    c = loaded.config
    assert (c.depth, c.hidden_size, c.num_heads, c.caption_channels) == (3, 144, 2, 24)
    assert c.kv_compress == KVCompress(2, (1, 2)) and c.sample_size == 64 and c.pe_interpolation == 1.0  # "512"
    assert _same(loaded.state_dict(), model.state_dict())


def test_infer_config_defaults_to_1024_and_reads_micro_condition():
    sd = random_dit(DiTConfig(**{**CFG.to_dict(), "kv_compress": KVCompress(), "micro_condition": True})).state_dict()
    c = infer_config(sd, name="model.pth")
    assert c.micro_condition and c.resolution == 1024 and c.pe_interpolation == 2.0


def test_diffusers_folder_round_trip_loads_in_diffusers(tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = random_dit(CFG)
    save_diffusers_transformer(model, tmp_path / "t")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "t")
    assert ref.config.sample_size == 16 and ref.config.interpolation_scale == 0.25
    back = load_dit(tmp_path / "t")
    assert back.config == CFG and _same(back.state_dict(), model.state_dict())


def test_pixsigma_folder_stores_config(tmp_path):
    model = random_dit(CFG.with_kv(KVCompress(3, (0,), "conv")))
    save_dit(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "pixsigma.json").read_text())
    assert meta["dit"]["kv_compress"] == {"ratio": 3, "layers": [0], "operator": "conv"}
    assert not list((tmp_path / "m").glob("*.tmp"))
    cfg, sd = read_checkpoint(tmp_path / "m")
    assert cfg == model.config and _same(sd, model.state_dict())


def test_kv_override_on_load(tmp_path):
    model = random_dit(CFG)
    save_original(model, tmp_path / "m.safetensors")
    kv = KVCompress(2, (1,))
    loaded = load_dit(tmp_path / "m.safetensors", kv=kv)
    assert loaded.config.kv_compress == kv and loaded.blocks[1].attn.sr.weight.eq(0.25).all()


def test_missing_file_names_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*accepted: an original PixArt checkpoint"):
        load_state_dict_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="not a known layout; accepted"):
        read_checkpoint(tmp_path)


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*broken\.safetensors"):
        load_dit(bad)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cfg": {"f": print}}, path)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*evil\.pth"):
        load_state_dict_file(path)


def test_mismatched_checkpoint_names_first_key(tmp_path):
    sd = random_dit(CFG).state_dict()
    sd["blocks.1.mlp.fc2.bias"] = torch.zeros(7)
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: key 'blocks\.1\.mlp\.fc2\.bias' has shape \(7,\)"):
        load_dit(path)
    del sd["blocks.1.mlp.fc2.bias"]
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        load_dit(path)


def test_convert_cli(tmp_path, capsys):
    model = random_dit(CFG)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "PixArt-Sigma-XL-2-256x256.pth")
    assert cli(["convert", str(tmp_path / "PixArt-Sigma-XL-2-256x256.pth"), "--out", str(tmp_path / "d")]) == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["_class_name"] == "PixArtTransformer2DModel" and cfg["sample_size"] == 32
    assert cfg["interpolation_scale"] == 0.5
    assert _same(load_dit(tmp_path / "d").state_dict(), model.state_dict())  # the weights, converted whole
    kv = random_dit(CFG.with_kv(KVCompress(2, (2,))))
    torch.save(kv.state_dict(), tmp_path / "kv.pth")
    assert cli(["convert", str(tmp_path / "kv.pth"), "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "cannot run it" in err and "pixsigma folder" in err
    assert (tmp_path / "k" / "pixsigma.json").is_file()
