"""A user's own images for the ``finetune`` stage: checked before a run starts, handed to the trainer clean.

Accepted: a folder of images with ``x.txt`` captions beside them (optionally ``x.long.txt``), a ``.jsonl`` of
``{"image": …, "caption": …}`` rows (``path``/``file_name`` and ``text`` are read too; paths relative to the
file), a folder holding ``metadata.jsonl``, or a ``.zip`` of images with ``.txt`` captions (unpacked once, within
a budget: ``train.unzip``; its ``metadata.jsonl`` may name only files inside it). Every image is opened and
verified: unreadable ones are skipped and counted, one over the pixel budget refuses the source (naming it),
images without a caption are counted, a caption that is not UTF-8 is refused naming its file, and a source with no
captioned, readable image is refused with a ValueError saying what was found.
``write_clean_jsonl`` lists only the images that passed, so the trainer never meets a bad one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pixsigma.image_load import MAX_PIXELS, ImageTooLarge, open_checked
from pixsigma.io import atomic_write_text

from .data import IMAGE_EXTS, METADATA, DataStats, Record, read_records
from .unzip import ZipBudget, unpack_zip

__all__ = ["UserData", "ZipBudget", "check_inside", "read_user_data", "unpack_zip", "write_clean_jsonl"]


@dataclass(frozen=True)
class UserData:
    """What a source holds: the usable records and what was left out."""

    source: Path  # the folder or JSONL read (for a zip: where it was unpacked)
    kind: str  # "folder", "jsonl" or "zip"
    records: tuple[Record, ...]  # readable images with a caption
    skipped_images: int  # unreadable (missing, not an image, truncated)
    missing_captions: int  # images with no caption file

    @property
    def images(self) -> int:
        return len(self.records)

    def summary(self) -> str:
        return (f"{self.images} captioned images ({self.skipped_images} unreadable skipped, "
                f"{self.missing_captions} without a caption)")

    def as_dict(self) -> dict:
        return {"source": str(self.source), "kind": self.kind, "images": self.images,
                "skipped_images": self.skipped_images, "missing_captions": self.missing_captions}


def _readable(path: Path, name: str, max_pixels: int) -> bool:
    """Whether ``path`` decodes; an image over ``max_pixels`` is refused (ImageTooLarge), not skipped."""
    try:
        with open_checked(path, name, max_pixels) as im:
            im.verify()  # header and structure
        with open_checked(path, name, max_pixels) as im:
            im.load()  # the pixels: a truncated file fails here
        return True
    except ImageTooLarge:
        raise
    except (OSError, ValueError, SyntaxError):
        return False


def check_inside(records: Sequence[Record], base: Path, label: str, strict: bool = True) -> None:
    """Refuse any record whose file is not inside ``base``, naming the entry. ``strict`` (an upload): the entry
    must be a relative path below ``base`` with no '..' and no link on the way; otherwise (a folder the operator
    allows) only where it resolves to counts."""
    root = base.resolve()
    for rec in records:
        lexical = rec.path.is_relative_to(base) and ".." not in rec.path.relative_to(base).parts
        inside = rec.path.resolve().is_relative_to(root)
        if strict:
            inside = lexical and inside and rec.path.resolve() == root.joinpath(*rec.path.relative_to(base).parts)
        if not inside:
            entry = _entry(rec.path, base)
            raise ValueError(f"{label} names {str(entry)!r}, outside {base.name}/: every image must be a relative "
                             "path inside the data's folder (no absolute path, '..' or link)")


def read_user_data(path: str | Path, unpack_root: str | Path | None = None, budget: ZipBudget | None = None,
                   max_pixels: int = MAX_PIXELS) -> UserData:
    """Read and check a user's data (see the module docstring); a ValueError names what is wrong. A zip is
    unpacked within ``budget`` and its list confined to its folder; any image over ``max_pixels`` refuses the
    source (naming it); a refused zip leaves no unpacked folder behind."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"user data {p} does not exist: give an image folder with .txt captions, a .jsonl of "
                         '{"image": ..., "caption": ...} rows, or a .zip of images with .txt captions')
    kind = "folder"
    if p.is_file() and p.suffix.lower() == ".zip":
        folder = unpack_zip(p, unpack_root if unpack_root is not None else p.parent, budget)
        try:
            return _check(folder, "zip", max_pixels)
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)  # a refused upload leaves nothing behind
            if isinstance(e, ValueError):  # named by its folder alone: an upload's message shows no server path
                raise ValueError(str(e).replace(str(folder), folder.name)) from None
            raise
    elif p.is_file() and p.suffix.lower() == ".jsonl":
        kind = "jsonl"
    elif p.is_file():
        raise ValueError(f"user data {p} is a {p.suffix or 'suffix-less'} file; accepted: a folder, a .jsonl or a .zip")
    return _check(p, kind, max_pixels)


def _check(p: Path, kind: str, max_pixels: int) -> UserData:
    stats = DataStats()
    try:
        records = read_records(p, stats)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if kind == "zip":  # an upload's list may name only its own files
        check_inside(records, p, f"user data {p.name}/{METADATA}")
    images = [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS] if p.is_dir() and kind != "jsonl" \
        and not (p / METADATA).is_file() else None
    base = p if p.is_dir() else p.parent
    try:
        good = tuple(r for r in records
                     if _readable(r.path, _entry(r.path, base), max_pixels) and r.caption.strip())
    except ImageTooLarge as e:
        raise ValueError(f"user data {p.name}: {e}") from None
    skipped = len(records) - len(good)
    if not good:
        if not records and (images is None or images):
            n = len(images) if images is not None else 0
            raise ValueError(f"user data {p}: no captions found ({n} images, none with a caption): put x.txt "
                             "beside each image x.png, or list {\"image\": ..., \"caption\": ...} rows in a .jsonl")
        raise ValueError(f"user data {p}: no readable image with a caption ({len(records)} listed, {skipped} "
                         "unreadable or with an empty caption)")
    return UserData(p, kind, good, skipped, stats.missing_captions)


def _entry(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def write_clean_jsonl(data: UserData, path: str | Path) -> Path:
    """A ``.jsonl`` of only ``data``'s usable records (absolute paths), for ``data.source``."""
    rows = [json.dumps({"path": str(r.path.resolve()), "caption": r.caption,
                        **({"long_caption": r.long_caption} if r.long_caption else {})}) for r in data.records]
    return atomic_write_text(Path(path), "\n".join(rows) + "\n")
