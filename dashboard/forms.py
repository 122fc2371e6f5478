"""Form inputs read off the command models: each field's bounds, default and help text come from `protocols`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel

from protocols.errors import allowed_range


@dataclass(frozen=True)
class FieldSpec:
    """What a form input needs to know about one numeric command field (or one element of a pair)."""

    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    default: Any
    help: str

    @property
    def allowed(self) -> str:
        """The range as every refusal states it."""
        return allowed_range(self.low, self.high, low_open=self.low_open, high_open=self.high_open)


def _numeric(schema: dict[str, Any]) -> dict[str, Any]:
    """The number (or integer) branch of a field's schema, through `anyOf` (optional fields) and pairs."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") in ("number", "integer"):
            return dict(option)
        if option.get("type") == "array" and option.get("prefixItems"):
            return _numeric(option["prefixItems"][0])
    return {}


@cache
def field_spec(model: type[BaseModel], name: str) -> FieldSpec:
    """Bounds, default and help text of `model.name`, as the protocol states them."""
    properties = model.model_json_schema()["properties"]
    numeric = _numeric(properties[name])
    info = model.model_fields[name]
    return FieldSpec(
        low=numeric.get("exclusiveMinimum", numeric.get("minimum")),
        high=numeric.get("exclusiveMaximum", numeric.get("maximum")),
        low_open="exclusiveMinimum" in numeric,
        high_open="exclusiveMaximum" in numeric,
        default=None if info.is_required() else info.get_default(call_default_factory=True),
        help=info.description or "",
    )


def number_field(
    container: Any,
    model: type[BaseModel],
    name: str,
    label: str,
    *,
    key: str,
    step: float,
    placeholder: str | None = None,
    blank: bool = False,
) -> Any:
    """A number input for `model.name`: the model's bounds (an open end is refused when sent, naming the field),
    its default unless `blank`, and its docstring with the allowed range as help."""
    spec = field_spec(model, name)
    integer = isinstance(step, int)
    kind = int if integer else float
    value = None if blank or spec.default is None else kind(spec.default)
    return container.number_input(
        label,
        min_value=None if spec.low is None else kind(spec.low),
        max_value=None if spec.high is None else kind(spec.high),
        value=value,
        step=step,
        format="%d" if integer else "%g",
        placeholder=placeholder,
        help=f"{spec.help} Allowed: {spec.allowed}.".strip(),
        key=key,
    )


def checkbox_field(container: Any, model: type[BaseModel], name: str, label: str, *, key: str) -> bool:
    """A checkbox for a boolean field, with the model's default and help text."""
    spec = field_spec(model, name)
    return bool(container.checkbox(label, value=bool(spec.default), help=spec.help or None, key=key))


def choice_field(container: Any, model: type[BaseModel], name: str, label: str, *, key: str) -> Any:
    """A select box over a `Literal` field's values, with its help text."""
    options = model.model_json_schema()["properties"][name]["enum"]
    return container.selectbox(label, options, help=field_spec(model, name).help or None, key=key)
