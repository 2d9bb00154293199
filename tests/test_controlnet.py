"""The ControlNet-Transformer against a reference of the published design written here from its description
(``ControlPixArtHalf``), with random weights trained away from zero; the zero-init property; KV compression in
the base and in the copies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fixtures import CONTROL_DIT, random_dit
from torch import nn

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.model.controlnet import (
    ControlledDiT,
    ControlNet,
    ControlNetConfig,
    ControlNetMismatch,
    controlled_forward,
    trainable_copy,
)
from pixsigma.model.embeddings import sincos_pos_embed, unpatchify


class RefCopy(nn.Module):
    """One copied block as the design describes it."""

    def __init__(self, block: nn.Module, index: int, dim: int):
        super().__init__()
        self.copied_block = copy.deepcopy(block)
        if index == 0:
            self.before_proj = nn.Linear(dim, dim)
        self.after_proj = nn.Linear(dim, dim)
        self.index = index

    def forward(self, x, y, t6, mask, hw, c):
        if self.index == 0:
            c = self.copied_block(x + self.before_proj(c), y, t6, mask, hw)
        else:
            c = self.copied_block(c, y, t6, mask, hw)
        return c, self.after_proj(c)


class RefControlPixArtHalf(nn.Module):
    def __init__(self, base, n: int):
        super().__init__()
        self.base_model = base
        self.controlnet = nn.ModuleList(RefCopy(base.blocks[i], i, base.config.hidden_size) for i in range(n))

    def forward(self, x, t, y, mask, control, scale=1.0):
        m, cfg = self.base_model, self.base_model.config
        h, w = x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size
        pos = sincos_pos_embed(cfg.hidden_size, h, w, cfg.base_size, cfg.pe_interpolation)
        c = m.x_embedder(control) + pos
        x = m.x_embedder(x) + pos
        t_emb = m.t_embedder(t)
        t6 = m.t_block(t_emb)
        y = m.y_embedder(y)
        x = m.blocks[0](x, y, t6, mask, (h, w))
        n = len(self.controlnet)
        for i in range(1, n + 1):
            c, c_skip = self.controlnet[i - 1](x, y, t6, mask, (h, w), c)
            x = m.blocks[i](x + scale * c_skip, y, t6, mask, (h, w))
        for i in range(n + 1, len(m.blocks)):
            x = m.blocks[i](x, y, t6, mask, (h, w))
        return unpatchify(m.final_layer(x, t_emb), h, w, cfg.patch_size, cfg.out_channels)


def _inputs(batch: int = 2, side: int = 8, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.tensor([500.0, 20.0][:batch])
    y = torch.randn(batch, 5, 16, generator=g)
    mask = torch.ones(batch, 5)
    mask[0, 3:] = 0
    control = torch.randn(batch, 4, side, side, generator=g)
    return x, t, y, mask, control


def _trained_reference(base, n: int, seed: int = 7) -> RefControlPixArtHalf:
    """The reference with every ControlNet weight moved away from its init (zero projections hide bugs)."""
    ref = RefControlPixArtHalf(base, n)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref.eval()


@pytest.mark.parametrize("kv", [KVCompress(), KVCompress(2, (0, 1, 2, 3))])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_equals_reference_of_the_design(kv, scale):
    base = random_dit(CONTROL_DIT.with_kv(kv), seed=1)
    ref = _trained_reference(base, 2)
    net = ControlNet(ControlNetConfig.for_base(base.config, 2), base.config)
    net.load_state_dict({f"controlnet.{k}": v for k, v in ref.controlnet.state_dict().items()})
    assert all(float(b.after_proj.weight.detach().abs().sum()) > 0 for b in net.controlnet)
    assert float(net.controlnet[0].before_proj.weight.detach().abs().sum()) > 0
    x, t, y, mask, control = _inputs()
    with torch.no_grad():
        want = ref(x, t, y, mask.bool(), control, scale)
        got = controlled_forward(base, net, x, t, y, mask, control, scale)
        got_wrapped = ControlledDiT(base, net)(x, t, y, mask, control=control, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got, got_wrapped)
    assert not torch.allclose(got, base(x, t, y, mask), atol=1e-4)  # the control does something


def test_untrained_controlnet_gives_the_base_output_exactly():
    base = random_dit(CONTROL_DIT, seed=2)
    net = ControlNet.from_base(base)
    assert net.config.num_copies == 2  # half the depth
    x, t, y, mask, control = _inputs()
    with torch.no_grad():
        assert torch.equal(controlled_forward(base, net, x, t, y, mask, control, 2.0), base(x, t, y, mask))
        assert torch.equal(controlled_forward(base, net, x, t, y, mask, None), base(x, t, y, mask))


def test_copies_start_as_the_base_blocks_and_only_they_train():
    base = random_dit(CONTROL_DIT.with_kv(KVCompress(2, (1,))), seed=4)
    net = trainable_copy(base, 3)
    for i, blk in enumerate(net.controlnet):
        own = base.blocks[i].state_dict()
        assert all(torch.equal(v, own[k]) for k, v in blk.copied_block.state_dict().items())
    assert "controlnet.1.copied_block.attn.sr.weight" in net.state_dict()  # KV weights copied too
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert sorted(k for k in net.state_dict() if "proj" in k and "copied" not in k) == [
        "controlnet.0.after_proj.bias", "controlnet.0.after_proj.weight", "controlnet.0.before_proj.bias",
        "controlnet.0.before_proj.weight", "controlnet.1.after_proj.bias", "controlnet.1.after_proj.weight",
        "controlnet.2.after_proj.bias", "controlnet.2.after_proj.weight"]


def test_copies_follow_the_base_kv_compression():
    base = random_dit(CONTROL_DIT, seed=5)
    ref = _trained_reference(base, 2)
    net = ControlNet(ControlNetConfig.for_base(base.config, 2), base.config)
    net.load_state_dict({f"controlnet.{k}": v for k, v in ref.controlnet.state_dict().items()})
    kv = KVCompress(2, (0, 1, 2, 3), "pool")
    base.set_kv_compress(kv)
    for blk in ref.controlnet:  # the reference copies compress as their base layers now do
        blk.copied_block.attn.kv_ratio, blk.copied_block.attn.kv_operator = 2, "pool"
    x, t, y, mask, control = _inputs()
    with torch.no_grad():
        got = controlled_forward(base, net, x, t, y, mask, control)
        want = ref(x, t, y, mask.bool(), control)
    assert [b.copied_block.attn.kv_ratio for b in net.controlnet] == [2, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mismatched_base_and_bad_configs_are_refused():
    cfg = ControlNetConfig(32, 4, 2)
    with pytest.raises(ControlNetMismatch, match="made for a base of width 32; this model has width 64"):
        cfg.check_base(DiTConfig(depth=4, hidden_size=64, num_heads=2))
    with pytest.raises(ControlNetMismatch, match="made for a base of depth 4; this model has depth 6"):
        cfg.check_base(DiTConfig(depth=6, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match=r"num_copies must be in 1-3 for a 4-block base .* got 4"):
        ControlNetConfig(32, 4, 4)
    with pytest.raises(ValueError, match="unknown ControlNetConfig fields"):
        ControlNetConfig.from_dict({"base_hidden_size": 32, "base_depth": 4, "num_copies": 2, "x": 1})
    base = random_dit(CONTROL_DIT)
    net = ControlNet.from_base(base)
    x, t, y, mask, _ = _inputs()
    with pytest.raises(ValueError, match=r"control latent \(4, 4\) does not match the image latent \(8, 8\)"):
        controlled_forward(base, net, x, t, y, mask, torch.zeros(2, 4, 4, 4))


# -- the pipeline and the CLI -----------------------------------------------------------------------------------
def _sketch(w: int = 64, h: int = 64):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), "black")
    ImageDraw.Draw(im).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline="white", width=2)
    return im


def test_pipeline_untrained_controlnet_gives_the_base_image_exactly(tiny_pipeline, pipe):
    from pixsigma.pipeline import GenerationRequest

    pipe.controlnet = ControlNet.from_base(pipe.transformer)
    try:
        plain = pipe.generate(GenerationRequest("a red star", steps=3, seed=1, width=64, height=64))
        ctl = pipe.generate(GenerationRequest("a red star", steps=3, seed=1, width=64, height=64,
                                              control_image=_sketch(), control_type="raw", control_scale=1.5))
        assert ctl.images[0].tobytes() == plain.images[0].tobytes()
        assert ctl.control_map is not None and ctl.control_map.size == (256, 256)  # the bucket it was made at
        assert ctl.params["control"] == {"type": "raw", "scale": 1.5} and "control" not in plain.params
        with torch.no_grad():
            for p in pipe.controlnet.parameters():
                p.add_(0.05)
        seen = []
        for ctl_img in (None, _sketch()):
            pipe.generate(GenerationRequest("a red star", steps=3, seed=1, width=64, height=64, control_image=ctl_img,
                                            control_type="raw"), callback=lambda i, n, lat: seen.append(lat))
        assert not torch.equal(seen[2], seen[5])  # a trained ControlNet changes the latents
        wide = pipe.generate(GenerationRequest("a red star", steps=1, seed=1, width=64, height=64,
                                               control_image=_sketch(128, 64)))
        assert wide.warnings == ["control image 128x64 has another aspect ratio than the generated 256x256: "
                                 "resized to cover it and centre-cropped"]
    finally:
        pipe.controlnet = None
    with pytest.raises(ValueError, match="this model has no ControlNet"):
        pipe.generate(GenerationRequest("a red star", steps=1, control_image=_sketch()))


def test_bad_control_requests_are_refused_before_any_work():
    from pixsigma.pipeline import GenerationRequest

    with pytest.raises(ValueError, match="unknown control type 'hed'; accepted: canny, canny-thick, regions, raw"):
        GenerationRequest("x", control_image=_sketch(), control_type="hed")
    with pytest.raises(ValueError, match="control scale must be a number in 0-4"):
        GenerationRequest("x", control_image=_sketch(), control_scale=9.0)
    with pytest.raises(ValueError, match="control_image must be a PIL image or None, got str"):
        GenerationRequest("x", control_image="sketch.png")


def test_condition_makers():
    from pixsigma.control import THICK_EDGE_WIDTH, canny, canny_edges, canny_thick, control_map, regions

    edges = canny_edges(_sketch())
    assert edges.dtype == torch.bool and 20 < int(edges.sum()) < 300  # a thin outline, not a filled area
    assert not edges[:10].any()  # nothing where the image is flat
    assert canny(_sketch()).mode == "RGB"
    thick = np.asarray(canny_thick(_sketch()))[..., 0] > 0
    assert thick[edges.numpy()].all() and thick.sum() > 2 * int(edges.sum())  # the same edges, wider
    assert thick[32].sum() >= 2 * THICK_EDGE_WIDTH  # the middle row crosses two vertical edges, each this wide
    flat = regions(_sketch())
    assert set(flat.getdata()) <= {(0, 0, 0), (255, 255, 255)}
    cmap, warnings = control_map(_sketch(100, 50), "raw", 64, 64)
    assert cmap.size == (64, 64) and "another aspect ratio" in warnings[0]


def test_cli_control_options(tiny_pipeline, tmp_path, capsys):
    from pixsigma.cli import main as cli
    from pixsigma.controlnet_weights import save_controlnet, trained_control_type
    from pixsigma.io import read_params
    from pixsigma.weights import load_dit

    sketch = tmp_path / "sketch.png"
    _sketch().save(sketch)
    save_controlnet(ControlNet.from_base(load_dit(tiny_pipeline)), tmp_path / "cn")
    out = tmp_path / "out.png"
    assert cli(["generate", "a red star", "--model", str(tiny_pipeline), "--out", str(out), "--steps", "1",
                "--width", "64", "--height", "64", "--controlnet", str(tmp_path / "cn"), "--control", str(sketch),
                "--control-type", "regions", "--control-scale", "0.5"]) == 0
    assert read_params(out)["control"] == {"type": "regions", "scale": 0.5}
    trained = ControlNet.from_base(load_dit(tiny_pipeline))
    trained.control_type = "canny-thick"  # a folder that says what it was trained on sets the default type
    save_controlnet(trained, tmp_path / "thick")
    assert trained_control_type(tmp_path / "thick") == "canny-thick" and trained_control_type(tmp_path / "cn") is None
    assert cli(["generate", "a red star", "--model", str(tiny_pipeline), "--out", str(out), "--steps", "1",
                "--width", "64", "--height", "64", "--controlnet", str(tmp_path / "thick"), "--control",
                str(sketch)]) == 0
    assert read_params(out)["control"] == {"type": "canny-thick", "scale": 1.0}
    assert cli(["generate", "x", "--model", str(tiny_pipeline), "--out", str(out), "--control",
                str(tmp_path / "none.png")]) == 2
    assert "--control" in capsys.readouterr().err
    assert cli(["generate", "x", "--model", str(tiny_pipeline), "--out", str(out), "--control", str(sketch)]) == 2
    assert "this model has no ControlNet" in capsys.readouterr().err
    assert cli(["generate", "x", "--model", str(tiny_pipeline), "--out", str(out), "--control-scale", "2"]) == 2
    assert "need --control IMAGE" in capsys.readouterr().err
