"""``pixsigma space OUT``: a ready Hugging Face Space folder, and the wheel it vendors.

The folder holds pixsigma as the wheel installs it (``pixsigma/``, ``pixsigma_ui/`` and the wheel's dist-info,
so the entry points resolve), an ``app.py`` that starts the package's app (``pixsigma_ui.server.main``) with the
Space's settings, a ``requirements.txt`` pinned to the versions installed here (the tested ones), and a
``README.md`` whose front matter configures the Space (docs/spaces.md). From a clone the vendored files come from
a wheel built of the clone; from an installed wheel (``pip install pixsigma``), from the installed files
themselves (the same files, as the wheel's RECORD lists them). Nothing here imports gradio.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import Distribution, PackageNotFoundError, distribution, version
from pathlib import Path

from pixsigma.io import atomic_write_text
from pixsigma.layout import CHECKOUT, PACKAGE_DIR
from pixsigma.registry import LORA_ALIASES, MODEL_ALIASES

HARDWARE = {"zerogpu": "zero-a10g", "cpu": "cpu-basic"}  # shorthands -> the Hub's hardware flavours
GPU_FLAVOURS = ("t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "a10g-small", "a10g-large", "a100-large")
CPU_FLAVOURS = ("cpu-basic", "cpu-upgrade")
WHEEL_SOURCES = ("pyproject.toml", "README.md", "pixsigma", "pixsigma_ui", "train", "shapes", "assets/demo",
                 "configs")  # what pyproject's packages and package data are built from
APP_MAIN = "pixsigma_ui.server"  # the app's main, which the Space's app.py calls
VENDORED_TOPS = ("pixsigma", "pixsigma_ui")  # the wheel's packages (its dist-info comes too)
# pip's records of an install (RECORD would also list files the Space leaves out): nothing the Space runs
INSTALL_RECORDS = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
DEMO_DATA = "pixsigma/data/assets/demo/"
CONFIG_DATA = "pixsigma/data/configs/"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NO_PIN = {"gradio"}  # the Space installs the sdk_version of gradio itself


@dataclass(frozen=True)
class SpaceOptions:
    """What the Space serves. Models: a shipped alias (``demo``) or a hub id; LoRAs: shipped names or hub ids."""

    model: str = "demo"
    alpha_model: str | None = "demo-alpha"  # None: no Compare against PixArt-α
    controlnet: str | None = None
    loras: tuple[str, ...] = ()
    train: bool = False  # the Train tab (a visitor's training run holds the Space's machine for minutes)
    hardware: str = "zerogpu"
    title: str = "pixsigma"

    def __post_init__(self) -> None:
        for name in ("model", "alpha_model", "controlnet"):
            value = getattr(self, name)
            if value is not None and value not in MODEL_ALIASES and not HUB_ID.match(value):
                raise ValueError(f"SpaceOptions.{name}={value!r}: a Space can load a shipped model "
                                 f"({', '.join(MODEL_ALIASES)}) or a hub id (owner/name); upload a local folder "
                                 "to the hub first")
        for lora in self.loras:
            if lora not in LORA_ALIASES and not HUB_ID.match(lora):
                raise ValueError(f"SpaceOptions.loras: {lora!r} is neither a shipped LoRA "
                                 f"({', '.join(LORA_ALIASES)}) nor a hub id (owner/name)")
        if self.suggested_hardware not in (*CPU_FLAVOURS, *GPU_FLAVOURS, HARDWARE["zerogpu"]):
            raise ValueError(f"SpaceOptions.hardware={self.hardware!r}; accepted: zerogpu, cpu, "
                             f"{', '.join(CPU_FLAVOURS + GPU_FLAVOURS)}")

    @property
    def suggested_hardware(self) -> str:
        return HARDWARE.get(self.hardware, self.hardware)

    @property
    def hub_ids(self) -> list[str]:
        """The hub repositories the Space loads (front matter ``models`` and ``preload_from_hub``)."""
        named = [self.model, self.alpha_model, self.controlnet, *self.loras]
        return list(dict.fromkeys(n for n in named if n and n not in MODEL_ALIASES and n not in LORA_ALIASES))

    @property
    def uses_demo(self) -> bool:
        named = [self.model, self.alpha_model, self.controlnet, *self.loras]
        return any(n in MODEL_ALIASES or n in LORA_ALIASES for n in named if n)

    def app_args(self) -> list[str]:
        """The app's flags: on ZeroGPU the models load on the CPU in bf16 and move to CUDA per call."""
        args = ["--model", self.model, "--alpha-model", self.alpha_model or "none"]
        if self.controlnet:
            args += ["--controlnet", self.controlnet]
        if self.train:
            args.append("--enable-training")
        hw = self.suggested_hardware
        if hw == HARDWARE["zerogpu"]:  # no GPU at import: load on the CPU, in the dtype the GPU will run
            args += ["--device", "cpu", "--dtype", "bf16"]
        elif hw in CPU_FLAVOURS:
            args += ["--device", "cpu"]
        else:
            args += ["--device", "cuda"]
        return args


