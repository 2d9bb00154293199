"""Image + caption data: records from a folder or JSONL, bucketed crops, the long/short caption mix.

Images are resized to cover their aspect-ratio bucket (``pixsigma.buckets.nearest_bucket`` of the stage's
base resolution) and centre-cropped to it. Unreadable images are skipped and counted: at the header scan
(missing, not an image) and at load (truncated data, dropped from their batch).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pixsigma.buckets import nearest_bucket
from pixsigma.image_load import load_image, open_checked
from pixsigma.sampling import from_pil

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
_PATH_KEYS, _CAPTION_KEYS = ("path", "file_name", "image"), ("caption", "text", "short_caption")


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str
    long_caption: str | None = None


@dataclass
class DataStats:
    """Counts a run reports (metrics log, status.json)."""

    skipped_images: int = 0
    missing_captions: int = 0
    truncated_captions: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_caption(path: Path) -> str:
    """A caption or JSONL file's text; one that is not UTF-8 is refused naming the file (not a bare decode error)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); captions and .jsonl files must be UTF-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    for n, line in enumerate(read_caption(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        img = next((row[k] for k in _PATH_KEYS if k in row), None)
        cap = next((row[k] for k in _CAPTION_KEYS if k in row), None)
        if img is None or cap is None:
            raise ValueError(f"{path}:{n}: a row needs an image path ({'/'.join(_PATH_KEYS)}) and a caption "
                             f"({'/'.join(_CAPTION_KEYS)}); got keys {sorted(row)}")
        out.append(Record(path.parent / img, str(cap), row.get("long_caption") or None))
    return out


def _read_folder(folder: Path, stats: DataStats) -> list[Record]:
    out = []
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        short, long = img.with_suffix(".txt"), img.with_suffix(".long.txt")
        if not short.is_file():
            stats.missing_captions += 1
            continue
        long_text = read_caption(long).strip() if long.is_file() else None
        out.append(Record(img, read_caption(short).strip(), long_text or None))
    return out


def read_records(source: str | Path, stats: DataStats | None = None) -> list[Record]:
    """Records of a ``.jsonl``, a folder with ``metadata.jsonl``, or an image folder with sidecar captions."""
    source, stats = Path(source), stats if stats is not None else DataStats()
    if source.is_file() and source.suffix == ".jsonl":
        return _read_jsonl(source)
    if source.is_dir():
        meta = source / METADATA
        return _read_jsonl(meta) if meta.is_file() else _read_folder(source, stats)
    raise FileNotFoundError(f"data source {source} is neither a .jsonl file nor a folder of images "
                            f"(x.png + x.txt [+ x.long.txt], or {METADATA})")


def pick_long(has_long: bool, long_ratio: float, seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` uses its long caption in ``epoch`` (probability ``long_ratio`` when it has
    one). A pure function of its arguments, so resumed and multi-worker runs pick the same."""
    return has_long and random.Random(f"{seed}:{epoch}:{index}").random() < long_ratio


def choose_caption(record: Record, long_ratio: float, seed: int, epoch: int, index: int) -> str:
    if pick_long(bool(record.long_caption), long_ratio, seed, epoch, index):
        return record.long_caption
    return record.caption


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF rotation, from the header only; over ``pixsigma.image_load.MAX_PIXELS`` refused."""
    with open_checked(path, str(path)) as im:
        w, h = im.size
        # EXIF orientation of camera formats (their EXIF is in the header; PNG's would cost a full decode)
        if im.format in ("JPEG", "MPO", "WEBP", "TIFF") and im.getexif().get(0x0112) in (5, 6, 7, 8):
            w, h = h, w  # rotated 90°: the pixels will be transposed
    return h, w


def load_crop(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (h, w), centre-crop to it -> (3, h, w) in [-1, 1]."""
    h, w = size
    im = load_image(path, str(path))  # the edge's loader: pixel budget, 16-bit scaled, EXIF rotation
    scale = max(h / im.height, w / im.width)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return from_pil([im.crop((left, top, left + w, top + h))])[0]


class ImageCaptionDataset(Dataset):
    """Bucketed images with their chosen caption; ``buckets[i]`` is sample i's (h, w) in px."""

    def __init__(self, records: list[Record], resolution: int, long_ratio: float, seed: int,
                 stats: DataStats | None = None):
        self.stats = stats if stats is not None else DataStats()
        self.records: list[Record] = []
        self.buckets: list[tuple[int, int]] = []
        for rec in records:
            try:
                h, w = image_size(rec.path)
            except (OSError, ValueError, Image.DecompressionBombError):  # missing, not an image, corrupt header
                self.stats.skipped_images += 1
                continue
            self.records.append(rec)
            self.buckets.append(nearest_bucket(h, w, resolution))
        if not self.records:
            raise ValueError(f"no readable images among {len(records)} records "
                             f"({self.stats.skipped_images} unreadable)")
        self.long_ratio, self.seed, self.epoch = long_ratio, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        caption = choose_caption(rec, self.long_ratio, self.seed, self.epoch, i)
        try:
            pixels = load_crop(rec.path, self.buckets[i])
        except (OSError, ValueError, SyntaxError):  # truncated or corrupt pixel data
            pixels = None
        return {"index": i, "pixels": pixels, "caption": caption}


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's samples, dropping the ones whose pixels failed to load (counted in ``failed``)."""
    good = [it for it in items if it["pixels"] is not None]
    if not good:
        raise RuntimeError(f"every image of a batch failed to load: samples {[it['index'] for it in items]}")
    return {"index": torch.tensor([it["index"] for it in good]),
            "pixels": torch.stack([it["pixels"] for it in good]),  # (B, 3, h, w)
            "captions": [it["caption"] for it in good], "failed": len(items) - len(good)}
