"""The demo's tokenizer, T5 encoder and VAEs: round trips, offline loading, shapes, determinism."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from pixsigma.text import encode_text, unknown_words
from shapes.build_parts import build_parts
from shapes.text_encoder import MAX_LENGTH, build_tokenizer
from shapes.vae import VAE_SPECS, VAESpec
from shapes.world import long_caption, sample_scene, scene_rng


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
    metrics = build_parts(out, seed=3, t5_steps=2, vae_steps={"alpha": 2, "sigma": 2},
                          decoder_steps={"sigma": 2}, heldout=4, log=lambda s: None)
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
    emb, mask = encode_text(tok, t5, ["a red star", "two blue rings"], MAX_LENGTH)
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


def test_vae_latent_alignment_pulls_latents_to_the_reference():
    """align_weight > 0 adds the latent-mean MSE to a frozen reference VAE (the aligned VAE-Σ trial)."""
    from dataclasses import replace

    from shapes.vae import build_vae, heldout_images, train_vae

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


def _tiny_refine_spec(**kw) -> VAESpec:
    return VAESpec(block_out_channels=(8, 8, 8, 8), steps=60, batch_size=2, sizes=((64, 64),), lr=3e-3,
                   decoder_sizes=((64, 64),), decoder_lr=2e-3, **kw)


@torch.no_grad()
def _noisy_decode_error(vae, x: torch.Tensor, noise: float) -> float:
    z = vae.encode(x).latent_dist.mode()
    gen = torch.Generator().manual_seed(7)
    z = z + noise * z.std() * torch.randn(z.shape, generator=gen)
    return float((vae.decode(z).sample - x).abs().mean())


def test_decoder_refinement_keeps_the_encoder_and_learns_to_decode_noisy_latents():
    """Phase 2 trains only post_quant_conv + decoder: encode() is unchanged bit for bit (a DiT trained on the
    latents needs no retraining) while decoding latents with DiT-like errors gets better."""
    from dataclasses import replace

    from shapes.vae import heldout_images, refine_decoder, train_vae

    spec = _tiny_refine_spec(decoder_steps=80, decoder_noise=0.5)
    x = heldout_images(4, size=64)
    vae, info = train_vae(replace(spec, decoder_steps=0), seed=0, heldout=x)
    assert "decoder_steps" not in info and "psnr_db_phase1" not in info
    enc = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    dec = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    before = _noisy_decode_error(vae, x, 0.3)
    out = refine_decoder(vae, spec, seed=0)
    assert out["decoder_steps"] == 80
    after = _noisy_decode_error(vae, x, 0.3)
    sd = vae.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in enc.items())
    assert any(not torch.equal(sd[k], v) for k, v in dec.items())
    assert after < 0.9 * before, (before, after)
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="decoder_steps >= 1"):
        refine_decoder(vae, replace(spec, decoder_steps=0))
    # both phases in one call, as build_parts runs them, is the same VAE as phase 1 then refine_decoder
    both, info = train_vae(spec, seed=0, heldout=x)
    assert info["decoder_steps"] == 80 and info["psnr_db_phase1"] > 0
    assert all(torch.equal(a, b) for a, b in zip(both.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(ValueError, match="decoder_steps and decoder_noise must be >= 0"):
        replace(spec, decoder_noise=-0.1)


def test_refine_built_decoder_swaps_the_folder_and_refuses_a_second_pass(tmp_path):
    from dataclasses import replace

    from shapes.build_parts import needs_refinement, refine_built_decoder
    from shapes.vae import save_vae, train_vae

    spec = _tiny_refine_spec(decoder_steps=3, decoder_noise=0.3)
    vae, _ = train_vae(replace(spec, decoder_steps=0), seed=0)
    folder = tmp_path / "vae_sigma"
    save_vae(vae, folder, {"name": "VAE-Σ", "psnr_db": 10.0})
    assert needs_refinement(folder, spec) and not needs_refinement(folder, replace(spec, decoder_steps=0))
    enc_before = load_file(folder / "diffusion_pytorch_model.safetensors")
    m = refine_built_decoder(folder, spec, heldout=2, log=lambda s: None)
    assert m["decoder_steps"] == 3 and m["psnr_db_phase1"] == 10.0 and m["spec"]["decoder_noise"] == 0.3
    assert json.loads((folder / "metrics.json").read_text())["decoder_steps"] == 3
    assert "_name_or_path" not in json.loads((folder / "config.json").read_text())  # no path of this machine
    enc_after = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(enc_after[k], v) for k, v in enc_before.items() if k.startswith("encoder."))
    assert not needs_refinement(folder, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_sigma"]  # no temp or old folder left
    with pytest.raises(ValueError, match="already refined"):
        refine_built_decoder(folder, spec, heldout=2, log=lambda s: None)
    with pytest.raises(ValueError, match="block_out_channels"):
        (folder / "metrics.json").write_text(json.dumps({"psnr_db": 1.0}))
        refine_built_decoder(folder, VAE_SPECS["sigma"], heldout=2, log=lambda s: None)
    with pytest.raises(ValueError, match="not a VAE built by build_parts"):
        refine_built_decoder(tmp_path, spec, heldout=2, log=lambda s: None)
