"""Each process's command line is generated from its config model: every field has a flag and every flag a field."""

from __future__ import annotations

import argparse

import pytest

from agents.cli import LLM_FIELDS, _parser
from agents.config import AgentConfig
from control_server.cli import build_parser as server_parser
from control_server.cli import config_from_args
from control_server.config import ServerConfig
from protocols.flags import config_fields, flag_name, flagged_fields
from trainer.cli import CONSOLE_FLAGS, NOT_FLAGS
from trainer.cli import build_parser as train_parser
from trainer.run import RunConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_the_server_has_a_flag_for_every_config_field_and_no_other() -> None:
    """`runsteer server` flags are exactly `ServerConfig`'s fields."""
    assert flagged_fields(server_parser()) == set(config_fields(ServerConfig))


def test_the_trainer_has_a_flag_for_every_run_config_field_and_only_its_console_flag_besides() -> None:
    """`runsteer train` flags are `RunConfig`'s fields (less the I/O tuning set in code) and `--quiet`."""
    assert flagged_fields(train_parser()) == (set(config_fields(RunConfig)) - NOT_FLAGS) | CONSOLE_FLAGS


def test_each_agent_kind_has_a_flag_for_every_config_field_it_takes() -> None:
    """`runsteer agent rules|llm`: the LLM agent takes every `AgentConfig` field, the rule agent all but the LLM's;
    `kind` is the subcommand."""
    kinds = _subparsers(_parser())
    fields = set(config_fields(AgentConfig)) - {"kind"}
    assert set(kinds) == {"rules", "llm"}
    assert flagged_fields(kinds["llm"]) == fields
    assert flagged_fields(kinds["rules"]) == fields - LLM_FIELDS


def test_every_flag_has_help_from_its_field() -> None:
    """No flag is left without help text: each comes from its field's docstring."""
    parsers = [server_parser(), train_parser(), *_subparsers(_parser()).values()]
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help[0].isalpha(), (parser.prog, action.dest, action.help)


@pytest.mark.parametrize(
    ("field", "annotation", "flag"),
    [
        ("heartbeat_timeout_s", float, "--heartbeat-timeout"),
        ("cors_origins", tuple[str, ...], "--cors-origin"),
        ("run_id", str | None, "--run-id"),
    ],
)
def test_flag_names_follow_from_the_field(field: str, annotation: object, flag: str) -> None:
    """A unit suffix `_s` is left out and a list field's repeatable flag is singular."""
    assert flag_name(field, annotation) == flag


def test_parsed_server_flags_build_the_config_and_left_out_ones_keep_its_defaults() -> None:
    """Flags given reach the config by their field; flags left out leave the config's defaults."""
    args = server_parser().parse_args(["--port", "0", "--heartbeat-timeout", "60", "--cors-origin", "http://a"])
    config = config_from_args(args)
    assert (config.port, config.heartbeat_timeout_s, config.cors_origins) == (0, 60.0, ("http://a",))
    assert config.db == ServerConfig().db and config.long_poll_max_s == ServerConfig().long_poll_max_s


def test_a_bad_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """A value of the wrong type is refused by the parser naming the flag."""
    with pytest.raises(SystemExit) as refused:
        server_parser().parse_args(["--port", "eighty"])
    assert refused.value.code == 2 and "--port" in capsys.readouterr().err
