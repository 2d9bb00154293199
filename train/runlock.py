"""One trainer per folder: an OS lock (``fcntl.flock``) on ``FOLDER/.lock``, held by the process that trains there.

A trainer takes its run folder's lock before it writes anything there and holds it until it returns or exits;
the OS drops it when the process ends however it ends (kill -9 included), so a lock is never stale. A second
trainer on the same folder is refused at once with :class:`FolderBusy`, which names the holder's pid and the
folder. The lock file holds the holder's pid (and what it does) as JSON for that message; it is never replaced
or removed, since a new file would be a new lock.

The app's one-trainer rule is the same lock on its runs folder: Start, Resume and Start chain take it, start
the trainer and hand the held lock over to it (:func:`spawn`): the trainer's process inherits the open lock, so
the folder is never free between the app's check and the trainer's start, and it is freed when the trainer
exits. A child adopts an inherited lock when it takes the same folder's lock itself (``PIXSIGMA_HELD_LOCKS``
lists the inherited descriptors; each is matched to the lock file by inode).

Within a process the lock is re-entrant for the thread holding it (``train.prepare`` holds the run folder, then
``train.loop.train`` takes it again); another thread of the same process is refused like another process.
Standard library only: the app reads it without loading torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK = ".lock"  # FOLDER/.lock
HELD_ENV = "PIXSIGMA_HELD_LOCKS"  # comma-separated descriptors a child inherits, each holding a folder's lock
EXIT_BUSY = 3  # the CLIs' exit status when the folder is held by another trainer
POLL_S = 0.1

__all__ = ["EXIT_BUSY", "LOCK", "FolderBusy", "Lease", "acquire", "claim", "exit_if_busy", "holder", "is_main_rank",
           "spawn"]


class FolderBusy(ValueError):
    """The folder's lock is held by another process (or another thread of this one)."""

    def __init__(self, folder: Path, info: dict[str, Any]):
        self.folder, self.info = folder, info
        self.pid = info.get("pid") if isinstance(info.get("pid"), int) else None
        who = f"pid {self.pid}" if self.pid is not None else "a process whose pid it has not written yet"
        if self.pid == os.getpid():
            who += " (this process)"
        doing = f", {info['doing']}" if isinstance(info.get("doing"), str) else ""
        since = f", since {time.strftime('%H:%M:%S', time.localtime(info['since']))}" \
            if isinstance(info.get("since"), int | float) else ""
        super().__init__(f"{folder} is held by another trainer ({who}{doing}{since}): one trainer per folder; wait "
                         "for it to finish, stop it, or give another folder")


@dataclass
class _Held:
    fd: int
    thread: int
    count: int = 0


_held: dict[Path, _Held] = {}
_registry = threading.Lock()


@dataclass
class Lease:
    """One hold of a folder's lock; ``release()`` (or leaving a ``with`` block) gives it back."""

    folder: Path
    fd: int
    _released: bool = field(default=False, repr=False)

    def note(self, **info: Any) -> None:
        """Record who holds the lock (``pid``, ``doing``, ...) in the lock file, for refusal messages."""
        data = json.dumps({"pid": os.getpid(), "since": time.time(), **info}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _registry:
            held = _held.get(self.folder)
            if held is None or held.fd != self.fd:
                return
            held.count -= 1
            if held.count <= 0:
                del _held[self.folder]
                os.close(self.fd)  # the OS lock goes with the last descriptor (a child's copy keeps it)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _key(folder: str | Path) -> Path:
    return Path(folder).expanduser().resolve()


def _read_info(path: Path) -> dict[str, Any]:
    for _ in range(5):  # the holder truncates, then writes: an empty read is retried briefly
        try:
            text = path.read_text()
        except OSError:
            return {}
        if text.strip():
            try:
                data = json.loads(text)
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
        time.sleep(0.02)
    return {}


def holder(folder: str | Path) -> dict[str, Any]:
    """What the lock file says of its last holder (``{}`` when none wrote it). It does not say whether that
    holder is alive: only taking the lock does, and a reader must not take it (a trainer starting at that
    moment would be refused)."""
    return _read_info(_key(folder) / LOCK)


def _inherited(fd: int) -> int | None:
    """An inherited descriptor of the same lock file as ``fd`` (see ``HELD_ENV``), else None."""
    own = os.fstat(fd)
    for part in os.environ.get(HELD_ENV, "").split(","):
        if not part.strip().isdigit() or int(part) == fd:
            continue
        try:
            st = os.fstat(int(part))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return int(part)
    return None


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s lock, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        inherited = _inherited(fd)
        if inherited is not None:  # the parent took it for us: adopt its descriptor
            os.close(fd)
            fd = inherited
            os.set_inheritable(fd, False)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise


def acquire(folder: str | Path, wait_s: float = 0.0, **info: Any) -> Lease:
    """Hold ``folder``'s lock (the folder is made when missing); ``FolderBusy`` when another holder has it,
    after up to ``wait_s`` seconds of retrying. ``info`` (e.g. ``doing="training"``) goes into the lock file."""
    key = _key(folder)
    key.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        with _registry:
            held = _held.get(key)
            if held is not None:
                if held.thread != threading.get_ident():
                    raise FolderBusy(key, {**_read_info(key / LOCK), "pid": os.getpid()})
                held.count += 1
                return Lease(key, held.fd)
            fd = _try_lock(key / LOCK)
            if fd is not None:
                _held[key] = _Held(fd, threading.get_ident(), 1)
                lease = Lease(key, fd)
                lease.note(**info)
                return lease
        if time.monotonic() >= deadline:
            raise FolderBusy(key, _read_info(key / LOCK))
        time.sleep(POLL_S)


def claim(folder: str | Path, **info: Any) -> Lease:
    """Hold ``folder``'s lock until this process exits (a CLI's run): the lease is simply never released."""
    return acquire(folder, **info)


def is_main_rank() -> bool:
    """Whether this process is the first of a distributed launch (or not in one): only it holds the lock."""
    return os.environ.get("RANK", "0") in ("", "0")


def exit_if_busy(folder: str | Path, **info: Any) -> Lease:
    """``claim`` for a command line: on ``FolderBusy`` print its message and exit with ``EXIT_BUSY``, having
    written nothing."""
    try:
        return claim(folder, **info)
    except FolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BUSY) from None


def spawn(cmd: Sequence[str], leases: Sequence[Lease], env: dict[str, str] | None = None,
          **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` holding ``leases``' locks: the child inherits their descriptors, so the locks stay held
    until it exits whatever the caller does with its own leases afterwards. Each lock file then names the
    child's pid."""
    fds = tuple(sorted({lease.fd for lease in leases}))
    env = dict(os.environ if env is None else env)
    env[HELD_ENV] = ",".join(str(fd) for fd in fds)
    proc = subprocess.Popen(list(cmd), pass_fds=fds, env=env, **popen)
    for lease in leases:
        info = _read_info(lease.folder / LOCK)
        lease.note(**{**info, "pid": proc.pid, "since": time.time()})
    return proc
