"""The installed project: pyproject's console script and entry points resolve, the demo is found from any working
directory, a fixed-seed image from ``python -m pixsigma`` is byte-identical to the one made before the layout, and
the non-editable wheel claims only pixsigma's names and works from any directory without the training extra,
the web app included (``pixsigma app``, ``python -m pixsigma_ui``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from fixtures import TRAIN_ONLY, offline_env, served_app, wheel, wheel_env
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image

from pixsigma.folder_settings import SAMPLING_FILE, SamplingDefaults
from pixsigma.io import read_params
from pixsigma.layout import local_target
from pixsigma.registry import EXPANDER_GROUP, load_expander, prompt_expanders

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROMPT = "a red star above a blue ring"
# Made by the code before the shapes world left the engine, with the CLI's defaults (the demo Σ's sampling.json),
# one CPU thread: a different thread count sums in another order and may move a pixel by one level.
REFERENCE = ROOT / "tests" / "data" / "generate_demo_seed7.png"


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", s.strip(), maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_console_script_and_expanders_resolve_to_what_pyproject_names():
    scripts = PYPROJECT["project"]["scripts"]
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in scripts}
    assert {n: ep.value for n, ep in installed.items()} == scripts == {"pixsigma": "pixsigma.cli:main"}
    from pixsigma.cli import main

    assert installed["pixsigma"].load() is main
    declared = PYPROJECT["project"]["entry-points"][EXPANDER_GROUP]
    assert declared == {"shapes": "pixsigma.shapes.prompts:expand_prompt"}  # the wheel's name for shapes/
    # A clone imports the same file by its folder's name: one module, whether the editable install is older or not.
    installed = {name: local_target(value) for name, value in prompt_expanders().items()}
    assert installed == {name: local_target(value) for name, value in declared.items()}
    assert local_target(declared["shapes"]) == "shapes.prompts:expand_prompt"
    from shapes.prompts import expand_prompt

    assert load_expander("shapes") is expand_prompt


@pytest.mark.parametrize("name", ["llm", "json", "shapes.prompts:expand_prompt"])
def test_an_unknown_expander_is_refused_by_name_and_nothing_imported(tmp_path, name):
    """Only installed entry points are accepted: an importable module name or a module:function path is not."""
    (tmp_path / SAMPLING_FILE).write_text(json.dumps({"steps": 4, "prompt_expander": name}))
    with pytest.raises(ValueError) as e:
        SamplingDefaults.read(tmp_path)
    message = str(e.value)
    assert str(tmp_path / SAMPLING_FILE) in message and f"unknown prompt_expander {name!r}" in message
    assert "accepted: shapes, or null" in message and EXPANDER_GROUP in message
    with pytest.raises(ValueError, match=f"unknown prompt_expander {re.escape(repr(name))}"):
        SamplingDefaults(prompt_expander=name)


def declared_requirements() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    specs = list(project["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    for extra in project["optional-dependencies"].values():
        specs += [r for r in extra if not r.startswith("pixsigma[")]
    out: dict[str, Requirement] = {}
    for spec in specs:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        out[name] = Requirement(f"{name}{out[name].specifier & req.specifier}") if name in out else req
    return out


def pinned_requirements() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier  # exactly one clause: ==VERSION
            assert spec.operator == "==", f"requirements.txt must pin {req.name} exactly, got {line!r}"
            pins[req.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


def test_requirements_txt_pins_every_dependency_pyproject_declares_and_the_ranges_start_there():
    """setup.sh installs requirements.txt, then the project without deps: the two lists name the same packages,
    every one pinned; pyproject's range holds the pin and starts at it (nothing older is claimed untested)."""
    declared, pinned = declared_requirements(), pinned_requirements()
    assert set(pinned) == set(declared)
    for name, req in declared.items():
        assert pinned[name] in req.specifier, f"{name}=={pinned[name]} is outside pyproject's {req.specifier}"
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower and max(lower) == pinned[name], f"{name}: pyproject's range must start at the tested pin"
    from importlib.metadata import version

    for name, pin in pinned.items():  # the pins are what this environment tests with
        assert Version(version(name).split("+")[0]) == pin, f"{name} installed {version(name)}, pinned {pin}"


