"""`runsteer agent rules|llm`: run a rule or LLM agent on one run until the run ends or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import aiohttp
from pydantic import ValidationError

from agents.config import AgentConfig
from agents.decision import AsyncPolicy, Policy
from agents.guardrails import Guardrails
from agents.llm import LLMPolicy, make_backend
from agents.rules import RulePolicy, load_rules
from agents.runtime import AgentRuntime
from protocols.client import AsyncClient
from protocols.errors import RunsteerError
from protocols.flags import add_config_flags, config_values

LLM_FIELDS = frozenset({"base_url", "model", "api", "every", "llm_timeout_s"})
"""The `AgentConfig` fields only the LLM agent takes."""

ENVIRONMENT = {"server": "RUNSTEER_SERVER", "token": "RUNSTEER_TOKEN"}
"""Fields that fall back to an environment variable when their flag is left out."""


def _parser() -> argparse.ArgumentParser:
    """`rules` and `llm` subcommands whose flags are generated from `AgentConfig` (its `kind` is the subcommand)."""
    parser = argparse.ArgumentParser(prog="runsteer agent", description="Watch a run and step in when it goes wrong.")
    kinds = parser.add_subparsers(dest="kind", required=True)
    rules = kinds.add_parser("rules", help="the rule agent (detectors and actions from a TOML file)")
    llm = kinds.add_parser("llm", help="an LLM agent (OpenAI-compatible chat API or Anthropic Messages API)")
    for sub in (rules, llm):
        add_config_flags(sub, AgentConfig, skip=LLM_FIELDS | {"kind"}, env=ENVIRONMENT)
    add_config_flags(llm, AgentConfig, only=LLM_FIELDS, required={"base_url", "model"})
    return parser


async def run_agent(config: AgentConfig) -> None:
    """Build the policy and guardrails from `config` and run the agent until the run ends or a signal."""
    rules = load_rules(config.rules)
    guardrails = Guardrails(rules.guardrails, config.source)
    async with AsyncClient(config.server, token=config.token) as client, aiohttp.ClientSession() as session:
        policy: Policy | AsyncPolicy
        if config.kind == "rules":
            policy = RulePolicy(rules, name=config.source)
        else:
            backend = make_backend(
                config.api, config.base_url, config.model, timeout_s=config.llm_timeout_s, session=session
            )
            policy = LLMPolicy(backend, every_steps=config.every, triggers=RulePolicy(rules), name="llm")
        runtime = AgentRuntime(client, config.run, policy, guardrails, mode=config.mode, tick_s=config.tick_s)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, runtime.stop)
        try:
            await runtime.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runsteer agent`."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = AgentConfig.model_validate({"kind": args.kind, **config_values(args, AgentConfig)})
        asyncio.run(run_agent(config))
    except (ValidationError, ValueError, OSError) as exc:
        print(f"runsteer agent: {exc}", file=sys.stderr)
        return 2
    except RunsteerError as exc:
        print(f"runsteer agent: {exc}", file=sys.stderr)
        return 1
    return 0
