"""A table of bad requests: each is answered 4xx with an ErrorBody naming the field, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control_server.config import ServerConfig
from protocols import (
    Bounds,
    CommandResult,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RateLimit,
    RunsteerError,
    SetDataMix,
    SetHparams,
)
from protocols.client import Client
from tests.server.helpers import RawAnswer, raw_request, register, row_counts
from tests.serving import ServerThread

MAX_BODY = 4096
RUN_POLICY = Policy(
    bounds={"set_hparams.lr": Bounds(min=1e-6, max=0.01)},
    rate_limit=RateLimit(max_commands=3, per_seconds=60),
)


@dataclass(frozen=True)
class Context:
    """What the case runs against: a run with domains `web` and `code` and one delivered command `known`."""

    client: Client
    url: str
    run_id: str


@dataclass(frozen=True)
class Bad:
    """One bad request and what the error must say about it."""

    status: int
    field: str
    """The `field` one of the error's details must name."""
    allowed: str = ""
    """A substring of that detail's `allowed` (the range or values that would have been accepted)."""
    says: str = ""
    """A substring of the error's message or of that detail's message."""
    method: str = "POST"
    target: str = "/api/v1/runs/{run}/commands"
    body: bytes | None = None
    call: Callable[[Context], object] | None = None
    """Sent through the reference client instead, for bad requests it can express."""
    prepare: Callable[[Context], object] | None = None
    """Runs before the snapshot (e.g. uses up the rate limit)."""
    retry_after: bool = False
    """The answer must carry a `Retry-After` header of whole seconds."""


def command(body: dict[str, Any] | str) -> bytes:
    """An envelope around a command given as a dict, or a raw JSON text for the command."""
    text = body if isinstance(body, str) else json.dumps(body)
    return ('{"command": ' + text + "}").encode()


def envelope(**fields: Any) -> bytes:
    return json.dumps({"command": {"type": "pause"}, **fields}).encode()


def metrics(*samples: dict[str, Any] | str) -> bytes:
    parts = [sample if isinstance(sample, str) else json.dumps(sample) for sample in samples]
    return ('{"samples": [' + ", ".join(parts) + "]}").encode()


def use_up_rate_limit(ctx: Context) -> None:
    # `known` took one of the three; two more fill the window.
    ctx.client.submit(ctx.run_id, {"type": "evaluate"})
    ctx.client.submit(ctx.run_id, {"type": "evaluate"})


