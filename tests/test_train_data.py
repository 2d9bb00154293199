"""Records, bucketed crops, the caption mix, and unreadable images being skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import make_images
from PIL import Image

from train.data import (
    DataStats,
    ImageCaptionDataset,
    Record,
    collate_images,
    load_crop,
    pick_long,
    read_records,
)


def test_folder_jsonl_and_metadata_sources(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48), (64, 32)])
    Image.new("RGB", (8, 8)).save(folder / "nocaption.png")
    stats = DataStats()
    recs = read_records(folder, stats)
    assert [r.path.name for r in recs] == ["img0.png", "img1.png"] and stats.missing_captions == 1
    assert recs[0].caption == "a red square" and recs[0].long_caption.startswith("a small red square")

    rows = [{"path": "img0.png", "caption": "short"}, {"file_name": "img1.png", "text": "t", "long_caption": "long"}]
    (folder / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = read_records(folder / "list.jsonl")
    assert recs == [Record(folder / "img0.png", "short"), Record(folder / "img1.png", "t", "long")]
    (folder / "metadata.jsonl").write_text((folder / "list.jsonl").read_text())
    assert read_records(folder) == recs  # a folder with metadata.jsonl uses it

    (folder / "bad.jsonl").write_text('{"path": "img0.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a row needs .* caption"):
        read_records(folder / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="neither a .jsonl file nor a folder"):
        read_records(tmp_path / "nowhere")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = make_images(tmp_path / "imgs", sizes=[(48, 48), (48, 48), (64, 32)])
    (folder / "img0.png").write_bytes(b"not a png at all")  # fails at the header scan
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    noise.save(folder / "img1.png")
    data = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(data[: len(data) // 2])  # header fine, pixels truncated
    ds = ImageCaptionDataset(read_records(folder), 64, 0.0, 0)
    assert len(ds) == 2 and ds.stats.skipped_images == 1
    items = [ds[0], ds[1]]
    assert items[0]["pixels"] is None and items[1]["pixels"].shape == (3, 96, 48)  # img1, then img2 (64x32)
    batch = collate_images(items)
    assert batch["failed"] == 1 and batch["pixels"].shape == (1, 3, 96, 48) and batch["index"].tolist() == [1]
    with pytest.raises(RuntimeError, match="every image of a batch failed"):
        collate_images([items[0]])
    for name in ("img1.png", "img2.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no readable images among 3 records"):
        ImageCaptionDataset(read_records(folder), 64, 0.0, 0)


def test_resize_to_cover_then_centre_crop(tmp_path):
    im = Image.new("RGB", (96, 48), (0, 0, 255))  # 48 tall, 96 wide, blue bands at both ends
    im.paste((255, 0, 0), (16, 0, 80, 48))  # red middle 64 px
    im.save(tmp_path / "x.png")
    out = load_crop(tmp_path / "x.png", (64, 64))  # cover: scale 4/3 -> 128x64, crop the middle 64
    assert out.shape == (3, 64, 64) and out.min() >= -1 and out.max() <= 1
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    assert torch.allclose(out[:, :, 4:-4], red.expand(3, 64, 56), atol=0.05)  # no blue left (bicubic edge aside)


def test_caption_mix_ratio_and_determinism():
    draws = [pick_long(True, 0.6, 0, epoch, i) for epoch in range(4) for i in range(500)]
    assert 0.56 < sum(draws) / len(draws) < 0.64
    assert draws == [pick_long(True, 0.6, 0, epoch, i) for epoch in range(4) for i in range(500)]
    assert draws != [pick_long(True, 0.6, 1, epoch, i) for epoch in range(4) for i in range(500)]
    assert not any(pick_long(False, 1.0, 0, 0, i) for i in range(50))  # no long caption: always the short one
    assert not any(pick_long(True, 0.0, 0, 0, i) for i in range(50))
