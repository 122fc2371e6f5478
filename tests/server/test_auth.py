"""Bearer tokens and scopes on every route and on the websocket; refusing to serve beyond loopback without tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_server.app import create_app
from control_server.auth import TokenEntry, TokenTable
from control_server.config import ServerConfig
from protocols import (
    AlertReport,
    CheckpointInfo,
    CheckpointSaved,
    CommandEnvelope,
    CommandResult,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RequestRejected,
    RunRegistration,
    RunState,
    RunsteerError,
    Scope,
    Unauthorized,
)
from protocols.client import Client
from tests.server.helpers import raw_request
from tests.serving import ServerProcess, ServerThread

TOKENS = {
    "reader": ("read-token-0123456789", frozenset({"read"})),
    "commander": ("command-token-0123456789", frozenset({"command"})),
    "trainer": ("train-token-0123456789", frozenset({"train"})),
    "root": ("admin-token-0123456789", frozenset({"admin"})),
    "operator": ("operator-token-0123456789", frozenset({"read", "command"})),
}
WRONG_TOKEN = "not-a-token-0123456789"
CALLERS = {
    "read": "reader",
    "command": "commander",
    "train": "trainer",
    "admin": "root",
    "no-token": None,
    "wrong-token": "",
}
"""Who calls each route: a token holding each single scope, no token at all, and an unknown token."""


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One server with tokens for the whole module; every case works on its own fresh run."""
    table = TokenTable(TokenEntry(name=name, token=token, scopes=scopes) for name, (token, scopes) in TOKENS.items())
    db = tmp_path_factory.mktemp("auth") / "runsteer.db"
    running = ServerThread(ServerConfig(port=0, db=db), table).start()
    yield running
    running.stop()


def client_for(server: ServerThread, caller: str | None) -> Client:
    if caller is None:
        return Client(server.url)
    return Client(server.url, token=TOKENS[caller][0] if caller else WRONG_TOKEN)


@dataclass(frozen=True)
class Fixture:
    """A fresh run registered by the trainer token, with a delivered command (for results) and one pending approval
    (for approve/reject)."""

    run_id: str
    delivered: str
    pending: str


def prepare(server: ServerThread) -> Fixture:
    with client_for(server, "trainer") as trainer:
        run_id = trainer.register_run(
            RunRegistration(name="secured", policy=Policy(approval_required=["agent:*"]))
        ).run_id
    with client_for(server, "root") as admin:
        delivered = admin.submit(run_id, Pause()).id
        admin.next_commands(run_id, after_seq=0, wait_s=0)
        pending = admin.submit(run_id, Pause(), source="agent:rules").id
    return Fixture(run_id, delivered, pending)


Call = Callable[[Client, Fixture, str], object]
"""Make one successful request on a route: (client, fixture, the caller's name for command sources)."""


def raw_get(path: str) -> Call:
    def call(client: Client, fixture: Fixture, name: str) -> None:
        answer = raw_request(client.server, "GET", path, token=client.token)
        if answer.status >= 400:
            raise Unauthorized(answer.error.message, status=answer.status, body=answer.error)

    return call


def stream(run: bool) -> Call:
    def call(client: Client, fixture: Fixture, name: str) -> None:
        with client.stream(fixture.run_id if run else None):
            pass

    return call


checkpoint = CheckpointInfo(checkpoint_id="ck-1", branch="main", step=1, time=1.0)

