"""Command-line flags generated from a process's config (a pydantic model or a dataclass), one way for every process.

Each field becomes `--field-name` with the field's docstring as its help, its default, its type and, for a
`Literal`, its choices. Two spellings follow from the field alone: a unit suffix `_s` is left out of the flag
(`heartbeat_timeout_s` is `--heartbeat-timeout`, in seconds), and a list or tuple field takes a repeatable flag
in the singular (`cors_origins` is `--cors-origin`). Flags a user leaves out are absent from the parsed values,
so the config's own default applies.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import textwrap
import types
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """What a flag needs to know about one config field."""

    name: str
    annotation: Any
    default: Any
    required: bool
    doc: str


@cache
def _docstrings(config: type) -> dict[str, str]:
    """The attribute docstrings of `config` and its bases (the string right under each field)."""
    found: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if klass is object or klass.__module__ in ("pydantic.main", "builtins"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for statement, following in itertools.pairwise(body):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[statement.target.id] = " ".join(following.value.value.split())
    return found


def config_fields(config: type) -> dict[str, ConfigField]:
    """Every field of a pydantic model or a dataclass, in declaration order."""
    docs = _docstrings(config)
    if issubclass(config, BaseModel):
        return {
            name: ConfigField(
                name,
                info.rebuild_annotation(),
                None if info.is_required() else info.get_default(call_default_factory=True),
                info.is_required(),
                info.description or docs.get(name, ""),
            )
            for name, info in config.model_fields.items()
        }
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{config.__name__} is neither a pydantic model nor a dataclass")
    hints = inspect.get_annotations(config, eval_str=True)
    fields: dict[str, ConfigField] = {}
    for item in dataclasses.fields(config):
        missing = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        fields[item.name] = ConfigField(
            item.name, hints[item.name], None if missing else default, missing, docs.get(item.name, "")
        )
    return fields


def flag_name(field: str, annotation: Any) -> str:
    """`--field-name`, without a unit suffix `_s`, and in the singular for a repeatable (list) field."""
    name = field.removesuffix("_s")
    if _item_type(annotation) is not None and name.endswith("s"):
        name = name[:-1]
    return "--" + name.replace("_", "-")


def _strip(annotation: Any) -> Any:
    """The annotation without `Annotated` metadata and without `| None`."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        options = [option for option in get_args(annotation) if option is not type(None)]
        if len(options) == 1:
            return _strip(options[0])
    return annotation


def _item_type(annotation: Any) -> Any:
    """The element type of a list or tuple field, or None for any other field."""
    stripped = _strip(annotation)
    if get_origin(stripped) in (list, tuple):
        return _strip(get_args(stripped)[0])
    return None


def _converter(annotation: Any) -> tuple[Any, list[Any] | None]:
    """(argparse `type`, choices) of a scalar annotation."""
    if get_origin(annotation) is Literal:
        values = list(get_args(annotation))
        return type(values[0]), values
    if annotation in (int, float, Path):
        return annotation, None
    return str, None


def add_config_flags(
    parser: argparse.ArgumentParser,
    config: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    required: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Add a flag per field of `config` (those in `only`, less `skip`); returns the fields given flags.

    `required` makes a field's flag mandatory here although it has a default; `env` names the environment
    variable a field falls back to (a token, a server URL) when its flag is left out.
    """
    env = env or {}
    chosen, skipped, needed = (set(only) if only is not None else None), set(skip), set(required)
    added: list[str] = []
    for field in config_fields(config).values():
        if field.name in skipped or (chosen is not None and field.name not in chosen):
            continue
        flag = flag_name(field.name, field.annotation)
        help_text = field.doc.replace("%", "%%") + (
            " In seconds." if field.name.endswith("_s") and "second" not in field.doc.lower() else ""
        )
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        item = _item_type(field.annotation)
        scalar = _strip(field.annotation)
        if item is not None:
            kwargs["action"] = "append"
            kwargs["type"], kwargs["choices"] = _converter(item)
            help_text += " (repeatable)"
        elif scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"], kwargs["choices"] = _converter(scalar)
            if field.default not in (None, ""):
                help_text += f" (default {field.default})"
        if field.name in env:
            help_text += f" (or {env[field.name]})"
            if os.environ.get(env[field.name]):
                kwargs["default"] = os.environ[env[field.name]]
        kwargs["required"] = (field.required or field.name in needed) and kwargs["default"] is argparse.SUPPRESS
        if scalar is not bool:
            kwargs["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, help=help_text.strip(), **kwargs)
        added.append(field.name)
    return added


def flagged_fields(parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of a parser's flags (leaving out help), to check them against a config's fields."""
    return {action.dest for action in parser._actions if action.option_strings and action.dest != "help"}


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of `config` that the parsed flags set (left-out flags are absent, so defaults apply)."""
    fields = config_fields(config)
    return {name: value for name, value in vars(args).items() if name in fields}
