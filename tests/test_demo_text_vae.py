"""The demo's tokenizer, T5 encoder and VAEs: round trips, offline loading, shapes, determinism."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from pixsigma.demo import DEMO_DIR
from pixsigma.demo.build_parts import build_parts
from pixsigma.demo.text_encoder import build_tokenizer, encode, unknown_words
from pixsigma.demo.vae import VAE_SPECS, VAESpec
from pixsigma.demo.world import long_caption, sample_scene, scene_rng


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As build_parts' CLI does: on a shared CPU, two spinning OpenMP threads run these 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts")
    metrics = build_parts(out, seed=3, t5_steps=2, vae_steps={"alpha": 2, "sigma": 2}, heldout=4, log=lambda s: None)
    return out, metrics


def test_tokenizer_round_trip_pads_and_appends_eos(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    enc = loaded(["a red star"], padding="max_length", max_length=80, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == enc.attention_mask.shape == (1, 80)
    ids = enc.input_ids[0, :4].tolist()
    assert ids[-1] == 1 and loaded.convert_ids_to_tokens(ids) == ["a", "red", "star", "</s>"]
    assert enc.attention_mask[0].sum() == 4 and (enc.input_ids[0, 4:] == 0).all()
    text = long_caption(sample_scene(scene_rng("train", 0, 2))).lower()
    ids = loaded(text).input_ids
    assert loaded.decode(ids, skip_special_tokens=True).replace(" .", ".") == text
    long = loaded(["red " * 200], padding="max_length", max_length=80, truncation=True).input_ids[0]
    assert len(long) == 80 and long[-1] == 1  # truncation keeps </s>


def test_unknown_words_are_reported_not_dropped():
    tok = build_tokenizer()
    assert unknown_words(tok, "A Red star next to a zebra, and a UNICORN!") == ["zebra", "unicorn", "!"]
    assert unknown_words(tok, long_caption(sample_scene(5))) == []
    assert tok("a zebra").input_ids == [tok.get_vocab()["a"], 2, 1]


def test_saved_parts_load_offline_with_the_right_shapes(tiny_parts, monkeypatch):
    out, metrics = tiny_parts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(out / "text_encoder", local_files_only=True)
    assert t5.config.d_model == 128 and t5.dtype == torch.float32
    emb, mask = encode(tok, t5, ["a red star", "two blue rings"])
    assert emb.shape == (2, 80, 128) and mask.shape == (2, 80) and mask.sum(1).tolist() == [4, 4]
    for name in ("alpha", "sigma"):
        vae = AutoencoderKL.from_pretrained(out / f"vae_{name}", local_files_only=True)
        assert vae.dtype == torch.float32  # stored fp16, upcast on load
        x = torch.rand(1, 3, 64, 96) * 2 - 1
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 4, 8, 12) and vae.decode(z).sample.shape == x.shape
        saved = json.loads((out / f"vae_{name}" / "metrics.json").read_text())
        assert saved["psnr_db"] == metrics[f"vae_{name}"]["psnr_db"]
        assert vae.config.scaling_factor == pytest.approx(1 / saved["latent_std"], rel=1e-3)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_build_is_deterministic_for_a_seed(tiny_parts, tmp_path):
    out, _ = tiny_parts
    again = tmp_path / "again"
    build_parts(again, seed=3, parts=("text_encoder", "vae_alpha"), t5_steps=2, vae_steps={"alpha": 2},
                heldout=4, log=lambda s: None)
    for part, file in (("text_encoder", "model.safetensors"), ("vae_alpha", "diffusion_pytorch_model.safetensors")):
        a, b = load_file(out / part / file), load_file(again / part / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown part"):
        build_parts(tmp_path, parts=("unet",))
    with pytest.raises(ValueError, match="multiples of 8"):
        VAESpec(block_out_channels=(16, 32, 30, 32), steps=1)
    assert VAE_SPECS["sigma"].block_out_channels > VAE_SPECS["alpha"].block_out_channels


@pytest.mark.skipif(not (DEMO_DIR / "vae_sigma" / "metrics.json").is_file(), reason="demo parts not built")
def test_shipped_parts_are_small_and_sigma_vae_is_better():
    sizes = {p: sum(f.stat().st_size for f in (DEMO_DIR / p).iterdir())
             for p in ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma")}
    assert sizes["text_encoder"] <= 3.2e6 and max(sizes["vae_alpha"], sizes["vae_sigma"]) <= 4.2e6
    alpha = json.loads((DEMO_DIR / "vae_alpha" / "metrics.json").read_text())
    sigma = json.loads((DEMO_DIR / "vae_sigma" / "metrics.json").read_text())
    assert sigma["psnr_db"] > alpha["psnr_db"] + 1.0
    t5 = T5EncoderModel.from_pretrained(DEMO_DIR / "text_encoder", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "tokenizer", local_files_only=True)
    emb, mask = encode(tok, t5, ["a red star"])
    assert emb.shape == (1, 80, 128) and torch.isfinite(emb).all()


def test_vae_latent_alignment_pulls_latents_to_the_reference():
    """align_weight > 0 adds the latent-mean MSE to a frozen reference VAE (the aligned VAE-Σ trial)."""
    from dataclasses import replace

    from pixsigma.demo.vae import build_vae, heldout_images, train_vae

    spec = VAESpec(block_out_channels=(8, 8, 8, 8), steps=150, batch_size=2, sizes=((64, 64),), lr=3e-3)
    torch.manual_seed(1)
    ref = build_vae(spec).eval().requires_grad_(False)
    with torch.no_grad():  # a reference whose latents sit far from where a fresh VAE's start
        ref.quant_conv.bias[:4] += 2.0
    x = heldout_images(4, size=64)

    def distance(vae) -> float:
        with torch.no_grad():
            return float(((vae.encode(x).latent_dist.mean - ref.encode(x).latent_dist.mode()) ** 2).mean())

    free, _ = train_vae(spec, seed=0)
    aligned, _ = train_vae(replace(spec, align_weight=10.0), seed=0, align_to=ref)
    d_free, d_aligned = distance(free), distance(aligned)
    assert d_aligned < 0.5 * d_free, (d_aligned, d_free)
    with pytest.raises(ValueError, match="align_weight 10.0 needs align_to"):
        train_vae(replace(spec, align_weight=10.0))
    with pytest.raises(ValueError, match="align_weight must be >= 0"):
        replace(spec, align_weight=-1.0)
