"""The trainer's frozen encoders: train.encoders reads a pipeline folder's tokenizer, T5 and VAE."""

import torch
from fixtures import make_encoders


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
