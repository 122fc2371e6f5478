"""The tokens file and RUNSTEER_TOKENS: an empty list, a world-writable file, a short token, a token with a trailing
newline and a repeated name are each refused at start-up with a message that never shows a token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from control_server.auth import TOKENS_ENV, TokenTable

GOOD = {"name": "root", "token": "admin-token-0123456789", "scopes": ["admin"]}


def write(path: Path, entries: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(entries))
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def no_environment_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKENS_ENV, raising=False)


@pytest.mark.parametrize(
    ("entries", "mode", "says"),
    [
        pytest.param([], 0o600, "the list is empty, which would turn auth off", id="empty-list"),
        pytest.param([GOOD], 0o666, "world-writable", id="world-writable"),
        pytest.param(
            [{**GOOD, "token": "short-secret"}], 0o600, "entry 0: token: String should have at least 16", id="short"
        ),
        pytest.param(
            [{**GOOD, "token": "admin-token-0123456789\n"}], 0o600, "entry 0: token: String should match", id="newline"
        ),
        pytest.param([GOOD, {**GOOD, "token": "another-token-0123456789"}], 0o600, "repeated: 'root'", id="same-name"),
        pytest.param([GOOD, {**GOOD, "name": "twin"}], 0o600, "each token must be used once", id="same-token"),
    ],
)
def test_a_bad_tokens_file_is_refused_saying_why_without_showing_a_token(
    tmp_path: Path, entries: list[dict[str, object]], mode: int, says: str
) -> None:
    """Each case raises ValueError naming the file and the problem; no token text appears in the message."""
    path = write(tmp_path / "tokens.json", entries, mode)
    with pytest.raises(ValueError) as refused:
        TokenTable.load(path)
    message = str(refused.value)
    assert str(path) in message and says in message
    for entry in entries:
        assert str(entry["token"]).strip() not in message


def test_an_empty_list_in_the_environment_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """RUNSTEER_TOKENS='[]' would silently turn auth off: refused, naming the variable."""
    monkeypatch.setenv(TOKENS_ENV, "[]")
    with pytest.raises(ValueError, match=rf"bad tokens in {TOKENS_ENV}: the list is empty"):
        TokenTable.load(None)


def test_a_good_file_loads_and_a_token_binds_its_kind(tmp_path: Path) -> None:
    """A private file loads; `kind` sets the source the token acts as (`user` when left out)."""
    path = write(
        tmp_path / "tokens.json", [GOOD, {"name": "rules", "token": "x" * 20, "scopes": ["command"], "kind": "agent"}]
    )
    table = TokenTable.load(path)
    assert [(p.name, p.source) for _, p in table.entries] == [("root", "user:root"), ("rules", "agent:rules")]
    assert table.authenticate("x" * 20) is not None and table.authenticate("x" * 20 + "\n") is None


def test_the_server_command_refuses_an_empty_tokens_file_instead_of_running_without_auth(tmp_path: Path) -> None:
    """`python -m control_server --tokens-file` with `[]` exits non-zero saying why, before creating the store."""
    path = write(tmp_path / "tokens.json", [])
    env = {key: value for key, value in os.environ.items() if key != TOKENS_ENV}
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "control_server",
            "--port",
            "0",
            "--db",
            str(tmp_path / "x.db"),
            "--tokens-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert finished.returncode != 0
    assert "the list is empty, which would turn auth off" in finished.stderr
    assert not (tmp_path / "x.db").exists()
