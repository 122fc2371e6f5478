"""Parsing requests into protocol models and turning every error into one JSON shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any, TypeVar, get_args

from aiohttp import web
from pydantic import BaseModel, JsonValue, ValidationError

from control_server.errors import ApiError
from control_server.keys import CONFIG
from protocols.base import TypedModel
from protocols.commands import CommandType
from protocols.errors import ErrorBody, ErrorDetail, allowed_range
from protocols.records import RunReport
from protocols.schema import command_schema

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COMMAND_TYPES = frozenset(CommandType.__args__)  # type: ignore[attr-defined]
REPORT_TYPES = frozenset(report.model_fields["type"].default for report in get_args(get_args(RunReport)[0]))
"""The tags of `RunReport`, which pydantic puts in an error's location after the report's index."""


MAX_REQUEST_LINE = 2**20
"""Longest request line the server reads (aiohttp's default is 8190 bytes). The longest documented query (`keys`
of MAX_KEYS_LENGTH ASCII characters, each percent-encoded) takes about 60 kB; a megabyte also leaves room for
over-long ones, which then get a JSON 422 naming the parameter instead of aiohttp's plain-text 400."""


class MissingType(ApiError):
    """A body of a `type`-tagged model without its `type` (a JSON body must carry it, as the documents say)."""

    status = 422
    code = "validation_error"


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    unique = dict(pairs)
    if len(unique) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return unique


_KEY_CHECKER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=str, parse_int=str)
"""Reads JSON only to see its keys: numbers stay text (the model's parser reads them), which halves the cost."""


def refuse_duplicate_keys(text: str | bytes) -> object:
    """Refuse JSON naming a key twice in one object: a proxy or an audit log reading the first could see another
    command than the one applied (pydantic keeps the last). Returns the value with its numbers as text; None for
    text that is not JSON, which is left to the model's parser to explain."""
    try:
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        return _KEY_CHECKER.decode(text)
    except _DuplicateKey as exc:
        raise ApiError(
            f"the key {exc.key!r} appears twice in one JSON object",
            details=[ErrorDetail(field=exc.key, message="duplicate key", allowed="each key once per object")],
        ) from None
    except (ValueError, RecursionError):
        return None


def parse_json(model: type[Model], text: str | bytes) -> Model:
    """`text` as `model`: duplicate keys are a 400 and a body missing its `type` a 422 (ApiError), anything else
    wrong a ValidationError naming fields."""
    value = refuse_duplicate_keys(text)
    if issubclass(model, TypedModel) and isinstance(value, dict) and "type" not in value:
        tag = model.model_fields["type"].default
        raise MissingType(
            f"invalid {model.__name__}: the body needs its `type`",
            details=[ErrorDetail(field="type", message="Field required", allowed=str(tag))],
        )
    return model.model_validate_json(text)


async def parse_body(request: web.Request, model: type[Model]) -> Model:
    """The request body as `model`; raises a ValidationError (→ 400/422) naming each bad field."""
    body = await request.read()
    if not body:
        raise ApiError("the request needs a JSON body", details=[ErrorDetail(field="", message="empty body")])
    return parse_json(model, body)


def parse_query(request: web.Request, model: type[Model]) -> Model:
    """The query string as `model`; unknown parameters and out-of-range values are refused."""
    return model.model_validate(dict(request.query))


def json_response(model: BaseModel, *, status: int = 200) -> web.Response:
    """Serialise a model (pydantic's JSON writer, no intermediate dict)."""
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> web.Response:
    """An error as JSON."""
    return web.Response(
        body=body.model_dump_json().encode(), status=status, content_type="application/json", headers=headers
    )


@cache
def _command_ranges() -> dict[tuple[str, str], str]:
    """The allowed range or values of every command field, read off the generated JSON Schema."""
    ranges: dict[tuple[str, str], str] = {}
    for definition in command_schema().get("$defs", {}).values():
        properties = definition.get("properties", {})
        command = properties.get("type", {}).get("const")
        if command is None:
            continue
        for field, schema in properties.items():
            described = _describe_schema(schema)
            if described:
                ranges[(command, field)] = described
    return ranges


