"""The package arrows of DESIGN.md hold: each package imports only what it may."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "protocols": {"control_server", "trainer", "agents", "dashboard", "torch"},
    "control_server": {"trainer", "agents", "dashboard", "torch"},
    "trainer": {"control_server", "agents", "dashboard"},
    "agents": {"control_server", "trainer", "dashboard", "torch"},
    "dashboard": {"control_server", "trainer", "agents", "torch"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module a file imports."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_design_allows(package: str) -> None:
    """No file of a package imports a package it must not know about."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_runsteer_schema_loads_no_torch() -> None:
    """`runsteer schema` prints the schema without importing torch or the server."""
    probe = (
        "import sys, io, contextlib\n"
        "from protocols.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = main(['schema'])\n"
        "assert code == 0 and out.getvalue().startswith('{')\n"
        "print(sorted(m for m in ('torch', 'control_server', 'aiohttp') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
