"""Tiny stand-ins for the training tests: random T5 + word-level tokenizer, a tiny VAE, coloured squares.

Imported by the other ``test_train_*`` files; its own tests check that the training code's builders
read these folders and that the encoders give what the loop expects.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from PIL import Image

WORDS = ["a", "red", "green", "blue", "yellow", "square", "on", "white", "black", "background", "small", "big",
         "in", "the", "middle", "corner", "left", "right", "of", "picture", "tall", "wide", "shape", "with"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
# (height, width): three aspect-ratio buckets at 64 px
SIZES = [(48, 48), (48, 48), (48, 48), (48, 48), (64, 32), (64, 32), (32, 64), (32, 64)]


def make_encoders(folder: Path, seed: int = 0, scaling: float = 0.5) -> Path:
    """A diffusers-style pipeline folder with ``tokenizer/``, ``text_encoder/`` (d_model 16) and ``vae/``."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder / "tokenizer")
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    t5.save_pretrained(folder / "text_encoder")
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=64, scaling_factor=scaling)
    vae.save_pretrained(folder / "vae")
    return folder


def make_images(folder: Path, sizes: list[tuple[int, int]] = SIZES, long: bool = True) -> Path:
    """Coloured squares on white with ``x.txt`` (short) and ``x.long.txt`` (long) captions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i, (h, w) in enumerate(sizes):
        colour = names[i % len(names)]
        im = Image.new("RGB", (w, h), "white")
        s = min(h, w) // 2
        im.paste(COLOURS[colour], (w // 4, h // 4, w // 4 + s, h // 4 + s))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} square")
        if long:
            (folder / f"img{i}.long.txt").write_text(f"a small {colour} square in the middle of a white "
                                                      f"picture with a {'tall' if h > w else 'wide'} shape")
    return folder


def write_config(path: Path, **cfg) -> Path:
    base = {"model": "tiny", "steps": 2, "batch_size": 2, "mixed_precision": "no", "save_every": 100,
            "log_every": 1, "seed": 0, "optim": {"warmup_steps": 0, "lr": 1e-3}}
    for key, value in cfg.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    base.setdefault("data", {})["num_workers"] = base.get("data", {}).get("num_workers", 0)
    path.write_text(yaml.safe_dump(base))
    return path


def test_builders_read_a_pipeline_folder(tmp_path):
    from train.encoders import build_text_encoder, build_vae

    folder = make_encoders(tmp_path / "enc")
    text = build_text_encoder(folder, torch.device("cpu"), max_tokens=4)
    y, mask, cut = text(["a red square", "a small red square in the middle of a white picture"])
    assert y.shape == (2, 4, 16) and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]] and cut == 1
    y, mask, cut = text(["a red", ""])
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]] and cut == 0  # "" is the lone end-of-sequence token
    vae = build_vae(folder / "vae", torch.device("cpu"))
    mean, std = vae.posterior(torch.zeros(1, 3, 48, 96))
    assert mean.shape == std.shape == (1, 4, 6, 12) and (std > 0).all() and vae.scaling == 0.5
