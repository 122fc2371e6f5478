"""The reference client builds every REST call from the protocol's route table, so a call cannot drift from it."""

from __future__ import annotations

import inspect
import re

import pytest

from protocols import (
    CommandDecision,
    CommandEnvelope,
    CommandResult,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RunState,
)
from protocols.client.core import Requests, build
from protocols.openapi import ROUTES
from protocols.records import AlertReport, RunRegistration

ARGUMENTS = {
    "registration": RunRegistration(name="r"),
    "run_id": "run 1/x",
    "command_id": "c1",
    "policy": Policy(),
    "envelope": CommandEnvelope(command=Pause()),
    "decision": CommandDecision(),
    "result": CommandResult(status="applied", step=1),
    "batch": MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 1.0})]),
    "reports": [Heartbeat(state=RunState(step=1))],
    "alert": AlertReport(message="look"),
    "after_seq": 0,
    "wait_s": 1.0,
    "approve": True,
    "deadline": 0.0,
}
"""A value for every parameter name of the `Requests` builders."""


def _requests() -> list:
    built = []
    for name, function in inspect.getmembers(Requests, inspect.isfunction):
        parameters = inspect.signature(function).parameters
        args = {p: ARGUMENTS[p] for p, spec in parameters.items() if spec.default is inspect.Parameter.empty}
        request = function(**args)
        built.append((name, request[0] if isinstance(request, tuple) else request))
    built.append(("decide", Requests.decide("run 1/x", "c1", CommandDecision(), approve=False)))
    return built


def _template(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "[^/]+", path)


def test_every_rest_route_a_client_calls_is_built_from_its_row_and_percent_quoted() -> None:
    """Each request's method, path and answer model match the row of `ROUTES` that serves it; every run and command
    route of the table is reachable from the client; path segments are quoted (`run 1/x` stays one segment)."""
    matched = set()
    for name, request in _requests():
        rows = [r for r in ROUTES if r.method == request.method and re.fullmatch(_template(r.path), request.path)]
        assert rows, (name, request.method, request.path)  # the first match serves it, as in the server's router
        assert rows[0].response is request.response, name
        assert "run%201%2Fx" in request.path or "run_id" not in rows[0].path_parameters, request.path
        matched.add(rows[0].name)
    documents = {"healthz", "prometheus_metrics", "schema", "openapi", "run_stream", "all_stream"}
    assert matched == {route.name for route in ROUTES} - documents


def test_a_call_that_disagrees_with_its_row_is_refused_when_it_is_built() -> None:
    """The wrong answer model, a missing body, an unknown query parameter or path parameter: each a TypeError."""
    from protocols.records import RunInfo, RunList

    with pytest.raises(TypeError, match="answers"):
        build("list_runs", RunInfo)
    with pytest.raises(TypeError, match="body"):
        build("register_run", RunInfo)
    with pytest.raises(TypeError, match="query"):
        build("list_runs", RunList, params={"limit": "3"})
    with pytest.raises(TypeError, match="path parameters"):
        build("get_run", RunInfo, command_id="x")