ROUTES: dict[str, tuple[Scope | None, Call]] = {
    "GET /healthz": (None, raw_get("/healthz")),
    "GET /api/v1/schema": (None, raw_get("/api/v1/schema")),
    "GET /api/v1/openapi.json": (None, raw_get("/api/v1/openapi.json")),
    "GET /metrics": ("read", raw_get("/metrics")),
    "POST /api/v1/runs": ("train", lambda c, f, n: c.register_run(RunRegistration(name="another"))),
    "GET /api/v1/runs": ("read", lambda c, f, n: c.list_runs()),
    "GET /api/v1/runs/{run_id}": ("read", lambda c, f, n: c.get_run(f.run_id)),
    "PUT /api/v1/runs/{run_id}/policy": ("admin", lambda c, f, n: c.set_policy(f.run_id, Policy())),
    "POST /api/v1/runs/{run_id}/commands": ("command", lambda c, f, n: c.submit(f.run_id, Pause(), source=f"user:{n}")),
    "GET /api/v1/runs/{run_id}/commands": ("read", lambda c, f, n: c.list_commands(f.run_id)),
    "GET /api/v1/runs/{run_id}/commands/next": (
        "train",
        lambda c, f, n: c.next_commands(f.run_id, after_seq=0, wait_s=0),
    ),
    "GET /api/v1/runs/{run_id}/commands/{command_id}": ("read", lambda c, f, n: c.get_command(f.run_id, f.delivered)),
    "POST /api/v1/runs/{run_id}/commands/{command_id}/approve": (
        "command",
        lambda c, f, n: c.approve(f.run_id, f.pending, source=f"user:{n}"),
    ),
    "POST /api/v1/runs/{run_id}/commands/{command_id}/reject": (
        "command",
        lambda c, f, n: c.reject(f.run_id, f.pending, source=f"user:{n}"),
    ),
    "POST /api/v1/runs/{run_id}/commands/{command_id}/result": (
        "train",
        lambda c, f, n: c.report_result(f.run_id, f.delivered, CommandResult(status="applied", step=1)),
    ),
    "POST /api/v1/runs/{run_id}/metrics": (
        "train",
        lambda c, f, n: c.push_metrics(
            f.run_id, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 1.0})])
        ),
    ),
    "GET /api/v1/runs/{run_id}/metrics": ("read", lambda c, f, n: c.metrics_history(f.run_id)),
    "POST /api/v1/runs/{run_id}/events": (
        "train",
        lambda c, f, n: c.push_reports(
            f.run_id, [Heartbeat(state=RunState(step=1)), CheckpointSaved(checkpoint=checkpoint)]
        ),
    ),
    "POST /api/v1/runs/{run_id}/alerts": (
        "command",
        lambda c, f, n: c.raise_alert(f.run_id, AlertReport(message="look", source=f"user:{n}")),
    ),
    "GET /api/v1/runs/{run_id}/events": ("read", lambda c, f, n: c.list_events(f.run_id)),
    "GET /api/v1/runs/{run_id}/checkpoints": ("read", lambda c, f, n: c.list_checkpoints(f.run_id)),
    "GET /api/v1/runs/{run_id}/stream": ("read", stream(run=True)),
    "GET /api/v1/stream": ("read", stream(run=False)),
}
"""Every route the server has, the scope it needs (None: public) and a request that succeeds when allowed."""

