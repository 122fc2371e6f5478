"""Security: tokens never logged, CORS off unless configured, per-token rate limits, and a hostile agent held to
the run's policy. (Scopes on every route and the websocket: tests/server/test_auth.py; names that could leave
the checkpoint directory: test_checkpoints.py.)"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from control_server.auth import TokenEntry, TokenTable
from control_server.cli import build_parser, config_from_args
from control_server.config import ServerConfig
from protocols import (
    CommandEnvelope,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RateLimit,
    RequestRejected,
    RunRegistration,
    RunsteerError,
    SetHparams,
    Unauthorized,
)
from protocols.client import Client
from tests.server.helpers import raw_request, row_counts
from tests.serving import ServerProcess, ServerThread

TOKENS = {
    "root": ("root-secret-token-0123456789", ["admin"]),
    "reader": ("reader-secret-token-0123456789", ["read"]),
    "rules": ("agent-secret-token-0123456789", ["read", "command"]),
}
KINDS = {"rules": "agent"}
"""The kind of source each token acts as (`user` when not named)."""
WRONG = "wrong-secret-token-0123456789"


def table() -> TokenTable:
    entries = (
        TokenEntry(name=name, token=token, scopes=frozenset(scopes), kind=KINDS.get(name, "user"))  # type: ignore[arg-type]
        for name, (token, scopes) in TOKENS.items()
    )
    return TokenTable(entries)


def test_tokens_never_appear_in_the_server_log_or_its_answers(tmp_path: Path) -> None:
    """Good, unknown, unscoped and rate-limited tokens, over REST and the websocket: no token in the log or a body."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps([{"name": n, "token": t, "scopes": s} for n, (t, s) in TOKENS.items()]))
    server = ServerProcess(tmp_path / "runsteer.db", "--tokens-file", str(tokens_file), "--token-rate-limit", "30")
    server.start()
    bodies: list[bytes] = []
    try:
        with Client(server.url, token=TOKENS["root"][0]) as root:
            run_id = root.register_run(RunRegistration(name="secret")).run_id
            root.submit(run_id, Pause())
            with root.stream(run_id):
                pass
        for token in (*[t for t, _ in TOKENS.values()], WRONG, ""):
            for method, target in (
                ("GET", "/api/v1/runs"),
                ("PUT", f"/api/v1/runs/{run_id}/policy"),
                ("GET", f"/api/v1/runs/{run_id}/stream"),
                ("GET", "/metrics"),
            ):
                bodies.append(raw_request(server.url, method, target, b"{}", token=token).body)
        for _ in range(40):
            bodies.append(raw_request(server.url, "GET", "/api/v1/runs", token=TOKENS["reader"][0]).body)
        with Client(server.url, token=WRONG) as stranger, pytest.raises(Unauthorized):
            stranger.stream(run_id)
    finally:
        server.stop()
    log = server.log()
    assert "listening" in log and "shutting down" in log, "the log was captured"
    assert any(b"rate_limited" in body for body in bodies) and any(b"unauthorized" in body for body in bodies)
    for secret in [t for t, _ in TOKENS.values()] + [WRONG]:
        assert secret not in log
        assert all(secret.encode() not in body for body in bodies)


def preflight(url: str, origin: str) -> dict[str, str]:
    """Headers of a browser's CORS preflight and of a plain cross-origin GET."""
    parts = urlsplit(url)
    headers: dict[str, str] = {}
    for method, extra in (("OPTIONS", {"Access-Control-Request-Method": "POST"}), ("GET", {})):
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        connection.request(method, "/api/v1/runs", headers={"Origin": origin, **extra})
        response = connection.getresponse()
        response.read()
        headers.update({f"{method} {key.lower()}": value for key, value in response.getheaders()})
        headers[f"{method} status"] = str(response.status)
        connection.close()
    return headers


def test_cors_is_off_by_default_and_admits_only_the_configured_origin(tmp_path: Path) -> None:
    """Without --cors-origin no response allows any origin; with it, only that origin gets a preflight and headers."""
    default = ServerThread(ServerConfig(port=0, db=tmp_path / "a.db")).start()
    configured = ServerThread(
        ServerConfig(port=0, db=tmp_path / "b.db", cors_origins=("https://dash.example",))
    ).start()
    try:
        closed = preflight(default.url, "https://dash.example")
        assert not any("access-control" in key for key in closed)
        assert closed["OPTIONS status"] != "204"
        allowed = preflight(configured.url, "https://dash.example")
        assert allowed["OPTIONS status"] == "204"
        assert (
            allowed["OPTIONS access-control-allow-origin"]
            == allowed["GET access-control-allow-origin"]
            == "https://dash.example"
        )
        other = preflight(configured.url, "https://evil.example")
        assert not any("access-control" in key for key in other)
    finally:
        default.stop()
        configured.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerThread]:
    """A server with tokens and a budget of 120 requests a minute per token."""
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", token_rate_limit=120), table()).start()
    yield running
    running.stop()