@dataclass
class SpaceFiles:
    """What :func:`write_space` wrote."""

    folder: Path
    readme: Path
    app: Path
    requirements: Path
    vendored: list[str] = field(default_factory=list)


def build_wheel(checkout: Path, dist: Path) -> Path:
    """``pip wheel`` of a clean copy of ``checkout``'s packaged folders (no stale build/ of the clone's)."""
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pixsigma-src-") as tmp:
        src = Path(tmp)
        for rel in WHEEL_SOURCES:
            path = checkout / rel
            if path.is_dir():
                shutil.copytree(path, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, src / rel)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", str(dist), str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the wheel failed:\n{done.stderr[-3000:]}")
    (wheel,) = sorted(dist.glob("pixsigma-*.whl"), key=lambda p: p.stat().st_mtime)[-1:]
    return wheel


def installed() -> Distribution:
    """The installed pixsigma distribution, refused unless its files are the ones this process runs."""
    try:
        dist = distribution("pixsigma")
    except PackageNotFoundError as e:
        raise ValueError("pixsigma space needs an installed pixsigma (pip install pixsigma) or a clone") from e
    if Path(dist.locate_file("pixsigma/__init__.py")).resolve() != PACKAGE_DIR / "__init__.py":
        raise ValueError(f"the pixsigma running ({PACKAGE_DIR}) is not the installed distribution's "
                         f"({dist.locate_file('pixsigma')}): run pixsigma space from a clone or the install")
    return dist


def installed_files() -> dict[str, Path]:
    """{name inside the wheel: file} of the installed pixsigma this process runs (its RECORD's pixsigma/,
    pixsigma_ui/ and dist-info files, compiled caches and pip's own records left out)."""
    dist = installed()
    out = {}
    for f in dist.files or ():
        name = f.as_posix()
        top = name.split("/", 1)[0]
        if (top in VENDORED_TOPS or top.endswith(".dist-info")) and "__pycache__" not in f.parts:
            out[name] = Path(dist.locate_file(f))
    return out


def in_space(name: str, opts: SpaceOptions) -> bool:
    """Whether the wheel's file ``name`` goes into the Space: the demo only if it serves it, the training
    configs only with the Train tab, no install records."""
    if (name.startswith(DEMO_DATA) and not opts.uses_demo) or (name.startswith(CONFIG_DATA) and not opts.train):
        return False
    return not (".dist-info/" in name and name.rsplit("/", 1)[1] in INSTALL_RECORDS)


def vendor(out: Path, opts: SpaceOptions, wheel: Path | None) -> list[str]:
    """Copy the wheel's files the Space needs into ``out`` (from ``wheel``, or the installed pixsigma's files when
    None); returns their names."""
    sources = installed_files() if wheel is None else {}  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if in_space(n, opts)]
            for name in names:
                z.extract(name, out)
        return names
    names = [n for n in sources if in_space(n, opts)]
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sources[name], out / name)
    return names


def metadata(wheel: Path | None) -> str:
    """The core metadata (``METADATA``) of ``wheel``, or of the installed distribution when None."""
    if wheel is None:
        return installed().read_text("METADATA") or ""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(meta).decode()


def pins(wheel: Path | None, extras: tuple[str, ...]) -> list[str]:
    """``name==version`` of every requirement the wheel (None: the installed pixsigma) declares for ``extras``
    (and always), at the version installed here; a local build tag (``+cpu``) is dropped, so the Space gets the
    same release for its GPU."""
    lines = metadata(wheel).splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        marker = spec.split(";", 1)[1] if ";" in spec else ""
        extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", marker)
        if (extra and extra.group(1) not in extras) or name.lower() in NO_PIN or name.lower() == "pixsigma":
            continue
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError as e:
            raise ValueError(f"{name} is not installed here, so no tested version can be pinned") from e
    return sorted(set(out), key=str.lower)