SERVED = sorted(
    {
        f"{route.method} {route.resource.canonical}"
        for route in create_app(ServerConfig()).router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
)


def test_the_table_names_exactly_the_routes_the_server_has() -> None:
    """A route added to the protocol's table (so served) without a row here fails this test (and the table's cases)."""
    assert sorted(ROUTES) == sorted(SERVED)


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("route", SERVED)
def test_each_route_admits_exactly_the_callers_its_scope_allows(secured: ServerThread, route: str, caller: str) -> None:
    """401 without a token or with an unknown one, 403 without the scope, success with it (admin: everywhere)."""
    assert route in ROUTES, f"{route} is served but has no row in ROUTES: add its scope and a request"
    scope, call = ROUTES[route]
    fixture = prepare(secured)
    name = CALLERS[caller]
    with client_for(secured, name) as client:
        try:
            call(client, fixture, name or "nobody")
            status = 200
        except RunsteerError as error:
            status = error.status
            body = error.body
    if scope is None or caller in (scope, "admin"):
        expected = 200
    elif caller in ("no-token", "wrong-token"):
        expected = 401
    else:
        expected = 403
    assert status == expected
    if status != 200 and not route.endswith("/stream"):
        assert body is not None and body.error == ("unauthorized" if status == 401 else "forbidden")
        assert body.extra["scope"] == scope


def test_a_non_admin_token_may_only_submit_under_its_own_source(secured: ServerThread) -> None:
    """The commander token (kind `user` by default) submits as `user:commander` only: another name or another kind
    (`agent:commander`, `system:commander`) is 403 naming `source`; an admin may act as anyone."""
    fixture = prepare(secured)
    with client_for(secured, "commander") as commander:
        assert commander.submit(fixture.run_id, Pause(), source="user:commander").source == "user:commander"
        refusals = []
        for source in ("user:alice", "agent:commander", "script:commander", "system:commander"):
            with pytest.raises(Unauthorized) as refused:
                commander.submit(fixture.run_id, Pause(), source=source)
            refusals.append((refused.value.status, [(d.field, d.allowed) for d in refused.value.details]))
    assert refusals == [(403, [("source", "user:commander")])] * 4
    with client_for(secured, "root") as admin:
        assert admin.submit(fixture.run_id, Pause(), source="user:alice").source == "user:alice"
        assert [c.source for c in admin.list_commands(fixture.run_id)][-2:] == ["user:commander", "user:alice"]


def test_a_non_admin_token_may_only_approve_under_its_own_name(secured: ServerThread) -> None:
    """A person's approval is recorded under the token's own name; approving as someone else is 403 naming `source`."""
    fixture = prepare(secured)
    with client_for(secured, "commander") as commander:
        with pytest.raises(Unauthorized) as refused:
            commander.approve(fixture.run_id, fixture.pending, source="user:alice")
        assert refused.value.status == 403
        assert [d.field for d in refused.value.details] == ["source"]
        approved = commander.approve(fixture.run_id, fixture.pending, source="user:commander")
    assert approved.status == "queued"
    assert approved.message.startswith("approved by user:commander")


def test_the_stream_handshake_needs_a_read_token(secured: ServerThread) -> None:
    """No token or an unknown one: 401 on the handshake; a command-only token: 403; a read token: open."""
    fixture = prepare(secured)
    for caller, status in (("no-token", 401), ("wrong-token", 401), ("command", 403)):
        with client_for(secured, CALLERS[caller]) as client, pytest.raises(Unauthorized) as refused:
            client.stream(fixture.run_id)
        assert refused.value.status == status, caller
    with client_for(secured, "reader") as reader, reader.stream(fixture.run_id) as events:
        with client_for(secured, "trainer") as trainer:
            trainer.push_reports(fixture.run_id, [CheckpointSaved(checkpoint=checkpoint)])
        assert events.next_event(timeout_s=5) is not None


def test_submitting_over_the_stream_needs_the_command_scope_and_the_tokens_own_name(secured: ServerThread) -> None:
    """A read-only token's submit is refused on the socket; read+command works under its own name only."""
    fixture = prepare(secured)
    with client_for(secured, "reader") as reader, reader.stream(fixture.run_id) as events:
        with pytest.raises(RequestRejected) as no_scope:
            events.submit(CommandEnvelope(command=Pause(), source="user:reader"))
    assert no_scope.value.body is not None and no_scope.value.body.error == "forbidden"
    assert "'command'" in no_scope.value.body.message
    with client_for(secured, "operator") as operator, operator.stream(fixture.run_id) as events:
        record = events.submit(CommandEnvelope(command=Pause(), source="user:operator"))
        with pytest.raises(RequestRejected) as other_name:
            events.submit(CommandEnvelope(command=Pause(), source="user:alice"))
    assert record.source == "user:operator"
    assert other_name.value.body is not None and other_name.value.details[0].field == "source"
    with client_for(secured, "root") as admin:
        assert [c.source for c in admin.list_commands(fixture.run_id)][-1] == "user:operator"


def test_building_an_app_beyond_loopback_without_tokens_raises_and_says_why(tmp_path: Path) -> None:
    """create_app refuses 0.0.0.0 with no tokens, naming the fix; with tokens or on loopback it builds."""
    with pytest.raises(ValueError, match=r"refusing to bind 0\.0\.0\.0: without tokens .* --tokens-file"):
        create_app(ServerConfig(host="0.0.0.0", db=tmp_path / "a.db"), TokenTable([]))
    tokens = TokenTable([TokenEntry(name="root", token="admin-token-0123456789", scopes=frozenset({"admin"}))])
    assert create_app(ServerConfig(host="0.0.0.0", db=tmp_path / "b.db"), tokens) is not None
    assert create_app(ServerConfig(host="127.0.0.1", db=tmp_path / "c.db"), TokenTable([])) is not None


def test_the_server_command_refuses_to_bind_beyond_loopback_without_tokens(tmp_path: Path) -> None:
    """`python -m control_server --host 0.0.0.0` exits non-zero, printing why and what to do."""
    env = {key: value for key, value in os.environ.items() if key != "RUNSTEER_TOKENS"}
    finished = subprocess.run(
        [sys.executable, "-m", "control_server", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert finished.returncode != 0
    assert "refusing to bind 0.0.0.0" in finished.stderr
    assert "--tokens-file" in finished.stderr and "RUNSTEER_TOKENS" in finished.stderr
    assert not (tmp_path / "x.db").exists(), "nothing was created before refusing"


def test_the_server_command_binds_beyond_loopback_with_tokens_from_the_environment(tmp_path: Path) -> None:
    """With RUNSTEER_TOKENS set the same command starts, and its routes then demand a token."""
    tokens = '[{"name": "root", "token": "admin-token-0123456789", "scopes": ["admin"]}]'
    process = ServerProcess(tmp_path / "runsteer.db", "--host", "0.0.0.0", env={"RUNSTEER_TOKENS": tokens}).start()
    try:
        with Client(process.url) as anonymous, pytest.raises(Unauthorized) as refused:
            anonymous.list_runs()
        assert refused.value.status == 401
        with Client(process.url, token="admin-token-0123456789") as admin:
            assert admin.list_runs() == []
    finally:
        process.stop()