def test_a_token_past_its_request_budget_gets_429_with_retry_after_while_other_tokens_go_on(
    secured: ServerThread,
) -> None:
    """The reader's burst runs out after about 120 requests; the agent's token and public routes are unaffected."""
    reader = TOKENS["reader"][0]
    answers = [raw_request(secured.url, "GET", "/api/v1/runs", token=reader) for _ in range(200)]
    statuses = [answer.status for answer in answers]
    first_refusal = statuses.index(429)
    assert 120 <= first_refusal < 140 and set(statuses[:first_refusal]) == {200}
    refused = answers[first_refusal]
    assert refused.error.error == "rate_limited" and "120 requests a minute" in refused.error.message
    assert int(refused.headers["retry-after"]) >= 1
    assert raw_request(secured.url, "GET", "/api/v1/runs", token=TOKENS["rules"][0]).status == 200
    assert raw_request(secured.url, "GET", "/healthz").status == 200
    time.sleep(int(refused.headers["retry-after"]))
    assert raw_request(secured.url, "GET", "/api/v1/runs", token=reader).status == 200


def test_the_server_command_takes_the_token_rate_limit_flag() -> None:
    """`runsteer server --token-rate-limit 600` sets the budget; it is off (0) by default."""
    assert config_from_args(build_parser().parse_args(["--token-rate-limit", "600"])).token_rate_limit == 600
    assert config_from_args(build_parser().parse_args([])).token_rate_limit == 0


HOSTILE_POLICY = Policy(
    bounds={"set_hparams.lr": {"min": 1e-5, "max": 1e-2}},  # type: ignore[dict-item]
    rate_limit=RateLimit(max_commands=5, per_seconds=60),
    approval_required=["agent:*"],
)


def test_a_hostile_agent_cannot_exceed_bounds_skip_approval_spoof_a_source_or_flood(secured: ServerThread) -> None:
    """An agent token trying every trick gets refusals; only its in-bounds proposals exist, held for a person."""
    with Client(secured.url, token=TOKENS["root"][0]) as root:
        run_id = root.register_run(RunRegistration(name="guarded", policy=HOSTILE_POLICY)).run_id
    before = row_counts(secured.config.db)
    refusals: dict[str, int | str] = {}
    with Client(secured.url, token=TOKENS["rules"][0]) as agent:
        attacks = {
            "out of bounds": lambda: agent.submit(run_id, SetHparams(lr=0.5), source="agent:rules"),
            "as a person": lambda: agent.submit(run_id, SetHparams(lr=0.5), source="user:alice"),
            "as a person of its own name": lambda: agent.submit(run_id, Pause(), source="user:rules"),
            "as a script of its own name": lambda: agent.submit(run_id, Pause(), source="script:rules"),
            "as the server of its own name": lambda: agent.submit(run_id, Pause(), source="system:rules"),
            "as another agent": lambda: agent.submit(run_id, Pause(), source="agent:other"),
            "as the server": lambda: agent.submit(run_id, Pause(), source="system:server"),
            "its own policy": lambda: agent.set_policy(run_id, Policy()),
            "as the trainer": lambda: agent.push_metrics(
                run_id, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 0.0})])
            ),
        }
        for name, attack in attacks.items():
            with pytest.raises(RunsteerError) as refused:
                attack()
            refusals[name] = refused.value.status
        assert row_counts(secured.config.db) == before, "nothing stored from a refused attack"
        held = agent.submit(run_id, SetHparams(lr=1e-3), source="agent:rules", reason="trust me")
        assert held.status == "pending_approval", "hold=false does not skip the policy's hold"
        with pytest.raises(Unauthorized) as self_approval:
            agent.approve(run_id, held.id, source="agent:rules")
        refusals["approving itself"] = self_approval.value.status
        with pytest.raises(Unauthorized) as as_person:
            agent.approve(run_id, held.id, source="user:alice")
        refusals["approving as a person"] = as_person.value.status
        with pytest.raises(Unauthorized) as as_itself_a_person:
            agent.approve(run_id, held.id, source="user:rules")
        refusals["approving as a person of its own name"] = as_itself_a_person.value.status
        with agent.stream(run_id) as stream, pytest.raises(RequestRejected) as over_stream:
            stream.submit(CommandEnvelope(command=SetHparams(lr=0.5), source="agent:rules"))
        assert over_stream.value.body is not None
        refusals["out of bounds over the stream"] = over_stream.value.body.error
        flood = []
        for _ in range(10):
            try:
                flood.append(agent.submit(run_id, Pause(), source="agent:rules").status)
            except RequestRejected as exc:
                flood.append(exc.status)  # type: ignore[arg-type]
    assert refusals == {
        "out of bounds": 422,
        "as a person": 403,
        "as a person of its own name": 403,
        "as a script of its own name": 403,
        "as the server of its own name": 403,
        "as another agent": 403,
        "as the server": 403,
        "its own policy": 403,
        "as the trainer": 403,
        "approving itself": 403,
        "approving as a person": 403,
        "approving as a person of its own name": 403,
        "out of bounds over the stream": "policy_violation",
    }
    assert flood[:4] == ["pending_approval"] * 4 and set(flood[4:]) == {429}, "the run's rate limit holds the flood"
    with Client(secured.url, token=TOKENS["root"][0]) as root:
        commands = root.list_commands(run_id)
        assert {command.status for command in commands} == {"pending_approval"}
        assert {command.source for command in commands} == {"agent:rules"}
        assert root.next_commands(run_id, after_seq=0, wait_s=0) == [], "nothing reached the trainer"