CASES: dict[str, Bad] = {
    # Commands: types, finiteness, ranges, names, shape.
    "lr-as-a-string": Bad(
        422, "command.lr", "(0, 10]", "valid number", body=command('{"type": "set_hparams", "lr": "0.1"}')
    ),
    "lr-as-a-bool": Bad(422, "command.lr", "(0, 10]", body=command('{"type": "set_hparams", "lr": true}')),
    "lr-NaN-literal": Bad(422, "command.lr", "(0, 10]", "finite", body=command('{"type": "set_hparams", "lr": NaN}')),
    "lr-Infinity-literal": Bad(
        422, "command.lr", "(0, 10]", "finite", body=command('{"type": "set_hparams", "lr": Infinity}')
    ),
    "weight-decay-minus-Infinity": Bad(
        422,
        "command.weight_decay",
        "[0, 10]",
        "finite",
        body=command('{"type": "set_hparams", "weight_decay": -Infinity}'),
    ),
    "lr-negative": Bad(
        422, "command.lr", "(0, 10]", "greater than 0", body=command({"type": "set_hparams", "lr": -0.1})
    ),
    "lr-huge": Bad(
        422, "command.lr", "(0, 10]", "less than or equal to 10", body=command({"type": "set_hparams", "lr": 1e30})
    ),
    "betas-not-below-one": Bad(
        422, "command.betas.1", "[0, 1)", body=command({"type": "set_hparams", "betas": [0.9, 1.0]})
    ),
    "betas-wrong-length": Bad(422, "command.betas", body=command({"type": "set_hparams", "betas": [0.9, 0.99, 0.999]})),
    "set-hparams-changing-nothing": Bad(422, "command", says="at least one of", body=command({"type": "set_hparams"})),
    "unknown-command-type": Bad(
        422,
        "command",
        "'set_hparams'",
        "does not match any of the expected tags",
        body=command({"type": "set_lr", "lr": 0.1}),
    ),
    "command-without-type": Bad(422, "command", says="discriminator", body=command({"lr": 0.1})),
    "extra-field-in-command": Bad(
        422, "command.force", says="Extra inputs are not permitted", body=command({"type": "pause", "force": True})
    ),
    "extra-field-in-envelope": Bad(422, "priority", says="Extra inputs are not permitted", body=envelope(priority=1)),
    "unknown-optimizer": Bad(
        422, "command.name", "one of adamw", body=command({"type": "set_optimizer", "name": "lion"})
    ),
    "cosine-schedule-without-horizon": Bad(
        422, "command", says="horizon_steps is required", body=command({"type": "set_schedule", "kind": "cosine"})
    ),
    "warmup-longer-than-horizon": Bad(
        422,
        "command",
        says="warmup_steps must be smaller",
        body=command({"type": "set_schedule", "kind": "linear", "warmup_steps": 100, "horizon_steps": 50}),
    ),
    "evaluate-zero-batches": Bad(
        422, "command.max_batches", "[1, 100000]", body=command({"type": "evaluate", "max_batches": 0})
    ),
    "step-as-a-float": Bad(422, "command.step", body=command({"type": "rollback", "step": 1.5})),
    "rollback-with-two-targets": Bad(
        422, "command", says="exactly one of", body=command({"type": "rollback", "step": 10, "checkpoint_id": "ck-1"})
    ),
    "rollback-with-no-target": Bad(422, "command", says="exactly one of", body=command({"type": "rollback"})),
    "data-mix-all-zero-weights": Bad(
        422,
        "command",
        says="must not all be zero",
        body=command({"type": "set_data_mix", "weights": {"web": 0, "code": 0}}),
    ),
    "data-mix-negative-weight": Bad(
        422, "command.weights.web", ">= 0", body=command({"type": "set_data_mix", "weights": {"web": -1}})
    ),
    "data-mix-unknown-domain": Bad(
        422,
        "command.weights.math",
        "web, code",
        "unknown data domain",
        call=lambda ctx: ctx.client.submit(ctx.run_id, SetDataMix(weights={"web": 1.0, "math": 2.0})),
    ),
    "lr-outside-policy-bounds": Bad(
        422,
        "command.lr",
        "[1e-06, 0.01] (run policy)",
        "outside the allowed range",
        call=lambda ctx: ctx.client.submit(ctx.run_id, SetHparams(lr=0.05)),
    ),
    "rate-limit-breach": Bad(
        429,
        "",
        "3 per 60 s",
        "at most 3 commands per 60 s",
        body=command({"type": "pause"}),
        prepare=use_up_rate_limit,
        retry_after=True,
    ),
    "source-without-kind": Bad(422, "source", "matching", body=envelope(source="alice")),
    "reason-too-long": Bad(422, "reason", says="at most 2000 characters", body=envelope(reason="x" * 2001)),
    "command-id-with-a-space": Bad(422, "id", "matching", body=envelope(id="my id")),
    "malformed-json": Bad(400, "", says="Invalid JSON", body=b'{"command": {"type": "pause"'),
    "empty-body": Bad(400, "", says="empty body", body=b""),
    "json-array-body": Bad(422, "", says="should be an object", body=b"[]"),
    "oversized-body": Bad(413, "", f"at most {MAX_BODY} bytes", "too large", body=envelope(reason=" " * MAX_BODY)),
    "unknown-run-id": Bad(
        404,
        "run_id",
        says="no run with run_id 'no-such-run'",
        call=lambda ctx: ctx.client.submit("no-such-run", Pause()),
    ),
    # Query parameters.
    "wait-negative": Bad(422, "wait", ">= 0", method="GET", target="/api/v1/runs/{run}/commands/known?wait=-1"),
    "wait-beyond-a-minute": Bad(422, "wait", "<= 60", method="GET", target="/api/v1/runs/{run}/commands/known?wait=61"),
    "wait-NaN": Bad(422, "wait", says="finite", method="GET", target="/api/v1/runs/{run}/commands/known?wait=nan"),
    "after-not-a-number": Bad(
        422, "after", says="valid integer", method="GET", target="/api/v1/runs/{run}/commands/next?after=abc"
    ),
    "max-points-zero": Bad(422, "max_points", ">= 1", method="GET", target="/api/v1/runs/{run}/metrics?max_points=0"),
    "unknown-query-parameter": Bad(
        422,
        "colour",
        says="Extra inputs are not permitted",
        method="GET",
        target="/api/v1/runs/{run}/commands?colour=red",
    ),
    "unknown-status-filter": Bad(
        422, "status", "'queued'", method="GET", target="/api/v1/runs/{run}/commands?status=done"
    ),
    "unknown-command-id": Bad(
        404, "command_id", says="no command 'nope'", call=lambda ctx: ctx.client.get_command(ctx.run_id, "nope")
    ),
    # Trainer results and reports.
    "result-for-unknown-command": Bad(
        404,
        "command_id",
        call=lambda ctx: ctx.client.report_result(ctx.run_id, "nope", CommandResult(status="applied")),
    ),
    "result-with-unknown-status": Bad(
        422, "status", "'applied'", target="/api/v1/runs/{run}/commands/known/result", body=b'{"status": "done"}'
    ),
    "result-with-negative-step": Bad(
        422,
        "step",
        ">= 0",
        target="/api/v1/runs/{run}/commands/known/result",
        body=b'{"status": "applied", "step": -1}',
    ),
    "report-of-unknown-type": Bad(
        422, "reports.0", "'heartbeat'", target="/api/v1/runs/{run}/events", body=b'{"reports": [{"type": "gossip"}]}'
    ),
    "metric-NaN-value": Bad(
        422,
        "samples.0.values.loss",
        says="finite",
        target="/api/v1/runs/{run}/metrics",
        body=metrics('{"step": 7, "time": 1.0, "values": {"loss": NaN}}'),
    ),
    "metric-negative-step": Bad(
        422,
        "samples.0.step",
        ">= 0",
        target="/api/v1/runs/{run}/metrics",
        body=metrics({"step": -1, "time": 1.0, "values": {"loss": 1.0}}),
    ),
    "metric-step-beyond-limit": Bad(
        422,
        "samples.1.step",
        "<= 1e+12",
        target="/api/v1/runs/{run}/metrics",
        body=metrics({"step": 8, "time": 1.0, "values": {"loss": 1.0}}, {"step": 10**13, "time": 1.0, "values": {}}),
    ),
    "metric-name-with-a-space": Bad(
        422,
        "samples.0.values.bad name.[key]",
        "matching",
        target="/api/v1/runs/{run}/metrics",
        body=metrics({"step": 9, "time": 1.0, "values": {"bad name": 1.0}}),
    ),
    "metrics-with-no-samples": Bad(
        422, "samples", says="at least 1", target="/api/v1/runs/{run}/metrics", body=b'{"samples": []}'
    ),
    # Runs and policy.
    "run-name-with-a-slash": Bad(422, "name", "matching", target="/api/v1/runs", body=b'{"name": "a/b"}'),
    "trainer-speaking-another-major-protocol": Bad(
        422,
        "protocol_version",
        "1.x",
        "incompatible",
        target="/api/v1/runs",
        body=b'{"name": "future", "protocol_version": "2.0"}',
    ),
    "approve-unknown-command": Bad(404, "command_id", call=lambda ctx: ctx.client.approve(ctx.run_id, "nope")),
    "policy-min-above-max": Bad(
        422,
        "bounds.set_hparams.lr",
        says="min must not exceed max",
        method="PUT",
        target="/api/v1/runs/{run}/policy",
        body=b'{"bounds": {"set_hparams.lr": {"min": 1.0, "max": 0.1}}}',
    ),
}


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server whose request bodies may be at most MAX_BODY bytes."""
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", max_body_bytes=MAX_BODY)).start()
    yield running
    running.stop()


def snapshot(ctx: Context) -> tuple[object, ...]:
    """Everything the API shows about the server's state."""
    client, run_id = ctx.client, ctx.run_id
    return (
        client.list_runs(),
        client.list_commands(run_id),
        client.metrics_history(run_id),
        client.list_events(run_id),
        client.list_checkpoints(run_id),
    )


