"""The Train tab's data, for strangers at the keyboard: a ``.zip`` upload unpacked within budgets (one at a time per
browser session, a few at once app-wide), ``RUNS/uploads`` pruned like the outputs, and the Data box confined to
the runs folder and the folders the operator allows (``--data-root``). Flags and defaults: :func:`add_upload_args`,
docs/app.md "Limits and security".
"""

from __future__ import annotations

import argparse
import math
import os
import reprlib
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pixsigma.layout import CHECKOUT
from pixsigma_ui.inputs import MAX_UPLOAD_PIXELS
from pixsigma_ui.lab_state import pid_alive, read_json
from pixsigma_ui.retention import GRACE_S, Retention

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.data import read_records
    from train.runfiles import LAUNCH, STATUS
    from train.userdata import UserData, ZipBudget, check_inside, read_user_data
else:
    from pixsigma.train.data import read_records
    from pixsigma.train.runfiles import LAUNCH, STATUS
    from pixsigma.train.userdata import UserData, ZipBudget, check_inside, read_user_data

UPLOADS = "uploads"  # RUNS/uploads: unpacked .zip uploads of the Start form
DEFAULT_UPLOAD_MB = 200.0  # one upload (gradio's max_file_size) and one .zip, compressed
DEFAULT_UNPACKED_MB = 1024.0  # one .zip inflated, in all
DEFAULT_MEMBER_MB = 64.0  # one file inside a .zip
DEFAULT_MEMBERS = 10_000  # entries of one .zip
DEFAULT_UNPACKS = 2  # .zip files unpacked at once, app-wide (and one per browser session)
DEFAULT_KEEP_UPLOADS_MB = 4096.0  # RUNS/uploads in all, oldest unused upload removed first
DATA_SOURCE = "data.source="  # how a run's launch command names its data
FLAGS = {"upload_mb": "max-upload-mb", "unpacked_mb": "max-unpacked-mb", "member_mb": "max-member-mb",
         "members": "max-zip-members", "image_pixels": "max-image-pixels", "unpacks": "max-unpacks",
         "keep_mb": "keep-uploads-mb"}  # UploadLimits' fields and the app.py flags that set them


@dataclass(frozen=True)
class UploadLimits:
    """The budgets of the Train tab's uploads and Data box (see the module docstring)."""

    upload_mb: float = DEFAULT_UPLOAD_MB
    unpacked_mb: float = DEFAULT_UNPACKED_MB
    member_mb: float = DEFAULT_MEMBER_MB
    members: int = DEFAULT_MEMBERS
    image_pixels: int = MAX_UPLOAD_PIXELS
    unpacks: int = DEFAULT_UNPACKS
    keep_mb: float = DEFAULT_KEEP_UPLOADS_MB
    data_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for name, flag in FLAGS.items():
            v, whole = getattr(self, name), name in ("members", "image_pixels", "unpacks")
            low_ok = v >= 0 if name == "keep_mb" else v > 0  # keep none: allowed
            if isinstance(v, bool) or not isinstance(v, int if whole else int | float) or not (low_ok and v < math.inf):
                raise ValueError(f"--{flag} must be a {'whole ' if whole else ''}number "
                                 f"{'>= 0' if name == 'keep_mb' else '> 0'}, got {v!r}")
        object.__setattr__(self, "data_roots", tuple(Path(r).resolve() for r in self.data_roots))

    @property
    def budget(self) -> ZipBudget:
        return ZipBudget(self.upload_mb, self.unpacked_mb, self.member_mb, self.members)


