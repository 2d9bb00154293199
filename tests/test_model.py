"""The DiT: parity with diffusers' PixArtTransformer2DModel, KV compression, PE interpolation."""

from dataclasses import replace

import pytest
import torch
from fixtures import random_dit

from pixsigma.config import PRESETS, DiTConfig, KVCompress, parse_layers, pe_interpolation_for
from pixsigma.model.attention import compress_kv
from pixsigma.model.dit import PixArtDiT, _normal_like_xl
from pixsigma.model.embeddings import sincos_pos_embed
from pixsigma.weights import diffusers_config, to_diffusers_state_dict

SMALL = DiTConfig(depth=2, hidden_size=48, num_heads=2, caption_channels=16, sample_size=8, pe_interpolation=0.5)


def _inputs(b=2, h=12, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    y = torch.randn(b, 7, 16, generator=g)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])[:b]
    return x, torch.tensor([10, 900])[:b], y, mask


@pytest.mark.parametrize("micro", [False, True])
def test_forward_matches_diffusers(micro):
    from diffusers import PixArtTransformer2DModel

    cfg = DiTConfig(**{**SMALL.to_dict(), "kv_compress": KVCompress(), "micro_condition": micro})
    ours = random_dit(cfg)
    ref = PixArtTransformer2DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    x, t, y, mask = _inputs()
    kw = {}
    if micro:
        kw = {"resolution": torch.tensor([[96.0, 160.0]] * 2), "aspect_ratio": torch.tensor([[0.6]] * 2)}
    with torch.no_grad():
        a = ours(x, t, y, mask, **kw)
        b = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": kw.get("resolution"), "aspect_ratio": kw.get("aspect_ratio")},
                return_dict=False)[0]
    assert a.shape == (2, 8, 12, 20)
    assert a.abs().max() > 0.1  # a real signal, not zeros
    assert (a - b).abs().max().item() <= 1e-5


def test_mask_hides_padding_tokens():
    model = random_dit(SMALL)
    x, t, y, mask = _inputs(b=2)
    y2 = y.clone()
    y2[1, 3:] = torch.randn_like(y2[1, 3:]) * 100  # only masked tokens change
    with torch.no_grad():
        a, b = model(x, t, y, mask), model(x, t, y2, mask)
    assert torch.allclose(a[1], b[1], atol=1e-5)


