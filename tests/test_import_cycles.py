"""No import circles among the repository's modules, and no function-local imports in the engine.

Every ``import`` and ``from … import`` is read with ``ast``, those inside functions included (a function-local
import that closes a circle is still a circle; it only fails later). Imports under ``if TYPE_CHECKING:`` never run
and are left out. ``from package import name`` is an edge to ``package.name`` where that is a module of the
repository, else to ``package``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pixsigma", "pixsigma_ui", "train", "shapes", "bench")
SCRIPTS = ("app.py",)  # the clone's entry point (the app itself: pixsigma_ui.server)
# Function-local imports the engine keeps: optional dependencies, imported only on the path that needs them.
OPTIONAL_LOCAL = {("pixsigma/pipeline.py", "huggingface_hub"),  # hub ids only
                  ("pixsigma/t5.py", "torchao.quantization"),  # --t5 int8 without bitsandbytes
                  ("pixsigma/t5.py", "transformers"),  # its TorchAoConfig imports torchao (same path)
                  ("pixsigma/text.py", "diffusers"),  # clean_caption, only with bs4 and ftfy installed
                  ("pixsigma/cli.py", "pixsigma_ui.server")}  # `pixsigma app`: the app and gradio, the [app] extra


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of the repository's packages and scripts under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    for s in SCRIPTS:
        if (root / s).is_file():
            out[Path(s).stem] = root / s
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                                         or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None, ast.AST, bool]]:
    """(module, name imported from it or None, node, inside a function) for every import that can run; relative
    imports resolved against ``module``."""
    found: list[tuple[str, str | None, ast.AST, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if _type_checking(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, None, node, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found.extend((base, a.name, node, in_function) for a in node.names)
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the repository modules it imports} (``from pkg import sub`` is an edge to ``pkg.sub`` where that
    is a module, else to ``pkg``)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for base, name, _, _ in imports(ast.parse(path.read_text(), str(path)), mod, path.name == "__init__.py"):
            target = f"{base}.{name}" if name is not None and f"{base}.{name}" in files else base
            if target in files and target != mod:
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_repository():
    graph = import_graph(ROOT)
    assert len(graph) > 100 and "pixsigma.pipeline" in graph["pixsigma.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_has_no_function_local_imports_but_optional_dependencies():
    local = []
    for mod, path in module_files(ROOT).items():
        if mod == "pixsigma" or mod.startswith("pixsigma."):
            rel = str(path.relative_to(ROOT))
            for base, _, node, in_function in imports(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
                if in_function and (rel, base) not in OPTIONAL_LOCAL:
                    local.append(f"{rel}:{node.lineno} {base}")
    assert sorted(set(local)) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize("files,cycle", [
    # a function-local import closing the circle is found
    ({"pixsigma/__init__.py": "", "pixsigma/a.py": "from pixsigma.b import f\n",
      "pixsigma/b.py": "def f():\n    from pixsigma import a\n"}, ["pixsigma.a", "pixsigma.b", "pixsigma.a"]),
    # three modules, a relative import among them
    ({"train/__init__.py": "", "train/x.py": "import train.y\n", "train/y.py": "from .z import q\n",
      "train/z.py": "from train import x\n"}, ["train.x", "train.y", "train.z", "train.x"]),
    # across packages
    ({"pixsigma_ui/__init__.py": "", "pixsigma/__init__.py": "", "pixsigma_ui/t.py": "from pixsigma.u import v\n",
      "pixsigma/u.py": "import pixsigma_ui.t\n"}, ["pixsigma.u", "pixsigma_ui.t", "pixsigma.u"]),
    # TYPE_CHECKING imports never run: no circle
    ({"shapes/__init__.py": "", "shapes/p.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
      "    from shapes.q import Q\n", "shapes/q.py": "from shapes.p import P\n"}, None),
    # a package importing a name from its own leaf: no circle
    ({"bench/__init__.py": "from bench.leaf import X\n", "bench/leaf.py": "X = 1\n",
      "bench/user.py": "from bench import leaf\n"}, None),
])
def test_the_cycle_finder_finds_circles(tmp_path, files, cycle):
    _write(tmp_path, files)
    assert find_cycle(import_graph(tmp_path)) == cycle