class UnpackGate:
    """At most ``cap`` unpacks at once, and one per client; a request beyond is refused at once, not queued."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._clients: set[str] = set()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        with self._lock:
            if client in self._clients:
                raise ValueError("your previous upload is still being unpacked: wait for it to finish")
            if len(self._clients) >= self.cap:
                raise ValueError(f"{self.cap} uploads are being unpacked right now (the server's limit): try "
                                 "again in a minute")
            self._clients.add(client)
        try:
            yield
        finally:
            with self._lock:
                self._clients.discard(client)


class Uploads:
    """The runs folder's uploads: received within ``limits``, confined, pruned."""

    def __init__(self, runs_dir: Path, limits: UploadLimits | None = None) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.folder = self.runs_dir / UPLOADS
        self.limits = limits or UploadLimits()
        self.gate = UnpackGate(self.limits.unpacks)

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where the Data box may point: the runs folder (uploads included) and the operator's folders."""
        return (self.runs_dir, *self.limits.data_roots)

    def receive(self, path: str | Path, client: str) -> UserData:
        """Unpack and check an uploaded ``.zip`` (gradio's copy, removed afterwards whatever happens)."""
        path = Path(path)
        try:
            if path.suffix.lower() != ".zip":
                raise ValueError(f"{path.name}: upload a .zip of images with .txt captions")
            with self.gate.hold(client):
                data = read_user_data(path, self.folder, self.limits.budget, self.limits.image_pixels)
            os.utime(data.source)  # used now: the prune keeps it as long as a fresh one
            return data
        finally:
            _remove_upload(path)

    def confine(self, text: str) -> str:
        """The Data box's ``text`` as a resolved path inside :attr:`roots` ('' stays ''). Anything else gets one
        message, whether or not it exists there, and is never read; a list inside may name only files under
        the roots."""
        if not text:
            return ""
        refusal = ValueError(f"data {reprlib.repr(text)} is not a folder this app reads: upload a .zip, or give "
                             "a folder under the runs folder or one the operator allows (--data-root)")
        if "\0" in text:
            raise refusal
        p = Path(text)
        p = (p if p.is_absolute() else self.runs_dir / p).resolve()  # links resolved: no way out through one
        if not any(p.is_relative_to(root) for root in self.roots):
            raise refusal
        try:
            found = p.exists()
        except OSError:  # a name too long, say
            found = False
        if not found:
            raise ValueError(f"data {reprlib.repr(text)} does not exist: give an image folder or a metadata .jsonl, "
                             "or leave it empty for the stage config's data (the shapes world)")
        if p.suffix.lower() == ".jsonl" or (p / "metadata.jsonl").is_file():
            records = read_records(p)
            for rec in records:
                if not any(rec.path.resolve().is_relative_to(root) for root in self.roots):
                    check_inside([rec], p if p.is_dir() else p.parent, f"data {p.name}", strict=False)
        return str(p)

    def in_use(self) -> set[Path]:
        """Upload folders a live run reads (never pruned)."""
        used = set()
        for run in self.runs_dir.iterdir() if self.runs_dir.is_dir() else []:
            launch = read_json(run / LAUNCH)
            if not (pid_alive(launch.get("pid")) or pid_alive(read_json(run / STATUS).get("pid"))):
                continue
            for arg in launch.get("cmd") or []:
                if isinstance(arg, str) and arg.startswith(DATA_SOURCE):
                    used.add(Path(arg.removeprefix(DATA_SOURCE)).resolve())
        return used

    def prune(self, keep: Retention, now: float | None = None) -> list[Path]:
        """Remove whole upload folders unused for ``keep.hours``, then the oldest beyond ``limits.keep_mb``; never
        one a live run reads, nor one younger than ``GRACE_S`` (being unpacked)."""
        if not self.folder.is_dir():
            return []
        now = time.time() if now is None else now
        used = self.in_use()
        found = []
        for child in self.folder.iterdir():
            try:
                found.append((child.stat().st_mtime, _size(child), child))
            except OSError:
                continue
        total = sum(size for _, size, _ in found)
        removed = []
        for mtime, size, child in sorted(found):
            age = now - mtime
            if age <= keep.max_age_s and total <= int(self.limits.keep_mb * 2**20):
                break
            if child.name.startswith(".") and age <= keep.max_age_s:
                continue  # an unpack under way (new_folder's temp): only a day-old leftover goes
            if age < GRACE_S or any(u == child.resolve() or u.is_relative_to(child.resolve()) for u in used):
                continue
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            total -= size
            removed.append(child)
        return removed


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _remove_upload(path: Path) -> None:
    """Remove gradio's copy of an upload once read (only inside gradio's upload folder)."""
    from gradio.utils import get_upload_folder

    if path.resolve().is_relative_to(Path(get_upload_folder()).resolve()):
        path.unlink(missing_ok=True)


def add_upload_args(p: argparse.ArgumentParser) -> None:
    """app.py's flags for the budgets (docs/app.md "Limits and security")."""
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_UPLOAD_MB,
                   help="largest upload (gradio's max_file_size) and largest .zip, compressed")
    p.add_argument("--max-unpacked-mb", type=float, default=DEFAULT_UNPACKED_MB, help="one .zip inflated, in all")
    p.add_argument("--max-member-mb", type=float, default=DEFAULT_MEMBER_MB, help="one file inside a .zip")
    p.add_argument("--max-zip-members", type=int, default=DEFAULT_MEMBERS, help="entries of one .zip")
    p.add_argument("--max-image-pixels", type=int, default=MAX_UPLOAD_PIXELS,
                   help="largest uploaded image (Generate's inputs, training images), refused before decoding")
    p.add_argument("--max-unpacks", type=int, default=DEFAULT_UNPACKS,
                   help=".zip uploads unpacked at once, app-wide (one per browser session)")
    p.add_argument("--keep-uploads-mb", type=float, default=DEFAULT_KEEP_UPLOADS_MB,
                   help="unpacked uploads kept in all (unused ones also go after --keep-outputs-hours)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder the Train tab's Data box may name (repeatable); the runs folder always may")


def limits_from_args(opts: argparse.Namespace) -> UploadLimits:
    return UploadLimits(opts.max_upload_mb, opts.max_unpacked_mb, opts.max_member_mb, opts.max_zip_members,
                        opts.max_image_pixels, opts.max_unpacks, opts.keep_uploads_mb,
                        tuple(Path(d) for d in opts.data_root))


def client_of(request: object) -> str:
    """The key of "one unpack at a time per client": the browser session (gradio's session hash)."""
    return str(getattr(request, "session_hash", None) or "anonymous")
