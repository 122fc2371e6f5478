"""Agents that watch a run's live stream and step in through the public client: rule and LLM policies, guardrails."""

from agents.decision import Change, Decision, Intervention
from agents.guardrails import GuardrailConfig, Guardrails, Review
from agents.rules import RulePolicy, RuleSet, load_rules
from agents.runtime import AgentRuntime
from agents.window import RunWindow, Series, WindowTracker

__all__ = [
    "AgentRuntime",
    "Change",
    "Decision",
    "GuardrailConfig",
    "Guardrails",
    "Intervention",
    "Review",
    "RulePolicy",
    "RuleSet",
    "RunWindow",
    "Series",
    "WindowTracker",
    "load_rules",
]
