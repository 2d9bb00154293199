"""One non-editable wheel of this checkout per test session, and a throw-away environment it is installed into.

The environment reuses the shared interpreter's installed dependencies through a filtered view (symlinks), so
nothing is downloaded: the editable install of the clone (its finder and dist-info) is left out so the wheel's
pixsigma is the only one, and so are the training extra's packages, so the engine and the app are seen to work
without them.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from pixsigma.space import build_wheel

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ONLY = ("accelerate", "came_pytorch", "came-pytorch", "peft", "matplotlib")  # pyproject's [train] extra
HIDDEN = ("pixsigma", "__editable__", "_pixsigma", *TRAIN_ONLY)


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the clone must not be on the path
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@functools.cache
def session_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pixsigma-wheel-"))


@functools.cache
def wheel() -> Path:
    """The wheel ``pip wheel`` builds from this checkout (built once per session)."""
    return build_wheel(ROOT, session_dir() / "dist")


def _dependency_view(folder: Path) -> Path:
    site = Path(sysconfig.get_path("purelib"))
    folder.mkdir(parents=True)
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(HIDDEN) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@functools.cache
def wheel_env() -> Path:
    """A venv (no pip of its own) holding the wheel, installed by pip --python; deps through a .pth line."""
    env = session_dir() / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(f"{_dependency_view(session_dir() / 'deps')}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel())], check=True, capture_output=True, text=True)
    return env
