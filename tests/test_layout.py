"""The package layout: the engine (``pixsigma``) stands alone; tests share builders only through ``fixtures``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("train", "shapes", "gradio", "matplotlib")  # what the engine must never load


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in a file: import/from statements (relative ones resolved against the
    file's package under ``root``) and ``importlib.import_module``/``__import__`` calls with a string literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            found.append((node.lineno, ".".join(p for p in (base, node.module) if p)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def test_importing_the_engine_loads_no_world_trainer_app_or_plotting():
    code = ("import json, sys\nimport pixsigma.pipeline, pixsigma.cli\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert "pixsigma.pipeline" in loaded and "pixsigma.cli" in loaded  # the probe saw the imports it made
    assert [m for m in loaded if top(m) in FORBIDDEN] == []


def test_no_engine_file_imports_train_or_shapes():
    files = sorted((ROOT / "pixsigma").rglob("*.py"))
    assert len(files) > 10
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in imported_modules(f)
           if top(mod) in FORBIDDEN]
    assert bad == []


def test_the_import_scan_sees_every_form(tmp_path):
    """The scan above can fail: each way of importing ``train`` is found."""
    probe = tmp_path / "pixsigma" / "model" / "probe.py"  # in a subpackage: the relative import resolves there
    probe.parent.mkdir(parents=True)
    probe.write_text("import train.loop\nfrom shapes import world\nfrom ..x import y\nimport importlib\n"
                     "importlib.import_module('gradio')\n__import__('matplotlib.pyplot')\n")
    mods = [m for _, m in imported_modules(probe, tmp_path)]
    assert mods == ["train.loop", "shapes", "pixsigma.x", "importlib", "gradio", "matplotlib.pyplot"]


@pytest.mark.parametrize("folder", ["tests", "tests/browser"])
def test_no_test_module_imports_another(folder):
    """Shared builders live in tests/fixtures.py (and pytest fixtures in conftest.py), not in test modules."""
    tests = sorted((ROOT / folder).glob("*.py"))
    names = {p.stem for p in (ROOT / "tests").rglob("test_*.py")} | {"conftest"}
    bad = [f"{p.name}:{line} imports {mod}" for p in tests for line, mod in imported_modules(p)
           if top(mod) in names or mod.startswith("tests.test_") or mod == "tests.conftest"]
    assert bad == []
