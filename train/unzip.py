"""A user's ``.zip`` of images and captions unpacked within a budget: compressed size, member count, per-member and
total inflated size checked from the zip's headers first, then enforced again while streaming (a member stops at
the limit, whatever its header said). Only images, ``.txt`` and ``.jsonl`` are written, never outside the folder,
never as links; a refused or damaged zip leaves nothing behind. The command line's budget is generous; the app
passes its own (app.py's ``--max-upload-mb`` and friends, docs/app.md "Limits and security").
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pixsigma.io import new_folder

from .data import IMAGE_EXTS

UNPACKED_EXTS = (*IMAGE_EXTS, ".txt", ".jsonl")
CHUNK = 1 << 20  # bytes inflated per read: memory stays flat whatever a member's size
MB = 1 << 20
_SAFE_STEM = re.compile(r"[^\w.-]+")
_ZIP_FAULTS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)


@dataclass(frozen=True)
class ZipBudget:
    """What one ``.zip`` may hold: ``zip_mb`` compressed, ``total_mb`` inflated in all, ``member_mb`` per file,
    ``members`` entries (folders included)."""

    zip_mb: float = 4096.0
    total_mb: float = 4096.0
    member_mb: float = 512.0
    members: int = 200_000

    def __post_init__(self) -> None:
        for name in ("zip_mb", "total_mb", "member_mb", "members"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise ValueError(f"zip budget {name} must be a finite number > 0, got {v!r}")

    def nbytes(self, name: str) -> int:
        return int(getattr(self, name) * MB)


class ZipRefused(ValueError):
    """A zip over its budget, damaged, or unreadable (a ValueError: refused in the user's words)."""


def zip_folder(zip_path: Path, unpack_root: Path) -> Path:
    """Where ``zip_path`` is unpacked under ``unpack_root``: one folder per archive content (its digest)."""
    digest = hashlib.sha1()
    with open(zip_path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    stem = _SAFE_STEM.sub("_", zip_path.stem)[:40] or "upload"
    return unpack_root / f"{stem}-{digest.hexdigest()[:10]}"


def entry_count(zip_path: Path) -> int | None:
    """The entries a zip's end record declares (ZIP64 too), read before ``ZipFile`` parses its whole central
    directory: a 200 MB zip of empty entries would otherwise hold millions of ZipInfo objects in memory. None: no
    end record (``ZipFile`` then refuses the file itself)."""
    try:
        with open(zip_path, "rb") as f:
            end = zipfile._EndRecData(f)  # the stdlib's own reader of the end record
    except (OSError, *_ZIP_FAULTS):
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else None


def _wanted(name: PurePosixPath) -> bool:
    """Images and captions inside the folder: no absolute path, no '..', no macOS resource forks."""
    return (bool(name.parts) and not name.is_absolute() and ".." not in name.parts and name.parts[0] != "__MACOSX"
            and name.suffix.lower() in UNPACKED_EXTS)


def check_headers(archive: zipfile.ZipFile, label: str, budget: ZipBudget) -> list[zipfile.ZipInfo]:
    """The members to unpack, after the headers' count and sizes are checked against ``budget``."""
    infos = archive.infolist()
    if len(infos) > budget.members:
        raise ZipRefused(f"{label} holds {len(infos):,} entries; at most {budget.members:,} are accepted")
    members = [m for m in infos if not m.is_dir() and _wanted(PurePosixPath(m.filename))]
    for m in members:
        if m.file_size > budget.nbytes("member_mb"):
            raise ZipRefused(f"{label}: {m.filename} inflates to {m.file_size / MB:,.1f} MB; at most "
                             f"{budget.member_mb:g} MB per file are accepted")
    total = sum(m.file_size for m in members)
    if total > budget.nbytes("total_mb"):
        raise ZipRefused(f"{label} inflates to {total / MB:,.1f} MB; at most {budget.total_mb:g} MB in all are "
                         "accepted")
    return members


def copy_capped(src, dst, label: str, name: str, member_cap: int, total_left: int, budget: ZipBudget) -> int:
    """Stream ``src`` into ``dst`` a chunk at a time, stopping (ZipRefused) as soon as the bytes read pass
    ``member_cap`` or ``total_left``, whatever the header said; the bytes copied."""
    n = 0
    while chunk := src.read(CHUNK):
        n += len(chunk)
        if n > member_cap:
            raise ZipRefused(f"{label}: {name} inflates past {budget.member_mb:g} MB (its header said less); "
                             "refused")
        if n > total_left:
            raise ZipRefused(f"{label} inflates past {budget.total_mb:g} MB in all (its headers said less); "
                             "refused")
        dst.write(chunk)
    return n


def unpack_zip(zip_path: str | Path, unpack_root: str | Path, budget: ZipBudget | None = None) -> Path:
    """Unpack the images and captions of ``zip_path`` once (reused when already there) within ``budget``;
    returns the folder. Anything wrong is a ZipRefused naming the zip (and the member) and leaves no folder."""
    zip_path, budget = Path(zip_path), budget or ZipBudget()
    label = f"user data {zip_path.name}"
    size = zip_path.stat().st_size
    if size > budget.nbytes("zip_mb"):
        raise ZipRefused(f"{label} is {size / MB:,.1f} MB; at most {budget.zip_mb:g} MB per .zip are accepted")
    declared = entry_count(zip_path)
    if declared is not None and declared > budget.members:
        raise ZipRefused(f"{label} holds {declared:,} entries; at most {budget.members:,} are accepted")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, *_ZIP_FAULTS) as e:
        raise ZipRefused(f"{label} is not a readable .zip ({e})") from None
    dest = zip_folder(zip_path, Path(unpack_root))
    with archive:
        members = check_headers(archive, label, budget)
        if dest.is_dir():
            return dest
        with new_folder(dest) as tmp:  # a refusal below removes the half-written folder
            total = 0
            for m in members:
                out = tmp.joinpath(*PurePosixPath(m.filename).parts)
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(m) as src, open(out, "xb") as dst:
                        total += copy_capped(src, dst, label, m.filename, budget.nbytes("member_mb"),
                                             budget.nbytes("total_mb") - total, budget)
                except ZipRefused:
                    raise
                except _ZIP_FAULTS as e:
                    raise ZipRefused(f"{label} is damaged at {m.filename} ({e}); zip it again") from None
                except (FileExistsError, NotADirectoryError, IsADirectoryError):
                    raise ZipRefused(f"{label}: {m.filename} clashes with another entry of the same name; "
                                     "refused") from None
    return dest