def test_accelerate_and_the_training_packages_are_only_in_the_train_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    base = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert "peft" in base  # the engine's LoRAs (pixsigma.lora); peft itself requires accelerate
    for name in ("accelerate", "came-pytorch", "matplotlib"):
        assert name not in base and Requirement(next(r for r in extras["train"] if r.startswith(name))).name == name
        assert not any(r.startswith(name) for key, v in extras.items() if key != "train" for r in v)


def test_ci_runs_the_readmes_commands_and_set_up_installs_the_project():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "bash scripts/setup.sh" in ci and ci[-1] == "bash scripts/test.sh"  # the README's test command
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q -r requirements.txt" in setup and "-e ." in setup.split("requirements.txt", 1)[1]
    assert "pixsigma-checkout.pth" in setup  # a clone's venv imports train/ and shapes/ by name from anywhere


def test_generate_is_byte_identical_to_before_the_layout(tmp_path):
    out = tmp_path / "OUT.png"
    run([sys.executable, "-m", "pixsigma", "generate", PROMPT, "--model", "demo", "--seed", "7", "--out", str(out)],
        ROOT)
    assert Image.open(out).tobytes() == Image.open(REFERENCE).tobytes()
    assert read_params(out) == read_params(REFERENCE)  # the same request: steps, guidance, expanded prompt


def test_console_script_finds_the_demo_from_any_directory(tmp_path):
    exe = shutil.which("pixsigma", path=str(Path(sys.executable).parent))
    assert exe, "no `pixsigma` next to the interpreter: run `pip install -e .` (scripts/setup.sh does)"
    (tmp_path / "assets").mkdir()  # a working directory with its own, empty assets/ must not be what is read
    done = run([exe, "generate", PROMPT, "--model", "demo", "--seed", "1", "--steps", "2", "--out", "a.png"], tmp_path)
    assert "wrote a.png" in done.stdout
    params = read_params(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size == (256, 256) and params["model"] == "demo"
    assert params["steps"] == 2 and params["seed"] == 1


# -- the non-editable wheel ------------------------------------------------------------------------------------

ALLOWED_TOP = {"pixsigma", "pixsigma_ui", "pixsigma-0.1.0.dist-info"}


def test_the_wheel_claims_only_pixsigmas_names_and_carries_the_demo_configs_and_entry_points():
    with zipfile.ZipFile(wheel()) as z:
        names = z.namelist()
        entry = z.read("pixsigma-0.1.0.dist-info/entry_points.txt").decode()
    assert {n.split("/", 1)[0] for n in names} == ALLOWED_TOP
    shipped = {str(p.relative_to(ROOT)) for d in ("sigma", "alpha", "loras") for p in (ROOT / "assets" / "demo" / d)
               .rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and {f"pixsigma/data/{p}" for p in shipped} <= set(names)
    configs = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("pixsigma/data/configs/")} == configs
    for pkg in ("train", "shapes"):
        modules = {p.name for p in (ROOT / pkg).glob("*.py")}
        assert {n.rsplit("/", 1)[1] for n in names if n.startswith(f"pixsigma/{pkg}/")} == modules
    for pkg in ("pixsigma", "pixsigma_ui"):  # every module of the engine and the app, subpackages included
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / pkg).rglob("*.py") if "data" not in p.parts}
        assert modules <= set(names), f"not in the wheel: {sorted(modules - set(names))}"
    assert not any(n.startswith(("pixsigma/bench", "pixsigma/tests")) for n in names)
    assert "shapes = pixsigma.shapes.prompts:expand_prompt" in entry and "shapes = pixsigma.shapes.lab:WORLD" in entry


