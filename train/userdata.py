"""A user's own images for the ``finetune`` stage: checked before a run starts, handed to the trainer clean.

Accepted: a folder of images with ``x.txt`` captions beside them (optionally ``x.long.txt``), a ``.jsonl`` of
``{"image": …, "caption": …}`` rows (``path``/``file_name`` and ``text`` are read too; paths relative to the
file), a folder holding ``metadata.jsonl``, or a ``.zip`` of images with ``.txt`` captions (unpacked once).
Every image is opened and verified: unreadable ones are skipped and counted, images without a caption are
counted, and a source with no captioned, readable image is refused with a ValueError saying what was found.
``write_clean_jsonl`` lists only the images that passed, so the trainer never meets a bad one.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from pixsigma.io import atomic_write_text, new_folder

from .data import IMAGE_EXTS, METADATA, DataStats, Record, read_records

MAX_ZIP_BYTES = 4 << 30  # unpacked size refused above this (a zip bomb, or data too big for a browser upload)
MAX_ZIP_FILES = 200_000


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


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()  # header and structure
        with Image.open(path) as im:
            im.load()  # the pixels: a truncated file fails here
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def zip_folder(zip_path: Path, unpack_root: Path) -> Path:
    """Where ``zip_path`` is unpacked under ``unpack_root``: one folder per archive content (its digest)."""
    digest = hashlib.sha1()
    with open(zip_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return unpack_root / f"{zip_path.stem}-{digest.hexdigest()[:10]}"


def unpack_zip(zip_path: str | Path, unpack_root: str | Path) -> Path:
    """Unpack images and captions of ``zip_path`` once (reused when already there); returns the folder."""
    zip_path = Path(zip_path)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"user data {zip_path} is not a readable .zip ({e})") from None
    dest = zip_folder(zip_path, Path(unpack_root))
    if dest.is_dir():
        return dest
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise ValueError(f"user data {zip_path}: at most {MAX_ZIP_FILES} files and {MAX_ZIP_BYTES >> 30} GiB "
                             "unpacked are accepted")
        with new_folder(dest) as tmp:
            for m in members:
                name = PurePosixPath(m.filename)
                if name.is_absolute() or ".." in name.parts or name.parts[0] == "__MACOSX":
                    continue  # never write outside the folder; macOS resource forks are not images
                if name.suffix.lower() not in (*IMAGE_EXTS, ".txt", ".jsonl"):
                    continue
                out = tmp.joinpath(*name.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(m))
    return dest


def read_user_data(path: str | Path, unpack_root: str | Path | None = None) -> UserData:
    """Read and check a user's data (see the module docstring); a ValueError names what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"user data {p} does not exist: give an image folder with .txt captions, a .jsonl of "
                         '{"image": ..., "caption": ...} rows, or a .zip of images with .txt captions')
    kind = "folder"
    if p.is_file() and p.suffix.lower() == ".zip":
        p = unpack_zip(p, unpack_root if unpack_root is not None else p.parent)
        kind = "zip"
    elif p.is_file() and p.suffix.lower() == ".jsonl":
        kind = "jsonl"
    elif p.is_file():
        raise ValueError(f"user data {p} is a {p.suffix or 'suffix-less'} file; accepted: a folder, a .jsonl or a .zip")
    stats = DataStats()
    try:
        records = read_records(p, stats)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    images = [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS] if p.is_dir() and kind != "jsonl" \
        and not (p / METADATA).is_file() else None
    good = tuple(r for r in records if _readable(r.path) and r.caption.strip())
    skipped = len(records) - len(good)
    if not good:
        if not records and (images is None or images):
            n = len(images) if images is not None else 0
            raise ValueError(f"user data {p}: no captions found ({n} images, none with a caption): put x.txt "
                             "beside each image x.png, or list {\"image\": ..., \"caption\": ...} rows in a .jsonl")
        raise ValueError(f"user data {p}: no readable image with a caption ({len(records)} listed, {skipped} "
                         "unreadable or with an empty caption)")
    return UserData(p, kind, good, skipped, stats.missing_captions)


def write_clean_jsonl(data: UserData, path: str | Path) -> Path:
    """A ``.jsonl`` of only ``data``'s usable records (absolute paths), for ``data.source``."""
    rows = [json.dumps({"path": str(r.path.resolve()), "caption": r.caption,
                        **({"long_caption": r.long_caption} if r.long_caption else {})}) for r in data.records]
    return atomic_write_text(Path(path), "\n".join(rows) + "\n")
