"""The installed project: pyproject's console script and entry points resolve, the demo is found from any working
directory, and a fixed-seed image from ``python -m pixsigma`` is byte-identical to the one made before the layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image

from pixsigma.folder_settings import SAMPLING_FILE, SamplingDefaults
from pixsigma.io import read_params
from pixsigma.registry import EXPANDER_GROUP, prompt_expanders

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROMPT = "a red star above a blue ring"
# Made by the code before the shapes world left the engine, with the CLI's defaults (the demo Σ's sampling.json),
# one CPU thread: a different thread count sums in another order and may move a pixel by one level.
REFERENCE = ROOT / "tests" / "data" / "generate_demo_seed7.png"


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
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
    assert prompt_expanders() == declared and "shapes" in declared
    from shapes.prompts import expand_prompt

    (ep,) = entry_points(group=EXPANDER_GROUP, name="shapes")
    assert ep.load() is expand_prompt


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


def test_requirements_txt_pins_exactly_what_pyproject_declares():
    """setup.sh installs requirements.txt, then the project without deps: the two lists must name the same."""
    project = PYPROJECT["project"]
    declared = requirement_names(project["dependencies"]) | requirement_names(PYPROJECT["build-system"]["requires"])
    for extra in project["optional-dependencies"].values():
        declared |= requirement_names([r for r in extra if not r.startswith("pixsigma[")])
    lines = [ln.split("#")[0] for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert requirement_names([ln for ln in lines if ln.strip()]) == declared


def test_ci_runs_the_readmes_commands_and_set_up_installs_the_project():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "bash scripts/setup.sh" in ci and ci[-1] == "bash scripts/test.sh"  # the README's test command
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q -r requirements.txt" in setup and "-e ." in setup.split("requirements.txt", 1)[1]


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
