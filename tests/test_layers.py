"""The layers import one way: `retrieval/` (model side) never imports `indexer/` (storage and search side)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import retrieval

ROOT = Path(__file__).resolve().parent.parent


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


def test_no_retrieval_source_names_indexer_even_lazily():
    """Imports inside functions run only when called, so the sources are read too."""
    offenders = []
    for path in sorted((ROOT / "retrieval").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "indexer" or n.startswith("indexer.")]
    assert offenders == []