def front_matter(opts: SpaceOptions) -> str:
    ids = opts.hub_ids
    lines = ["---", f"title: {opts.title}", "emoji: 🎨", "colorFrom: indigo", "colorTo: pink", "sdk: gradio",
             f"sdk_version: {version('gradio')}", f'python_version: "{sys.version_info.major}.'
             f'{sys.version_info.minor}"', "app_file: app.py", f"suggested_hardware: {opts.suggested_hardware}"]
    if ids:
        lines += ["models:", *(f"  - {i}" for i in ids), "preload_from_hub:", *(f"  - {i}" for i in ids)]
    lines += ["license: apache-2.0", "pinned: false", "---"]
    return "\n".join(lines) + "\n"


def readme(opts: SpaceOptions) -> str:
    served = ", ".join(n for n in (opts.model, opts.alpha_model) if n)
    return front_matter(opts) + (
        f"\n# {opts.title}\n\nPixArt-Σ text-to-image with pixsigma: {served}"
        f"{', ControlNet ' + opts.controlnet if opts.controlnet else ''}. Written by `pixsigma space`; "
        "the app's flags are in `app.py`.\n")


def starter(opts: SpaceOptions) -> str:
    return (
        '"""The Space\'s entry point (written by `pixsigma space`): pixsigma\'s app with this Space\'s flags."""\n\n'
        "import os\nimport sys\n\n"
        '# Examples are cached on first use, never at start-up: a ZeroGPU Space has no GPU while it starts.\n'
        'os.environ.setdefault("GRADIO_CACHE_MODE", "lazy")\n\n'
        f"from {APP_MAIN} import main  # noqa: E402 - after the environment it reads\n\n"
        f"ARGS = {opts.app_args()!r}\n\n"
        'if __name__ == "__main__":\n'
        "    main(ARGS + sys.argv[1:])  # later flags win: python app.py --port 7861\n")


def write_space(out: str | Path, opts: SpaceOptions, wheel: Path | None = None) -> SpaceFiles:
    """Write the Space folder ``out`` (refused if it exists and is not empty). ``wheel``: a built one to vendor;
    default: one built now from the clone this runs from, or else the installed pixsigma's own files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new folder for the Space")
    extras = ("app", "train") if opts.train else ("app",)
    with tempfile.TemporaryDirectory(prefix="pixsigma-space-") as tmp:
        if wheel is None and CHECKOUT is not None:
            wheel = build_wheel(CHECKOUT, Path(tmp))
        reqs = pins(wheel, extras)
        names = vendor(out, opts, wheel)
    files = SpaceFiles(out, out / "README.md", out / "app.py", out / "requirements.txt", names)
    atomic_write_text(files.readme, readme(opts))
    atomic_write_text(files.app, starter(opts))
    atomic_write_text(files.requirements, "# pinned to the versions pixsigma was tested with (pixsigma space)\n"
                      + "\n".join(reqs) + "\n")
    return files


def add_space_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("space", help="write a Hugging Face Space folder (docs/spaces.md)")
    s.add_argument("out", help="new folder for the Space")
    s.add_argument("--model", default="demo", help="PixArt-Σ: demo or a hub id")
    s.add_argument("--alpha-model", default=None, help="PixArt-α for Compare: demo-alpha, a hub id or none "
                   "(default: demo-alpha with the demo, none otherwise)")
    s.add_argument("--controlnet", default=None, help="a ControlNet hub id (or a shipped model's own)")
    s.add_argument("--lora", action="append", default=[], help="a LoRA to preload: shipped name or hub id "
                   "(repeatable)")
    s.add_argument("--train", action="store_true", help="show the Train tab (off by default on a Space)")
    s.add_argument("--hardware", default="zerogpu", help="zerogpu, cpu, or a Hub GPU flavour such as l4x1")
    s.add_argument("--title", default="pixsigma")


def run_space(args: argparse.Namespace) -> SpaceFiles:
    alpha = args.alpha_model if args.alpha_model is not None else ("demo-alpha" if args.model == "demo" else "none")
    opts = SpaceOptions(args.model, None if alpha.lower() == "none" else alpha, args.controlnet,
                        tuple(args.lora), args.train, args.hardware, args.title)
    files = write_space(args.out, opts)
    print(f"wrote the Space {files.folder} ({len(files.vendored)} files of pixsigma; hardware "
          f"{opts.suggested_hardware}); publish: hf upload --repo-type space USER/NAME {files.folder} .")
    return files
