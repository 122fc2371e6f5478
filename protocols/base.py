"""The one base every wire model derives from, and the constrained types they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""No slash and no leading dot: a `Name` can never leave the directory it is joined to."""

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""An identifier safe in a URL and a file name: run ids, branches, tags, checkpoint ids, domains."""

MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")]
"""A metric key such as `loss`, `grad_norm/block.0` or `eval_loss/prose`."""

SOURCE_KINDS = ("user", "agent", "script", "system")
"""Who may send commands: a person, an agent, a script, or the server itself."""

PRINCIPAL_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
"""A token's name, which is also the name part of the source it acts as."""

Source = Annotated[str, StringConstraints(pattern=r"^(user|agent|script|system):[A-Za-z0-9_.@-]{1,64}$")]
"""Who sent a command: `user:alice`, `agent:rules`, `script:nightly`, `system:server`."""

Text = Annotated[str, StringConstraints(max_length=2000)]
"""Free text for people (reasons, messages), bounded so that no record grows without limit."""


def _whole_number(value: object) -> object:
    """JSON has one number type and JSON Schema counts `1.0` as the integer 1, so the server does too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = BeforeValidator(_whole_number)
"""Accept `1.0` where an integer is due (`1.5` is still refused): the OpenAPI document and the server agree."""

MAX_WIRE_INT = 2**53 - 1
"""The largest integer every JSON reader holds exactly (a JavaScript number), well inside SQLite's 64 bits:
every integer on the wire has a range, so a huge one is a 422 naming the field, never an overflow."""

Count = Annotated[int, Field(ge=0, le=MAX_WIRE_INT), WholeNumber]
"""A count, an id or a cursor: 0 up to MAX_WIRE_INT."""

MAX_STEP = 10**12
"""The largest step the protocol takes."""
Step = Annotated[int, Field(ge=0, le=MAX_STEP), WholeNumber]
UnixTime = Annotated[float, Field(ge=0.0, le=1e11)]


class WireJsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema with map keys described as the models check them.

    pydantic writes a `dict[Name, X]` as `patternProperties`, which lets any other key validate; the server
    refuses those keys, so the document says `propertyNames` (with the pattern) and `additionalProperties`.
    """

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        """A map: its keys' pattern as `propertyNames`, its values as `additionalProperties`."""
        result = super().dict_schema(schema)
        patterns: dict[str, Any] | None = result.pop("patternProperties", None)
        if patterns:
            ((pattern, values),) = patterns.items()
            result["propertyNames"] = {"type": "string", "pattern": pattern}
            result["additionalProperties"] = values
        return result


def tag_required(tag: str) -> Callable[[dict[str, Any]], None]:
    """A `json_schema_extra` marking a union's tag field required: the server cannot tell the variant without it."""

    def mark(schema: dict[str, Any]) -> None:
        schema["required"] = [tag, *(name for name in schema.get("required", []) if name != tag)]

    return mark


class WireModel(BaseModel):
    """Strict, immutable, finite: unknown fields, NaN/inf and type coercion are all refused."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        frozen=True,
        use_attribute_docstrings=True,
    )


class TypedModel(WireModel):
    """A variant of a union told apart by `type` (commands, trainer reports): JSON must carry `type`, as the
    documents say, even where the model stands alone (an alert: the server's parser checks that); Python code may
    leave it to its default."""

    model_config = ConfigDict(json_schema_extra=tag_required("type"))