def send(case: Bad, ctx: Context) -> RawAnswer:
    """Send the case's request and return the answer (the client's error, for client-sent cases)."""
    if case.call is not None:
        with pytest.raises(RunsteerError) as refused:
            case.call(ctx)
        body = refused.value.body.model_dump_json().encode() if refused.value.body else b""
        return RawAnswer(refused.value.status, {}, body)
    target = case.target.replace("{run}", ctx.run_id)
    return raw_request(ctx.url, case.method, target, case.body)


def test_the_table_is_long_enough() -> None:
    """The issue asks for at least 25 bad inputs."""
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_a_named_field_and_nothing_is_stored(small_server: ServerThread, name: str) -> None:
    """A 4xx whose ErrorBody names the field (and the allowed range); the API and the SQLite rows are unchanged."""
    case = CASES[name]
    with Client(small_server.url) as client:
        run_id = register(client, "bad-inputs", domains=["web", "code"], policy=RUN_POLICY)
        ctx = Context(client, small_server.url, run_id)
        client.submit(run_id, Pause(), command_id="known")
        client.next_commands(run_id, after_seq=0, wait_s=1)
        client.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 2.0})]))
        if case.prepare is not None:
            case.prepare(ctx)
        before, rows_before = snapshot(ctx), row_counts(small_server.config.db)

        answer = send(case, ctx)

        assert answer.status == case.status, answer.body
        error = answer.error
        assert any(detail.field == case.field for detail in error.details), error
        detail = next(detail for detail in error.details if detail.field == case.field)
        assert case.allowed in detail.allowed, error
        assert case.says in error.message or case.says in detail.message, error
        if case.retry_after:
            assert answer.headers["retry-after"].isdigit() and int(answer.headers["retry-after"]) >= 1
        assert row_counts(small_server.config.db) == rows_before
        assert snapshot(ctx) == before