def test_pe_interpolation_values():
    # The paper's values per base resolution.
    assert [pe_interpolation_for(r) for r in (256, 512, 1024, 2048, 4096)] == [0.5, 1, 2, 4, 8]
    assert PRESETS["XL_2_1024"].pe_interpolation == 2.0 and PRESETS["XL_2_1024"].base_size == 64
    # Position (row 0, col j): first half encodes x = j / (W / base) / pe.
    d, h, w, base, pe = 8, 4, 6, 3, 2.0
    pos = sincos_pos_embed(d, h, w, base, pe)[0]  # (h*w, d)
    x = torch.arange(w, dtype=torch.float64) / (w / base) / pe
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    expect = torch.cat([torch.sin(x[:, None] * omega), torch.cos(x[:, None] * omega)], dim=1).float()
    assert torch.allclose(pos[:w, : d // 2], expect, atol=1e-6)
    # Second half encodes the row: token (row 1, col 0) has y = 1 / (h / base) / pe.
    yv = torch.tensor(1 / (h / base) / pe, dtype=torch.float64)
    assert torch.allclose(pos[w, d // 2:], torch.cat([torch.sin(yv * omega), torch.cos(yv * omega)]).float())
    # A 2x larger grid at 2x pe spans the same positions (interpolation, not extrapolation).
    assert torch.allclose(sincos_pos_embed(d, 8, 8, 8, 2.0)[0].reshape(8, 8, d)[::2, ::2],
                          sincos_pos_embed(d, 4, 4, 4, 1.0)[0].reshape(4, 4, d), atol=1e-6)


def test_pos_embed_cached_per_shape():
    a = sincos_pos_embed(16, 5, 7, 4, 1.0)
    b = sincos_pos_embed(16, 5, 7, 4, 1.0)
    assert a.data_ptr() == b.data_ptr()  # computed once, not every step


def test_kv_ratio_one_equals_full_attention():
    full = random_dit(SMALL)
    r1 = PixArtDiT(SMALL.with_kv(KVCompress(ratio=1, layers=(0, 1))))
    r1.load_state_dict(full.state_dict())
    x, t, y, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(full(x, t, y, mask), r1(x, t, y, mask))


@pytest.mark.parametrize("ratio", [2, 3])
def test_avg_init_on_window_constant_keys_equals_no_compression(ratio):
    # With keys/values constant over each R×R window, averaging them loses nothing: attention over the
    # merged tokens (each standing for R² equal ones) equals full attention. The conv's LayerNorm is set
    # to identity-like by checking the pool operator, and the conv init by comparing conv output to pool.
    from pixsigma.model.attention import SelfAttention, attention

    dim, heads, h, w = 12, 2, 3 * ratio, 2 * ratio
    att = SelfAttention(dim, heads, kv_ratio=ratio, kv_operator="conv")
    coarse = torch.randn(1, dim, h // ratio, w // ratio)
    grid = coarse.repeat_interleave(ratio, 2).repeat_interleave(ratio, 3)  # window-constant (1, C, h, w)
    tokens = grid.flatten(2).transpose(1, 2)  # (1, N, C)
    conv_out = att.sr(grid).flatten(2).transpose(1, 2)
    assert torch.allclose(conv_out, coarse.flatten(2).transpose(1, 2), atol=1e-6)  # Conv Avg Init = average
    q = torch.randn(1, h * w, dim)
    merged = compress_kv(tokens, (h, w), ratio, "pool")
    assert torch.allclose(attention(q, merged, merged, heads), attention(q, tokens, tokens, heads), atol=1e-5)


@pytest.mark.parametrize("operator", ["conv", "pool", "discard"])
@pytest.mark.parametrize("ratio,hw,expect", [(2, (6, 10), 15), (3, (6, 9), 6), (2, (5, 7), 12), (3, (4, 5), 4)])
def test_compress_shapes_non_square_and_non_divisible(operator, ratio, hw, expect):
    from pixsigma.model.attention import SelfAttention

    att = SelfAttention(8, 2, kv_ratio=ratio, kv_operator=operator)
    x = torch.randn(2, hw[0] * hw[1], 8)
    out = compress_kv(x, hw, ratio, operator, getattr(att, "sr", None), getattr(att, "norm", None))
    assert out.shape == (2, expect, 8)
    assert att(x, hw).shape == x.shape  # queries stay whole


def test_discard_keeps_window_corners():
    x = torch.arange(24.0).reshape(1, 24, 1)  # 4x6 grid, value = index
    out = compress_kv(x, (4, 6), 2, "discard")
    assert out.flatten().tolist() == [0, 2, 4, 12, 14, 16]


def test_kv_model_differs_only_in_compressed_layers():
    """Same weights with layer 1 compressed: given the same input, every other block computes exactly what it
    did; block 1 (Conv Avg Init: sr = 1/R², bias 0) computes something else, and so does the whole model."""
    cfg = replace(SMALL, depth=3)
    full = random_dit(cfg)
    kv = PixArtDiT(cfg.with_kv(KVCompress(2, (1,), "conv"))).eval()
    missing, unexpected = kv.load_state_dict(full.state_dict(), strict=False)
    assert sorted(missing) == ["blocks.1.attn.norm.bias", "blocks.1.attn.norm.weight", "blocks.1.attn.sr.bias",
                               "blocks.1.attn.sr.weight"] and not unexpected
    assert kv.blocks[1].attn.sr.weight.eq(0.25).all() and kv.blocks[1].attn.sr.bias.eq(0).all()
    inputs = []  # each block's arguments in the uncompressed model's forward pass
    hooks = [b.register_forward_pre_hook(lambda _, args: inputs.append(args)) for b in full.blocks]
    x, t, y, mask = _inputs()
    with torch.no_grad():
        out_full, out_kv = full(x, t, y, mask), kv(x, t, y, mask)
        for h in hooks:
            h.remove()
        same = [torch.equal(full.blocks[i](*args), kv.blocks[i](*args)) for i, args in enumerate(inputs)]
    assert same == [True, False, True]
    assert out_kv.shape == out_full.shape == (2, 8, 12, 20) and not torch.allclose(out_kv, out_full)


def test_set_kv_compress_round_trip():
    model = random_dit(SMALL.with_kv(KVCompress(2, (1,))))
    trained = model.blocks[1].attn.sr.weight.clone()
    x, t, y, mask = _inputs()
    with torch.no_grad():
        before = model(x, t, y, mask)
        model.set_kv_compress(KVCompress())
        off = model(x, t, y, mask)
        model.set_kv_compress(KVCompress(2, (1,)))
        after = model(x, t, y, mask)
    assert not torch.allclose(before, off)
    assert torch.equal(before, after) and torch.equal(model.blocks[1].attn.sr.weight, trained)


@pytest.mark.parametrize("kwargs,msg", [
    ({"ratio": 0}, "ratio must be an integer >= 1"),
    ({"ratio": 2, "operator": "max"}, "operator must be one of"),
    ({"ratio": 2, "layers": (-1,)}, "layers must be >= 0"),
])
def test_kv_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        KVCompress(**kwargs)


def test_config_errors_and_round_trip():
    with pytest.raises(ValueError, match="do not exist: the model has layers 0-1"):
        PRESETS["tiny"].with_kv(KVCompress(2, (5,)))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({"depth": 2, "bogus": 1})
    cfg = PRESETS["XL_2_2K_KV"]
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_layers("14-16,20") == (14, 15, 16, 20)
    with pytest.raises(ValueError, match="bad layer range"):
        parse_layers("9-3")


def test_xl_preset_has_paper_size():
    with torch.device("meta"):
        model = PixArtDiT(PRESETS["XL_2_1024"])
    assert 0.6e9 < model.num_params() < 0.62e9  # the paper's 0.6B


def test_init_keeps_pixarts_gain_at_every_width():
    """N(0, 0.02) at XL's fan-in (T5-XXL 4096 -> 1152), the same std * sqrt(fan_in) at the demo's 128 -> 192:
    a plain 0.02 there made the demo's captions ~5x quieter than XL's and the model ignored them."""
    torch.manual_seed(0)
    m = PixArtDiT(PRESETS["demo"])
    fc1, fc2 = m.y_embedder.y_proj.fc1.weight, m.y_embedder.y_proj.fc2.weight  # (192, 128), (192, 192)
    assert fc1.std().item() == pytest.approx(0.02 * (4096 / 128) ** 0.5, rel=0.05)
    assert fc2.std().item() == pytest.approx(0.02 * (1152 / 192) ** 0.5, rel=0.05)
    assert m.t_block[1].weight.std().item() == pytest.approx(0.02 * (1152 / 192) ** 0.5, rel=0.05)
    assert m.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)  # 256 frequencies everywhere
    big = torch.empty(1152, 4096)
    _normal_like_xl(big, 4096)
    assert big.std().item() == pytest.approx(0.02, rel=0.01)  # XL keeps PixArt's own init
