"""The one base every wire model derives from, and the constrained types they share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""No slash and no leading dot: a `Name` can never leave the directory it is joined to."""

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""An identifier safe in a URL and a file name: run ids, branches, tags, checkpoint ids, domains."""

MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")]
"""A metric key such as `loss`, `grad_norm/block.0` or `eval_loss/prose`."""

Source = Annotated[str, StringConstraints(pattern=r"^(user|agent|script|system):[A-Za-z0-9_.@-]{1,64}$")]
"""Who sent a command: `user:alice`, `agent:rules`, `script:nightly`, `system:server`."""

Text = Annotated[str, StringConstraints(max_length=2000)]
"""Free text for people (reasons, messages), bounded so that no record grows without limit."""

Step = Annotated[int, Field(ge=0, le=10**12)]
UnixTime = Annotated[float, Field(ge=0.0, le=1e11)]


class WireModel(BaseModel):
    """Strict, immutable, finite: unknown fields, NaN/inf and type coercion are all refused."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        frozen=True,
        use_attribute_docstrings=True,
    )
