"""Sending commands from the dashboard and following each one to applied or rejected."""

from __future__ import annotations

from typing import Any, TypeVar

import streamlit as st
from pydantic import BaseModel, ValidationError

from dashboard.books import STATUS_ICONS, describe_command, lifecycle
from dashboard.guard import guarded
from dashboard.session import client, source
from protocols.commands import Command, CommandEnvelope, CommandRecord
from protocols.constants import FINAL_COMMAND_STATUSES

C = TypeVar("C", bound=BaseModel)

TRACK_EVERY_S = 1.0
"""How often the panel of this session's commands refreshes the ones still in flight."""


def _refused(error: ValidationError) -> None:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'command'}: {problem['msg']}" for problem in error.errors()
    )
    st.error(f"Not sent: {problems}", icon=":material/block:")


def build(model: type[C], **fields: Any) -> C | None:
    """The command a form describes (blank fields left out, so they keep their value); a refusal is shown naming
    the field, and nothing is built."""
    try:
        return model(**{name: value for name, value in fields.items() if value is not None})
    except ValidationError as exc:
        _refused(exc)
        return None


def send(run_id: str, command: Command | None) -> CommandRecord | None:
    """Submit a command with this person's source and reason; a refusal is shown, not raised."""
    if command is None:
        return None
    reason = st.session_state.get("reason", "")
    try:
        envelope = CommandEnvelope(command=command, source=source(), reason=reason or "from the dashboard")
    except ValidationError as exc:
        _refused(exc)
        return None
    with guarded(recover=False):
        record = client().submit(run_id, envelope)
        st.session_state["tracked"].append((run_id, record.id))
        return record
    return None


@st.fragment(run_every=TRACK_EVERY_S)
def tracked_commands(run_id: str) -> None:
    """This session's recent commands on the run, each moving through its lifecycle as the trainer answers."""
    tracked: list[tuple[str, str]] = st.session_state["tracked"]
    mine = [command_id for tracked_run, command_id in tracked if tracked_run == run_id][-8:]
    if not mine:
        return
    records: dict[str, CommandRecord] = st.session_state.setdefault("tracked_records", {})
    st.markdown("**Your commands**")
    with guarded(recover=False):
        for command_id in reversed(mine):
            record = records.get(command_id)
            if record is None or record.status not in FINAL_COMMAND_STATUSES:
                record = records[command_id] = client().get_command(run_id, command_id)
            st.markdown(
                f"{STATUS_ICONS[record.status]} `#{record.seq}` {describe_command(record.command)} — "
                f"**{lifecycle(record)}**"
            )
