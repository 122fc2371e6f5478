"""`runsteer agent rules|llm`: run a rule or LLM agent on one run until the run ends or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
from pydantic import ValidationError

from agents.config import AgentConfig
from agents.decision import AsyncPolicy, Policy
from agents.guardrails import Guardrails
from agents.llm import KEY_ENV, LLMPolicy, make_backend
from agents.rules import RulePolicy, load_rules
from agents.runtime import MODES, AgentRuntime
from protocols.client import AsyncClient
from protocols.errors import RunsteerError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runsteer agent", description="Watch a run and step in when it goes wrong.")
    kinds = parser.add_subparsers(dest="kind", required=True)
    rules = kinds.add_parser("rules", help="the rule agent (detectors and actions from a TOML file)")
    llm = kinds.add_parser("llm", help="an LLM agent (OpenAI-compatible chat API or Anthropic Messages API)")
    for sub in (rules, llm):
        sub.add_argument("--run", required=True, help="run id to watch")
        sub.add_argument("--server", default=os.environ.get("RUNSTEER_SERVER", "http://127.0.0.1:8765"),
                         help="server URL (default %(default)s, or RUNSTEER_SERVER)")
        sub.add_argument("--token", default=os.environ.get("RUNSTEER_TOKEN"), help="bearer token (or RUNSTEER_TOKEN)")
        sub.add_argument("--mode", choices=MODES, default="act",
                         help="act: submit; propose: submit held for approval; dry-run: log only (default %(default)s)")
        sub.add_argument("--rules", type=Path, default=None,
                         help="rule file (TOML); the shipped default set when left out")
        sub.add_argument("--name", default=None, help="agent name: commands go out as agent:<name>")
        sub.add_argument("--tick", dest="tick_s", type=float, default=5.0,
                         help="seconds between checks when no metrics arrive (default %(default)s)")
    llm.add_argument("--base-url", required=True, help="API base URL, e.g. https://api.openai.com/v1")
    llm.add_argument("--model", required=True, help="model name")
    llm.add_argument("--api", choices=tuple(KEY_ENV), default="openai",
                     help=f"API dialect (default %(default)s); keys from {' or '.join(KEY_ENV.values())}")
    llm.add_argument("--every", type=int, default=200, help="ask every N steps, and when a detector fires")
    llm.add_argument("--llm-timeout", dest="llm_timeout_s", type=float, default=60.0,
                     help="seconds one LLM request may take (default %(default)s)")
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
            backend = make_backend(config.api, config.base_url, config.model, timeout_s=config.llm_timeout_s,
                                   session=session)
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
        config = AgentConfig.model_validate(vars(args))
        asyncio.run(run_agent(config))
    except (ValidationError, ValueError, OSError) as exc:
        print(f"runsteer agent: {exc}", file=sys.stderr)
        return 2
    except RunsteerError as exc:
        print(f"runsteer agent: {exc}", file=sys.stderr)
        return 1
    return 0
