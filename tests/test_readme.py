"""Every Python example in the README runs against a real server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from protocols import RunRegistration
from protocols.client import Client

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_URL = "http://127.0.0.1:8765"


def python_examples() -> list[str]:
    """The README's ```python blocks that talk to a server."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if DEFAULT_URL in block]


def test_readme_has_python_examples() -> None:
    """The README shows the client in use."""
    assert python_examples()


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_readme_python_example_runs(index: int, client: Client, server_url: str) -> None:
    """The example runs unchanged but for the server address, and prints what it says it prints."""
    client.register_run(RunRegistration(name="readme"))
    source = python_examples()[index].replace(DEFAULT_URL, server_url)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(source, f"README example {index}", "exec"), {"__name__": "__readme__"})
    output = printed.getvalue()
    assert output.strip()
    if "Steer(" not in source:
        assert "readme" in output or "queued" in output
        return
    (run,) = [run for run in client.list_runs() if run.run_id in output]  # a steered loop prints its run id
    steps = client.metrics_history(run.run_id, keys=["loss"]).series["loss"].steps
    assert run.status == "finished" and steps == list(range(len(steps))) and f"{len(steps)} steps" in output
