"""The feature cache round-trips what T5 and the VAE give, and a cached run never builds them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fixtures import make_encoders, make_images, write_config

from train import encoders
from train.cache import FeatureCache, collate_cached
from train.config import load_config
from train.data import ImageCaptionDataset, load_crop, read_records
from train.extract import extract
from train.loop import train


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    enc = make_encoders(root / "enc")
    imgs = make_images(root / "imgs")
    (imgs / "broken.png").write_bytes(b"garbage")
    (imgs / "broken.txt").write_text("a red square")
    data = {"source": str(imgs), "cache": str(root / "cache"), "text_encoder": str(enc), "vae": str(enc),
            "max_tokens": 8, "shard_size": 3, "extract_batch_size": 2}
    cfg = load_config(write_config(root / "x.yaml", stage="from_scratch", data=data, output_dir=str(root / "run"),
                                   sample_every=1, sample_prompts=["a blue square", "a tall shape"], sample_steps=2))
    extract(cfg)
    return cfg, enc


def test_cache_round_trips_the_encoders(built):
    cfg, enc = built
    cache = FeatureCache(cfg.data.cache)
    index = json.loads((cache.folder / "index.json").read_text())
    # 8 images; the broken one skipped; the 8 long captions (16 tokens) cut at 8 tokens, the short ones not
    assert len(cache) == 8 and index["stats"] == {"skipped_images": 1, "missing_captions": 0,
                                                  "truncated_captions": 8}
    assert len(list(cache.folder.glob("shard_r0_*.safetensors"))) == 3  # 8 samples, 3 a shard
    assert cache.scaling == 0.5 and cache.resolution == 64

    text = encoders.build_text_encoder(enc, torch.device("cpu"), 8)
    vae = encoders.build_vae(enc, torch.device("cpu"))
    ds = ImageCaptionDataset(read_records(cfg.data.source), 64, 0.0, 0)
    by_source = {s["source"]: i for i, s in enumerate(cache.samples)}
    for rec, bucket in zip(ds.records, ds.buckets):
        i = by_source[str(rec.path)]
        assert cache.buckets[i] == bucket
        item = cache[i]
        mean, std = vae.posterior(load_crop(rec.path, bucket)[None])
        torch.testing.assert_close(item["mean"].float(), mean[0], atol=2e-3, rtol=2e-3)  # stored fp16
        torch.testing.assert_close(item["std"].float(), std[0], atol=2e-3, rtol=2e-3)
        y, mask, _ = text([rec.caption])
        assert item["y"].shape == (int(mask.sum()), 16)
        torch.testing.assert_close(item["y"].float(), y[0, : int(mask.sum())], atol=2e-3, rtol=2e-3)
    y_null, m_null = cache.null_caption()
    assert m_null.tolist() == [[1]] and y_null.shape == (1, 1, 16)
    y, mask = cache.prompts(["a tall shape", "a blue square"])
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="not in the feature cache"):
        cache.prompts(["a green square"])

    long_cache = FeatureCache(cfg.data.cache, long_ratio=1.0)
    batch = collate_cached([long_cache[0], cache[1]])
    assert batch["y"].shape == (2, 8, 16) and batch["mask"].sum(1).tolist() == [8, 4]  # long cut at 8; short 3+1
    with pytest.raises(ValueError, match="has base resolution 64, this run needs 128"):
        cache.check(128, 16, 4, 8)
    with pytest.raises(ValueError, match="has max tokens 8, this run needs 16"):
        cache.check(64, 16, 4, 16)


def test_a_cached_run_never_builds_t5_or_the_vae(built, monkeypatch):
    cfg, _ = built

    def refuse(*a, **k):
        raise AssertionError("built an encoder")

    monkeypatch.setattr(encoders, "build_text_encoder", refuse)
    monkeypatch.setattr(encoders, "build_vae", refuse)
    # with DataLoader workers (each opens its own shard handles) and gradient checkpointing
    result = train(replace(cfg, data=replace(cfg.data, num_workers=2), gradient_checkpointing=True))
    assert result["state"] == "finished"
    samples = sorted((cfg.run_dir / "samples").glob("*.png"))  # latent previews, no VAE
    assert [p.name for p in samples] == ["step_00000001_0.png", "step_00000001_1.png", "step_00000002_0.png",
                                         "step_00000002_1.png"]


def test_extract_refuses_to_overwrite(built):
    cfg, _ = built
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract(cfg)


def test_max_images_extracts_only_the_first_records(built, tmp_path):
    cfg, _ = built
    sub = replace(cfg, data=replace(cfg.data, cache=str(tmp_path / "sub"), max_images=3))
    extract(sub)
    cache = FeatureCache(sub.data.cache)
    first = {str(r.path) for r in read_records(cfg.data.source)[:3]}
    readable = {p for p in first if not p.endswith("broken.png")}  # the broken image is skipped, as in full
    assert {s["source"] for s in cache.samples} == readable and len(cache) < len(FeatureCache(cfg.data.cache))
