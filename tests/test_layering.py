"""Imports between our packages go one way: models, split_core, strategies, flower_app, deploy,
experiments."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["models", "split_core", "strategies", "flower_app", "deploy", "experiments"]
# each package may import only those before it


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages of ours that each module of ``package`` imports, by module path."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    found.setdefault(str(path.relative_to(ROOT)), set()).add(top)
    return found


def test_imports_only_go_down_the_layers():
    violations = []
    for rank, package in enumerate(LAYERS):
        allowed = set(LAYERS[:rank])
        for module, targets in imported_packages(package).items():
            violations += [f"{module} imports {t}" for t in sorted(targets - allowed)]
    assert violations == []


def test_the_checker_sees_imports():
    """Guard against a checker that finds nothing: the apps do import the strategy."""
    assert "strategies" in imported_packages("flower_app")["flower_app/server_app.py"]
