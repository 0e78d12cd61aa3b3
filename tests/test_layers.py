"""The layers import one way, read from the sources (imports inside functions included):

    retrieval                  the model side; never imports indexer
    indexer.store              what an index is (LMDB, FAISS, search, the read side); imports no other indexer layer
    indexer.build              how an index is filled; imports indexer.store only
    indexer.serve              the HTTP service; imports indexer.store only
    indexer.<module>           the commands on top (query, eval_db, demo, ...): any of the above

and no project module imports another's private (underscore) names, and no two modules import each other.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import retrieval

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("retrieval", "indexer")
LAYERS = {  # layer -> the indexer layers it may import (besides itself)
    "indexer.store": set(),
    "indexer.build": {"indexer.store"},
    "indexer.serve": {"indexer.store"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))] + [ROOT / "cli.py"]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def _project_target(module: str, names: list[str], sources: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads: `from pkg import mod` names a module too."""
    targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in sources]
    return targets or ([module] if module in sources else [])


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def _edges() -> list[tuple[str, int, str, list[str]]]:
    sources = _sources()
    return [(name, line, target, names)
            for name, path in sources.items()
            for line, module, names in _imports(name, path)
            for target in _project_target(module, names, sources)]


def test_the_layers_import_one_way():
    offenders = []
    for name, line, target, _ in _edges():
        if name.startswith("retrieval") and target.startswith("indexer"):
            offenders.append(f"{name}:{line} imports {target} (retrieval never imports indexer)")
        here, there = _layer(name), _layer(target)
        if here and target.startswith("indexer.") and there != here and there not in LAYERS[here]:
            offenders.append(f"{name}:{line} imports {target} ({here} may import {sorted(LAYERS[here]) or 'none'})")
    assert offenders == []


def test_no_module_imports_another_modules_private_names():
    modules = _sources()
    offenders = [f"{name}:{line} takes {n} from {target}" for name, line, target, names in _edges()
                 for n in names if n.startswith("_") and not n.endswith("__")    # dunders are public
                 and target != name and f"{target}.{n}" not in modules]           # a private module may be imported
    assert offenders == []


def test_no_two_modules_import_each_other():
    """A cycle, even through an import inside a function, means one of the two holds the other's job."""
    edges = {(name, target) for name, _, target, _ in _edges() if target != name
             and not name.startswith(target + ".") and not target.startswith(name + ".")}  # a package's __init__
    cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert cycles == []


def test_the_checks_see_the_imports_they_judge():
    """The edges are real: the layer test would be vacuous if relative imports were not resolved."""
    edges = {(name, target) for name, _, target, _ in _edges()}
    assert ("indexer.build.pipeline", "indexer.store.lmdb_store") in edges
    assert ("indexer.serve.engine", "indexer.store.read") in edges
    assert ("indexer.store.search", "indexer.store.ann") in edges  # `from . import ann`


PROCESS_WIDE = {  # setters of process-wide state -> the entry points allowed to call them
    "keep_freed_memory": {"cli"},                          # glibc malloc tuning
    "allow_pixels": {"cli", "indexer.build.ray_encode"},   # Pillow's MAX_IMAGE_PIXELS (a Ray task: a process)
}


def test_process_wide_settings_are_made_by_entry_points_only():
    """Library functions a user may import leave glibc's and Pillow's process-wide settings alone."""
    calls = []
    for name, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in PROCESS_WIDE and name not in PROCESS_WIDE[func]:
                    calls.append(f"{name}:{node.lineno} calls {func}")
            if isinstance(node, ast.Assign):
                calls += [f"{name}:{node.lineno} sets MAX_IMAGE_PIXELS" for t in node.targets
                          if isinstance(t, ast.Attribute) and t.attr == "MAX_IMAGE_PIXELS"
                          and name != "retrieval.data.decode"]   # allow_pixels itself
    assert calls == []


def _retrieval_modules() -> list[str]:
    return ["retrieval"] + [m.name for m in pkgutil.walk_packages(retrieval.__path__, "retrieval.")]


@pytest.mark.slow
def test_importing_any_retrieval_module_leaves_indexer_unimported():
    """Each module in a fresh interpreter: `indexer` must not be in sys.modules afterwards."""
    code = (
        "import importlib, sys\n"
        f"for name in {_retrieval_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "    bad = sorted(m for m in sys.modules if m == 'indexer' or m.startswith('indexer.'))\n"
        "    assert not bad, f'{name} imported {bad}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