def test_the_installed_wheel_generates_with_the_demo_from_any_directory_without_the_training_extra(tmp_path):
    env = wheel_env()
    (tmp_path / "assets").mkdir()  # an assets/ of the working directory is not what is read
    done = run([str(env / "bin" / "pixsigma"), "generate", "a red star", "--model", "demo", "--steps", "2",
                "--seed", "3", "--out", "x.png"], tmp_path, offline_env())
    params = read_params(tmp_path / "x.png")
    assert "wrote x.png" in done.stdout and params["steps"] == 2 and params["model"] == "demo"
    assert params["expanded_prompts"], "the demo's prompt expander (an entry point into pixsigma.shapes) ran"


def test_the_installed_wheel_imports_every_module_under_its_own_names_only(tmp_path):
    """Every module of pixsigma, pixsigma.train, pixsigma.shapes and pixsigma_ui imports from a directory holding
    foreign train/ and shapes/ packages that fail on import: nothing reaches for a generic top-level name.
    Only modules needing the [train] extra (left out of this environment) may fail, and only on those."""
    for foreign in ("train", "shapes"):
        (tmp_path / foreign).mkdir()
        (tmp_path / foreign / "__init__.py").write_text(f"raise RuntimeError('the foreign {foreign} was imported')\n")
    script = """
import importlib, json, pkgutil
import pixsigma, pixsigma_ui, pixsigma.layout as layout
assert layout.CHECKOUT is None and layout.DATA_ROOT.name == "data", layout.DATA_ROOT
assert (layout.DATA_ROOT / "assets/demo/loras/tiny-huge").is_dir() and (layout.DATA_ROOT / "configs").is_dir()
failed = {}
for pkg in (pixsigma, pixsigma_ui):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            failed[info.name] = e.name
from pixsigma.registry import LORA_ALIASES, MODEL_ALIASES, load_expander
from pixsigma.train.worlds import load_world
extra_seen = importlib.util.find_spec("came_pytorch") is not None
print(json.dumps({"failed": failed, "extra_seen": extra_seen, "file": pixsigma.__file__,
                  "models": {k: str(v) for k, v in MODEL_ALIASES.items()},
                  "loras": {k: v.is_dir() for k, v in LORA_ALIASES.items()},
                  "expander": load_expander("shapes").__module__, "world": type(load_world()).__module__}))
"""
    env = wheel_env()
    out = json.loads(run([str(env / "bin" / "python"), "-c", script], tmp_path, offline_env()).stdout)
    assert out["file"].startswith(str(env))
    assert set(out["failed"].values()) <= {m.replace("-", "_") for m in TRAIN_ONLY}, out["failed"]
    assert all(m.startswith(("pixsigma.train.", "pixsigma.shapes.")) for m in out["failed"]), out["failed"]
    assert not out["extra_seen"]  # the [train] extra really is absent here, so every import above ran without it
    assert all(v.startswith(str(env)) for v in out["models"].values()) and all(out["loras"].values())
    assert out["expander"] == "pixsigma.shapes.prompts" and out["world"] == "pixsigma.shapes.lab"


def test_the_installed_wheel_serves_the_app_from_any_directory_and_asks_for_the_extra_without_gradio(tmp_path):
    env = wheel_env()
    helped = run([str(env / "bin" / "python"), "-m", "pixsigma_ui", "--help"], tmp_path, offline_env()).stdout
    assert helped.startswith("usage: python -m pixsigma_ui ") and "--enable-training" in helped
    with served_app(["--alpha-model", "none", "--host", "127.0.0.1"], tmp_path, offline_env(),
                    command=[str(env / "bin" / "pixsigma"), "app"]) as url:
        page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert "pixsigma" in page  # the app's own page, served by the installed package (the demo Σ loaded)
    assert "Traceback" not in (tmp_path / "app.log").read_text()
    no_gradio = "import sys; sys.modules['gradio'] = None; from pixsigma.cli import main; sys.exit(main(['app']))"
    done = subprocess.run([str(env / "bin" / "python"), "-c", no_gradio], cwd=tmp_path, env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ('error: the app needs the [app] extra (gradio is not installed): '
                           'pip install "pixsigma[app]"\n')
