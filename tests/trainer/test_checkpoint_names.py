"""Checkpoint files stay inside the checkpoint directory whatever branch or tag a caller passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from trainer.checkpoints import CheckpointStore


@pytest.mark.parametrize(
    ("branch", "tag"), [("../escape", None), ("/etc", None), ("main", "../../tag"), (".hidden", None)]
)
def test_a_branch_or_tag_that_would_leave_the_directory_is_refused_and_nothing_is_written(
    tmp_path: Path, branch: str, tag: str | None
) -> None:
    """The save is refused before any file is written, inside the directory or outside it."""
    store = CheckpointStore(tmp_path / "checkpoints")
    with pytest.raises(ValidationError):
        store.save({"weights": [1.0]}, branch=branch, step=3, tag=tag)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == ["checkpoints"]
    assert store.entries == {}
