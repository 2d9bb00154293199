"""Bounded disk for a long-running app: generated PNGs and gradio's cache are kept for a set age and up to a set
total size (oldest removed first), and no empty folder is left behind.

A Space's disk is small and never cleaned by itself; every request writes PNGs (ours, then gradio's copies
of them in its cache), so without this the disk fills and the app stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pixsigma.app")
DEFAULT_KEEP_HOURS = 24.0  # a user's images outlive their session by a day
DEFAULT_KEEP_MB = 1000.0  # each of the two folders: small beside a Space's disk
PRUNE_EVERY_S = 300.0  # the background sweep (the outputs folder is also pruned after each save)
GRACE_S = 60.0  # the size bound never removes a file this young: it may be being written or sent


@dataclass(frozen=True)
class Retention:
    """Keep files at most ``hours`` old and at most ``mb`` megabytes in all, per folder (0: keep none)."""

    hours: float = DEFAULT_KEEP_HOURS
    mb: float = DEFAULT_KEEP_MB

    def __post_init__(self) -> None:
        for name in ("hours", "mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"keep-outputs-{name} must be a number >= 0, got {v!r}")

    @property
    def max_age_s(self) -> float:
        return self.hours * 3600

    @property
    def max_bytes(self) -> int:
        return int(self.mb * 2**20)


def prune(folder: str | Path, keep: Retention, now: float | None = None) -> list[Path]:
    """Remove files under ``folder`` beyond ``keep`` (:func:`prune_files`), then every empty folder below it."""
    folder = Path(folder)
    files = [Path(root, name) for root, _, names in os.walk(folder) for name in names]
    removed = prune_files(files, keep, now)
    for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):  # deepest first
        if Path(root) != folder:
            _rmdir_if_empty(Path(root))
    return removed


def prune_files(files: Iterable[str | Path], keep: Retention, now: float | None = None) -> list[Path]:
    """Remove those of ``files`` older than ``keep.hours``, then the oldest until the rest fit ``keep.mb``
    (sparing files younger than ``GRACE_S``: being written or about to be sent). Returns the files removed;
    files that vanish meanwhile are skipped."""
    now = time.time() if now is None else now
    stats: list[tuple[float, int, Path]] = []  # (mtime, size, path)
    for path in map(Path, files):
        try:
            st = path.stat()
        except OSError:
            continue
        stats.append((st.st_mtime, st.st_size, path))
    stats.sort()
    total = sum(size for _, size, _ in stats)
    removed = []
    for mtime, size, path in stats:  # oldest first
        age = now - mtime
        if age <= keep.max_age_s and (total <= keep.max_bytes or age < GRACE_S):
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def prune_gradio_cache(blocks: Any, keep: Retention, now: float | None = None) -> list[Path]:
    """Bounds on the files gradio cached for ``blocks`` (its ``temp_file_sets``: copies of results and uploads, one
    hash-named folder each), never another app's (the cache folder may be shared): files older than
    ``keep.hours`` go; beyond ``keep.mb`` only raw uploads (``upload_file_set``) are removed, the largest first,
    so one big upload never evicts other users' live results."""
    now = time.time() if now is None else now
    sets = list(getattr(blocks, "temp_file_sets", []))
    removed = prune_files({f for s in sets for f in list(s)}, Retention(keep.hours, float(2**40)), now)  # age only
    gone = set(map(str, removed))
    uploads = [f for f in list(getattr(blocks, "upload_file_set", ())) if f not in gone]
    removed += _shrink_largest_first(uploads, keep.max_bytes, now)
    for path in removed:
        for s in sets:
            s.discard(str(path))
        _rmdir_if_empty(path.parent)
    return removed


def _shrink_largest_first(files: Iterable[str | Path], max_bytes: int, now: float) -> list[Path]:
    """Remove the largest of ``files`` (ties: the oldest) until the rest fit ``max_bytes``, sparing files younger
    than ``GRACE_S``."""
    stats = []
    for path in map(Path, files):
        try:
            st = path.stat()
        except OSError:
            continue
        stats.append((-st.st_size, st.st_mtime, path))
    total = -sum(size for size, _, _ in stats)
    removed = []
    for neg_size, mtime, path in sorted(stats):
        if total <= max_bytes:
            break
        if now - mtime < GRACE_S:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total += neg_size
        removed.append(path)
    return removed


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


class Sweeper:
    """Runs each of ``tasks`` (a prune returning the files it removed) every ``every_s`` seconds in a daemon
    thread until :meth:`stop`."""

    def __init__(self, tasks: list[Callable[[], list[Path]]], every_s: float = PRUNE_EVERY_S) -> None:
        self.tasks, self.every_s = tasks, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pixsigma-retention", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def sweep(self) -> int:
        """One pass of every task; the number of files removed."""
        return sum(len(task()) for task in self.tasks)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                removed = self.sweep()
            except Exception:  # a sweep must never end the thread; the next one retries
                log.exception("retention sweep failed")
                continue
            if removed:
                log.info("retention: removed %d old file(s)", removed)

    def stop(self) -> None:
        self._stop.set()


def temp_outputs_folder() -> Path:
    """A fresh temp folder for PNGs that is removed when the process exits (no empty folders left behind; a
    ``kill -TERM`` too once :func:`exit_on_sigterm` is installed)."""
    folder = Path(tempfile.mkdtemp(prefix="pixsigma-outputs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a container stop) a normal exit, so atexit's clean-up runs (Python's default for
    SIGTERM ends the process at once, leaving the temp outputs behind). Call it from the main thread."""
    signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum: int, frame: Any) -> None:
    log.info("signal %d: exiting", signum)
    sys.exit(128 + signum)
