"""Every pair of features (bench/features.py's table) runs on one tiny random pipeline with a ControlNet and gives
finite latents, the asked number and size of images, and parameters that record each feature; where a reference
exists the pair equals it: a LoRA at scale 0 with a ControlNet is the ControlNet alone, a ControlNet at scale 0 with
img2img is img2img alone, a KV override of R=1 with any feature is that feature alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import CONTROL_DIT, make_tiny_pipeline

from bench.features import (
    BY_NAME,
    Inputs,
    features_for,
    images_per_prompt,
    pair_id,
    pairs,
    pipeline_needs,
    random_controlnet,
    random_lora,
    request_for,
    unrecorded,
)
from pixsigma.config import KVCompress
from pixsigma.controlnet_weights import save_controlnet
from pixsigma.pipeline import PixSigmaPipeline
from pixsigma.speed import chosen_backends, optimize
from pixsigma.weights import load_dit

PROMPT = "a red star above a blue ring"
SIZE = 64  # CONTROL_DIT's base resolution: 16 tokens, the cheapest shape every feature accepts
STEPS, SEED = 2, 7
FEATURES = features_for("cpu")
MIN_SNR = 60.0  # dB: "equal" up to the rounding of a different but equivalent summation order
DIFFERENT_BELOW = 50.0  # dB: a feature that acts moves the latents at least this far (tiny random models act weakly)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A CONTROL_DIT pipeline folder with a ControlNet (moved away from its zero init) in ``controlnet/`` and a
    random LoRA file beside it."""
    root = make_tiny_pipeline(tmp_path_factory.mktemp("compose"), config=CONTROL_DIT)
    dit = load_dit(root / "transformer")
    save_controlnet(random_controlnet(dit, seed=3), root / "controlnet")
    random_lora(dit, root.parent / "lora.safetensors", seed=4)
    return root


@pytest.fixture(scope="module")
def inputs(folder):
    return Inputs(SIZE, SIZE, str(folder.parent / "lora.safetensors"), KVCompress(2, (1, 2)))


@pytest.fixture(scope="module")
def pipes(folder):
    """One loaded pipeline per T5 precision, shared by every test of the module."""
    cache: dict = {}

    def get(t5: str | None) -> PixSigmaPipeline:
        if t5 not in cache:
            cache[t5] = PixSigmaPipeline.from_pretrained(str(folder), device="cpu", t5_precision=t5)
            assert cache[t5].controlnet is not None
        return cache[t5]

    return get


def run(pipes, combo, inputs: Inputs):
    """(result, the final latents, the SDPA choices its speed mode made) of ``combo`` at SIZE px, STEPS steps,
    the pipeline in the combo's speed mode."""
    speed, t5 = pipeline_needs(combo)
    pipe = pipes(t5)
    latents = []
    optimize(pipe.transformer, speed)
    try:
        res = pipe.generate(request_for(combo, inputs, prompt=PROMPT, steps=STEPS, seed=SEED),
                            callback=lambda i, n, lat: latents.append(lat))
        backends = chosen_backends(pipe.transformer)  # filled by the speed mode's forward, whenever it runs
    finally:
        optimize(pipe.transformer, "eager")
    return res, latents[-1], backends


def snr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB of ``b``'s power over the power of ``a - b`` (inf: bit for bit equal). Latents, not images: the tiny
    random VAE maps very different latents to nearly the same image."""
    assert a.shape == b.shape
    err = float((a.double() - b.double()).pow(2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float(b.double().pow(2).sum()) / err)


# Cheap pairs first; every compile pair last, so their recompiles come after the eager ones (and a time-out
# would still have run the rest).
PAIRS = sorted(pairs(FEATURES), key=lambda p: any(f.speed == "compile" for f in p))


@pytest.mark.parametrize("combo", PAIRS, ids=[pair_id(p) for p in PAIRS])
def test_pair_runs(pipes, inputs, combo):
    res, latents, backends = run(pipes, combo, inputs)
    assert torch.isfinite(latents).all()
    if pipeline_needs(combo)[0] != "eager":  # a speed mode changes how the DiT runs, never what it computes
        assert backends, "the DiT ran without the speed mode's forward"
        eager = run(pipes, [f for f in combo if f.group != "speed"], inputs)[1]
        assert snr(latents, eager) >= MIN_SNR
    assert latents.shape[0] == images_per_prompt(combo)
    assert len(res.images) == images_per_prompt(combo)
    assert all(im.size == (SIZE, SIZE) for im in res.images)
    assert unrecorded(combo, res.params, inputs) == []
    assert len({im.tobytes() for im in res.images}) == len(res.images)  # several images differ from each other


def test_lora_at_scale_zero_with_controlnet_is_controlnet_alone(pipes, inputs):
    cn, lora = BY_NAME["controlnet"], BY_NAME["lora"]
    one = run(pipes, [cn, lora], inputs)[1]  # first: a request without LoRAs must not inherit this one's
    alone = run(pipes, [cn], inputs)[1]
    zero = run(pipes, [cn, lora], replace(inputs, lora_scale=0.0))[1]
    assert snr(zero, alone) >= MIN_SNR
    assert snr(one, alone) < DIFFERENT_BELOW  # the LoRA does something: the check above can fail


def test_controlnet_at_scale_zero_with_img2img_is_img2img_alone(pipes, inputs):
    cn, edit = BY_NAME["controlnet"], BY_NAME["img2img"]
    alone = run(pipes, [edit], inputs)[1]
    zero = run(pipes, [cn, edit], replace(inputs, control_scale=0.0))[1]
    one = run(pipes, [cn, edit], inputs)[1]
    assert snr(zero, alone) >= MIN_SNR
    assert snr(one, alone) < DIFFERENT_BELOW


KV_PARTNERS = [f for f in FEATURES if f.group != "kv"]


@pytest.mark.parametrize("feature", KV_PARTNERS, ids=[f.name for f in KV_PARTNERS])
def test_kv_off_with_a_feature_is_the_feature_alone(pipes, inputs, feature):
    kv = BY_NAME["kv"]
    alone = run(pipes, [feature], inputs)[1]
    compressed = run(pipes, [feature, kv], inputs)[1]
    off = run(pipes, [feature, kv], replace(inputs, kv=KVCompress()))[1]
    assert snr(off, alone) >= MIN_SNR, feature.name
    assert snr(compressed, alone) < DIFFERENT_BELOW, feature.name  # R=2 does change it, and is undone after


def test_lora_scale_changes_reach_the_compiled_dit(pipes, inputs):
    """A compiled DiT reused across requests runs each request's LoRA scale, not the one it was compiled with."""
    lora, compiled = BY_NAME["lora"], BY_NAME["speed-compile"]
    for scale in (1.0, 0.5, 0.0, 1.0):
        got = run(pipes, [lora, compiled], replace(inputs, lora_scale=scale))[1]
        want = run(pipes, [lora], replace(inputs, lora_scale=scale))[1]
        assert snr(got, want) >= MIN_SNR, scale