def _describe_schema(schema: dict[str, Any]) -> str:
    options = schema.get("anyOf", [schema])
    for option in options:
        if option.get("type") in ("number", "integer"):
            return allowed_range(
                option.get("exclusiveMinimum", option.get("minimum")),
                option.get("exclusiveMaximum", option.get("maximum")),
                low_open="exclusiveMinimum" in option,
                high_open="exclusiveMaximum" in option,
            )
        if "enum" in option:
            return "one of " + ", ".join(str(value) for value in option["enum"])
        if option.get("type") == "array" and option.get("prefixItems"):
            return "a pair of numbers, each " + _describe_schema(option["prefixItems"][0])
    return ""


_BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
"""How pydantic's bound errors (e.g. a query's `wait=-1`) state the limit that was broken."""


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def validation_details(error: ValidationError) -> list[ErrorDetail]:
    """One detail per pydantic error: the dotted field, what was wrong, what is allowed."""
    details = []
    for problem in error.errors(include_url=False):
        location = [str(part) for part in problem["loc"]]
        command = next((part for part in location if part in COMMAND_TYPES), None)
        field_path = [
            part
            for index, part in enumerate(location)
            if part not in COMMAND_TYPES
            and not (index >= 2 and location[index - 2] == "reports" and part in REPORT_TYPES)
        ]
        allowed = ""
        if command is not None and field_path:
            field_name = field_path[field_path.index("command") + 1] if "command" in field_path[:-1] else field_path[-1]
            allowed = _command_ranges().get((command, field_name), "")
        context = problem.get("ctx") or {}
        if not allowed and "expected" in context:
            allowed = str(context["expected"])
        if not allowed and "expected_tags" in context:
            allowed = str(context["expected_tags"])
        if not allowed and "pattern" in context:
            allowed = f"matching {context['pattern']}"
        if not allowed:
            bounds = [f"{symbol} {_number(context[key])}" for key, symbol in _BOUND_SYMBOLS.items() if key in context]
            allowed = ", ".join(bounds)
        message = problem["msg"]
        if problem["type"] not in ("missing", "json_invalid") and "input" in problem:
            shown = json.dumps(problem["input"], default=str)
            message += f" (got {shown[:80]})"
        details.append(ErrorDetail(field=".".join(field_path), message=message, allowed=allowed))
    return details


def is_malformed(error: ValidationError) -> bool:
    """True when the input was not JSON at all (400), as opposed to JSON of the wrong shape (422)."""
    return any(problem["type"] == "json_invalid" for problem in error.errors())


def validation_error_body(error: ValidationError) -> tuple[int, ErrorBody]:
    """The status and body of an input that failed validation: 400 when it was not JSON at all, else 422."""
    malformed = is_malformed(error)
    status, code = (400, "malformed_json") if malformed else (422, "validation_error")
    summary = "the body is not valid JSON" if malformed else f"invalid {error.title}"
    return status, ErrorBody(error=code, message=summary, details=validation_details(error))


def api_error_body(error: ApiError) -> ErrorBody:
    """The body of a domain error, with its scalar extras (e.g. `retry_after_s`)."""
    extra: dict[str, JsonValue] = {
        key: value for key, value in error.extra.items() if isinstance(value, str | int | float | bool)
    }
    return ErrorBody(error=error.code, message=error.message, details=error.details, extra=extra)


def failure_response(request: web.Request, failure: Exception) -> web.Response:
    """Every failure as JSON: field path, what was sent, what is allowed. Re-raises an HTTPException below 400
    (a redirect is an answer, not a failure)."""
    if isinstance(failure, ValidationError):
        return error_response(*validation_error_body(failure))
    if isinstance(failure, ApiError):
        headers = (
            {"Retry-After": str(max(1, round(float(str(failure.extra["retry_after_s"])))))}
            if "retry_after_s" in failure.extra
            else None
        )
        return error_response(failure.status, api_error_body(failure), headers)
    if isinstance(failure, web.HTTPException):
        if failure.status < 400:
            raise failure
        message = failure.reason
        details: list[ErrorDetail] = []
        if isinstance(failure, web.HTTPRequestEntityTooLarge):
            limit = request.app[CONFIG].max_body_bytes
            message = f"request body too large: at most {limit} bytes"
            details = [ErrorDetail(field="", message="body too large", allowed=f"at most {limit} bytes")]
        headers = {key: value for key, value in failure.headers.items() if key.lower() == "allow"}
        body = ErrorBody(error=f"http_{failure.status}", message=message, details=details)
        return error_response(failure.status, body, headers)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=failure)
    return error_response(500, ErrorBody(error="internal_error", message="internal server error; see the server log"))
