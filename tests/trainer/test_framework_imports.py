"""The frameworks stay in their integration modules, so the rest of the trainer imports without them."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
ONLY_IN = {"transformers": "hf.py", "accelerate": "hf.py", "lightning": "lightning.py"}


def test_transformers_accelerate_and_lightning_are_imported_only_by_their_callback_modules() -> None:
    """trainer/hf.py alone imports transformers and accelerate; trainer/lightning.py alone imports lightning."""
    found: dict[str, set[str]] = {name: set() for name in ONLY_IN}
    for path in TRAINER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in found:
                    found[top].add(path.name)
    assert found == {name: {module} for name, module in ONLY_IN.items()}
