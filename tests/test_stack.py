"""The request stack (pixsigma.stack): request state scoped to the request and restored exactly (LoRAs, KV, the
ControlNet's KV) on success, error and cancel; the ControlNet's residuals at block level inside the DiT's own
forward, so a guidance interval and a speed mode compose with it."""

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pixsigma.config import KVCompress
from pixsigma.model.controlnet import ControlNet
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.speed import optimize

PROMPT = "a red star above a blue ring"
KV = KVCompress(2, (1,))


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A diffusers-layout LoRA (``transformer.…lora_A/B.weight``) on the tiny DiT's first block, large enough to
    change the image."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for block in (0, 1):
        for proj in ("attn1.to_q", "attn1.to_v", "attn1.to_out.0"):
            key = f"transformer.transformer_blocks.{block}.{proj}"
            sd[f"{key}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.5
    path = tmp_path_factory.mktemp("lora") / "big.safetensors"
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def fresh(tiny_pipeline):
    return PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")


@pytest.fixture
def used(tiny_pipeline):
    return PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")


def run(p, callback=None, **kw):
    return p.generate(GenerationRequest(PROMPT, steps=3, seed=5, width=64, height=64, **kw), callback)


def same(a, b) -> bool:
    return a.images[0].tobytes() == b.images[0].tobytes() and torch.equal(a.latents, b.latents)


def stop_at_2(step, total, latents):
    if step == 2:
        raise Cancelled


def test_a_requests_loras_and_kv_end_with_it(fresh, used, lora_file):
    want = run(fresh)
    a = run(used, loras=f"{lora_file}:1.0", kv=KV)
    assert not same(a, want) and a.params["loras"] == [{"path": lora_file, "scale": 1.0}]
    assert a.params["kv_compress"]["ratio"] == 2
    b = run(used)
    assert same(b, want) and "loras" not in b.params and b.params["kv_compress"]["ratio"] == 1
    assert used.loras.active == [] and used.transformer.config.kv_compress == KVCompress()
    with pytest.raises(Cancelled):  # a callback raising mid-loop (the app's cancel) restores it all too
        run(used, callback=stop_at_2, loras=f"{lora_file}:0.7", kv=KV)
    assert same(run(used), want)


def test_the_pipelines_own_loras_stay_and_a_request_can_turn_them_off(fresh, used, lora_file):
    used.set_loras(f"{lora_file}:0.5")
    fresh.set_loras(f"{lora_file}:0.5")
    try:
        own = run(fresh)
        assert same(run(used), own)  # req.loras None: the pipeline's own set
        none = run(used, loras=())
        used.set_loras(None)
        assert same(none, run(used))  # an empty set for this request only…
        used.set_loras(f"{lora_file}:0.5")
        assert same(run(used), own) and used.loras.active == [(lora_file, 0.5)]  # …the own set back after
        with pytest.raises(Cancelled):
            run(used, callback=stop_at_2, loras=())
        assert used.loras.active == [(lora_file, 0.5)] and same(run(used), own)
    finally:
        fresh.set_loras(None)


def _sketch(w: int = 64, h: int = 64) -> Image.Image:
    im = Image.new("RGB", (w, h), "black")
    ImageDraw.Draw(im).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline="white", width=3)
    return im


def _with_controlnet(p: PixSigmaPipeline) -> PixSigmaPipeline:
    net = ControlNet.from_base(p.transformer)
    with torch.no_grad():
        for i, prm in enumerate(net.parameters()):  # a trained-like ControlNet: its residuals change the image
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(i)))
    p.controlnet = net
    return p


CONTROL = {"control_image": _sketch(), "control_type": "raw"}


def test_controlnet_composes_with_the_guidance_interval(used):
    p = _with_controlnet(used)
    plain = run(p, **CONTROL)
    assert not same(plain, run(p))  # the ControlNet does something
    inter = run(p, guidance_interval=(0.0, 500.0), **CONTROL)  # was: TypeError … unexpected keyword 'control'
    assert not same(inter, plain) and inter.params["guidance_interval"] == [0.0, 500.0]
    assert same(run(p, guidance_interval=(0.0, 1000.0), **CONTROL), plain)  # every step inside: plain CFG
    assert same(run(p, guidance_interval=(0.0, 500.0), control_image=_sketch(), control_scale=0.0),
                run(p, guidance_interval=(0.0, 500.0)))  # scale 0 is the base exactly


def test_controlnet_runs_inside_the_speed_modes_forward_and_follows_a_kv_override(used, fresh):
    p = _with_controlnet(used)
    want = run(p, **CONTROL)
    own_kv = p.controlnet.kv
    kv = run(p, kv=KV, **CONTROL)
    assert not same(kv, want) and p.controlnet.kv == own_kv  # the copies compressed as the base, then back
    assert same(run(p, **CONTROL), want)
    optimize(p.transformer, "sdpa")
    try:
        hooks = []
        speed_forward = p.transformer.forward

        def spy(*args, **kwargs):
            hooks.append(kwargs.get("block_hook"))
            return speed_forward(*args, **kwargs)

        p.transformer.forward = spy
        fast = run(p, **CONTROL)
        assert len(hooks) == 3 and all(h is not None for h in hooks)  # the copies ran under the mode's forward
        assert torch.allclose(fast.latents, want.latents, atol=1e-4)
    finally:
        optimize(p.transformer, "eager")


@pytest.mark.parametrize("speed", ["eager", "sdpa"])
def test_cli_controlnet_with_a_guidance_interval_and_a_speed_mode(tiny_pipeline, tmp_path, speed):
    from pixsigma.cli import main as cli
    from pixsigma.controlnet_weights import save_controlnet
    from pixsigma.io import read_params
    from pixsigma.weights import load_dit

    _sketch().save(tmp_path / "sketch.png")
    save_controlnet(ControlNet.from_base(load_dit(tiny_pipeline)), tmp_path / "cn")
    out = tmp_path / "out.png"
    assert cli(["generate", PROMPT, "--model", str(tiny_pipeline), "--out", str(out), "--steps", "2", "--width", "64",
                "--height", "64", "--controlnet", str(tmp_path / "cn"), "--control", str(tmp_path / "sketch.png"),
                "--guidance-interval", "0", "500", "--speed", speed]) == 0
    params = read_params(out)
    assert params["guidance_interval"] == [0, 500] and params["control"]["scale"] == 1.0


def test_a_controlnets_copies_are_compiled_as_the_dits_blocks(used):
    from pixsigma.speed import match_blocks

    p = _with_controlnet(used)
    copies = [blk.copied_block for blk in p.controlnet.controlnet]
    optimize(p.transformer, "compile")  # torch.compile is lazy: nothing is compiled before a forward
    try:
        match_blocks(p.transformer, copies)
        compiled = [b._compiled_call_impl for b in copies]
        assert all(c is not None for c in compiled) and all(b._compiled_call_impl for b in p.transformer.blocks)
        match_blocks(p.transformer, copies)  # every request asks again: compiled once
        assert [b._compiled_call_impl for b in copies] == compiled
    finally:
        optimize(p.transformer, "eager")
    match_blocks(p.transformer, copies)
    assert all(b._compiled_call_impl is None for b in [*copies, *p.transformer.blocks])
