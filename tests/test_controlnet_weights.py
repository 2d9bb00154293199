"""ControlNet layouts: the official ControlPixArtHalf file (with and without base_model), diffusers' research
adapter folder, the pixsigma folder round trip, a pipeline folder's controlnet/, and the named refusals."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import CONTROL_DIT, random_dit
from safetensors.torch import save_file

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.controlnet_weights import (
    find_controlnet,
    load_controlnet,
    save_controlnet,
    save_official,
)
from pixsigma.model.controlnet import ControlNet, ControlNetMismatch, controlled_forward
from pixsigma.weights import to_diffusers_state_dict


def _trained(base, copies: int = 2, seed: int = 5) -> ControlNet:
    net = ControlNet.from_base(base, copies)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def _same(a: ControlNet, b: ControlNet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _out(base, net):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    y = torch.randn(1, 3, 16, generator=g)
    with torch.no_grad():
        return controlled_forward(base, net, x, torch.tensor([300.0]), y, None, c)


def test_pixsigma_folder_round_trip_and_fp16(tmp_path):
    base = random_dit(CONTROL_DIT)
    net = _trained(base)
    save_controlnet(net, tmp_path / "cn", extra={"train": {"steps": 1}})
    meta = json.loads((tmp_path / "cn" / "controlnet.json").read_text())
    assert meta["controlnet"] == {"base_hidden_size": 32, "base_depth": 4, "num_copies": 2}
    assert meta["train"] == {"steps": 1}
    _same(load_controlnet(tmp_path / "cn", base), net)
    save_controlnet(net, tmp_path / "half", torch.float16)
    half = load_controlnet(tmp_path / "half", base)  # loaded in the base's dtype
    assert half.controlnet[0].after_proj.weight.dtype == torch.float32
    torch.testing.assert_close(_out(base, half), _out(base, net), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_layout_with_or_without_base_model(tmp_path, with_base, suffix):
    base = random_dit(CONTROL_DIT)
    net = _trained(base, 3)
    path = save_official(net, tmp_path / f"control{suffix}", base if with_base else None)
    keys = torch.load(path, weights_only=True)["state_dict"].keys() if suffix == ".pth" else None
    if keys is not None:
        assert "controlnet.0.before_proj.weight" in keys and "controlnet.2.copied_block.attn.qkv.weight" in keys
        assert any(k.startswith("base_model.blocks.3.") for k in keys) == with_base
    loaded = load_controlnet(path, base)
    assert loaded.config.num_copies == 3
    _same(loaded, net)


def test_diffusers_research_adapter_folder(tmp_path):
    base = random_dit(CONTROL_DIT)
    net = _trained(base)
    sd: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(net.controlnet):
        block = {f"blocks.{i}.{k}": v for k, v in blk.copied_block.state_dict().items()}
        for k, v in to_diffusers_state_dict(block).items():  # transformer_blocks.{i}.attn1.to_q.weight …
            sd[f"controlnet_blocks.{i}.transformer_block.{k.split('.', 2)[2]}"] = v.contiguous()
        for name in ("before_proj", "after_proj"):
            if hasattr(blk, name):
                for k, v in getattr(blk, name).state_dict().items():
                    sd[f"controlnet_blocks.{i}.{name}.{k}"] = v
    folder = tmp_path / "adapter"
    folder.mkdir()
    assert "controlnet_blocks.1.transformer_block.attn1.to_k.weight" in sd
    assert "controlnet_blocks.0.transformer_block.ff.net.2.bias" in sd
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtControlNetAdapterModel",
                                                    "num_layers": 2}))
    _same(load_controlnet(folder, base), net)


def test_pipeline_folder_ships_its_controlnet(tmp_path):
    base = random_dit(CONTROL_DIT)
    net = _trained(base)
    (tmp_path / "model_index.json").write_text("{}")
    assert find_controlnet(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="ships no ControlNet"):
        load_controlnet(tmp_path, base)
    save_controlnet(net, tmp_path / "controlnet")
    assert find_controlnet(tmp_path) == tmp_path / "controlnet"
    _same(load_controlnet(tmp_path, base), net)


def test_kv_weights_follow_the_base(tmp_path):
    plain = random_dit(CONTROL_DIT)
    net = _trained(plain)
    save_controlnet(net, tmp_path / "cn")
    kv_base = random_dit(CONTROL_DIT.with_kv(KVCompress(2, (0, 1, 2, 3))))
    loaded = load_controlnet(tmp_path / "cn", kv_base)  # no KV weights in the file: average init
    assert loaded.controlnet[1].copied_block.attn.kv_ratio == 2
    assert "controlnet.1.copied_block.attn.sr.weight" in loaded.state_dict()


def test_wrong_width_or_depth_is_a_named_error(tmp_path):
    base = random_dit(CONTROL_DIT)
    net = _trained(base)
    save_controlnet(net, tmp_path / "cn")
    save_official(net, tmp_path / "with_base.pth", base)
    save_official(net, tmp_path / "bare.safetensors")
    wide = random_dit(DiTConfig(depth=4, hidden_size=64, num_heads=2, caption_channels=16, sample_size=8))
    deep = random_dit(CONTROL_DIT.__class__(**{**CONTROL_DIT.to_dict(), "depth": 6, "kv_compress": KVCompress()}))
    for path in (tmp_path / "cn", tmp_path / "with_base.pth", tmp_path / "bare.safetensors"):
        with pytest.raises(ControlNetMismatch, match="made for a base of width 32; this model has width 64"):
            load_controlnet(path, wide)
    for path in (tmp_path / "cn", tmp_path / "with_base.pth"):
        with pytest.raises(ControlNetMismatch, match="made for a base of depth 4; this model has depth 6"):
            load_controlnet(path, deep)
    shallow = random_dit(CONTROL_DIT.__class__(**{**CONTROL_DIT.to_dict(), "depth": 2, "kv_compress": KVCompress()}))
    with pytest.raises(ControlNetMismatch, match="copies 2 blocks; a base of depth 2 takes at most 1"):
        load_controlnet(tmp_path / "bare.safetensors", shallow)
    with pytest.raises(FileNotFoundError, match="not found or not a known layout"):
        load_controlnet(tmp_path / "nothing", base)
