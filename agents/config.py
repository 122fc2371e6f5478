"""The agent process's one configuration: a field per `runsteer agent` flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.llm import Api
from agents.runtime import Mode


class AgentConfig(BaseModel):
    """How an agent runs; `kind` is the subcommand (`rules` or `llm`), every other field is a flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rules", "llm"]
    run: str
    """The run id to watch."""
    server: str = "http://127.0.0.1:8765"
    """Control server URL."""
    token: str | None = None
    """Bearer token; propose mode needs the admin scope unless the run's policy already holds the agent's source."""
    mode: Mode = "act"
    """act (submit), propose (submit held for approval) or dry-run (log only)."""
    rules: Path | None = None
    """Rule file (TOML): the rules of a rule agent, the triggers of an LLM agent, and the guardrails of both."""
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")] | None = None
    """Commands go out as `agent:<name>`; `rules` or `llm` by default."""
    tick_s: Annotated[float, Field(gt=0)] = 5.0
    """How often the policy is also asked when no metrics arrive (so stalls are noticed)."""
    base_url: str = ""
    """LLM API base URL, e.g. https://api.openai.com/v1, http://127.0.0.1:11434/v1 or https://api.anthropic.com."""
    model: str = ""
    """LLM model name."""
    api: Api = "openai"
    """openai (the OpenAI-compatible chat API) or anthropic (the Messages API)."""
    every: Annotated[int, Field(ge=1)] = 200
    """Ask the LLM every N steps, besides whenever a detector fires."""
    llm_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Seconds one LLM request may take."""

    @property
    def source(self) -> str:
        """The `source` of every command this agent sends."""
        return f"agent:{self.name or self.kind}"
