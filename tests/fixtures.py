"""Tiny random PixArt pipelines saved in the real on-disk formats (no network, seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.model.dit import PixArtDiT
from pixsigma.sampling import PIXART_BETAS
from pixsigma.weights import save_diffusers_transformer, save_dit

WORDS = ("a red blue green star circle square ring triangle above below left right of the on small large big "
         "cat dog photo an in with and").split()
TINY_DIT = DiTConfig(depth=2, hidden_size=32, num_heads=2, caption_channels=16, max_tokens=300, sample_size=32,
                     pe_interpolation=0.5)


def make_tokenizer(folder: Path, words=WORDS):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_t5(folder: Path, vocab: int, d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    t5.save_pretrained(folder, safe_serialization=True)
    return t5


def make_vae(folder: Path):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


def random_dit(config: DiTConfig = TINY_DIT, seed: int = 0, scale: float = 0.05) -> PixArtDiT:
    """A DiT with every weight random (the default init zeroes outputs, which would hide bugs)."""
    torch.manual_seed(seed)
    model = PixArtDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model.eval()


def make_tiny_pipeline(folder: str | Path, kv: KVCompress | None = None, layout: str = "diffusers",
                       config: DiTConfig = TINY_DIT) -> Path:
    """A PixArt-Σ pipeline folder with random weights: diffusers layout, or pixsigma layout for a KV model."""
    from diffusers import DPMSolverMultistepScheduler

    folder = Path(folder)
    tok = make_tokenizer(folder / "tokenizer")
    make_t5(folder / "text_encoder", len(tok), config.caption_channels)
    make_vae(folder / "vae")
    DPMSolverMultistepScheduler(**{**PIXART_BETAS, "prediction_type": config.prediction_type}).save_pretrained(
        folder / "scheduler")
    dit = random_dit(config.with_kv(kv) if kv else config)
    if layout == "diffusers":
        save_diffusers_transformer(dit, folder / "transformer")
    else:
        save_dit(dit, folder / "transformer")
    index = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder": ["transformers", "T5EncoderModel"],
             "vae": ["diffusers", "AutoencoderKL"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
