"""Commands and agents: proposals awaiting approval, the command history, and the alert feed."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from dashboard.books import describe_command, lifecycle
from dashboard.commands import tracked_commands
from dashboard.guard import guarded
from dashboard.overview import run_header
from dashboard.session import alert_book, client, command_book, source
from protocols.records import RunInfo

REFRESH_S = 2.0
HISTORY_ROWS = 200


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


@st.fragment(run_every=REFRESH_S)
def proposals(run_id: str) -> None:
    """Commands held for approval, each with approve and reject buttons."""
    st.subheader("Awaiting approval")
    with guarded(recover=False):
        api = client()
        book = command_book(run_id)
        book.refresh(api, run_id)
        pending = book.pending()
        if not pending:
            st.caption("Nothing awaits approval.")
            return
        for record in pending:
            with st.container(border=True):
                st.markdown(
                    f"`#{record.seq}` **{describe_command(record.command)}** from `{record.source}` "
                    f"at {_when(record.created_at)}"
                )
                st.markdown(f"> {record.reason or '(no reason given)'}")
                approve, reject, _ = st.columns([1, 1, 4])
                if approve.button("Approve", key=f"approve_{record.id}", type="primary"):
                    _decide(run_id, record.id, approve=True)
                if reject.button("Reject", key=f"reject_{record.id}"):
                    _decide(run_id, record.id, approve=False)


def _decide(run_id: str, command_id: str, *, approve: bool) -> None:
    """Approve or reject a held command, then follow it under Your commands."""
    api = client()
    if approve:
        record = api.approve(run_id, command_id, source=source(), reason="approved in the dashboard")
    else:
        record = api.reject(run_id, command_id, source=source(), reason="rejected in the dashboard")
    command_book(run_id).records[record.id] = record
    st.session_state["tracked"].append((run_id, record.id))
    st.rerun()


@st.fragment(run_every=REFRESH_S)
def history(run_id: str) -> None:
    """Every command with its source, reason, status and applied step, newest first."""
    st.subheader("Command history")
    with guarded(recover=False):
        book = command_book(run_id)
        book.refresh(client(), run_id)
        records = book.newest_first()[:HISTORY_ROWS]
        if not records:
            st.caption("No commands yet.")
            return
        st.dataframe(
            [
                {
                    "seq": record.seq,
                    "command": describe_command(record.command),
                    "source": record.source,
                    "reason": record.reason,
                    "status": record.status,
                    "applied step": record.applied_step,
                    "result": lifecycle(record),
                    "sent": _when(record.created_at),
                }
                for record in records
            ],
            hide_index=True,
        )


@st.fragment(run_every=REFRESH_S)
def alert_feed(run_id: str) -> None:
    """Alerts raised by the trainer and agents, newest first."""
    st.subheader("Alerts")
    with guarded(recover=False):
        book = alert_book(run_id)
        book.refresh(client(), run_id)
        alerts = book.newest_first()
        if not alerts:
            st.caption("No alerts.")
            return
        st.dataframe(
            [
                {
                    "time": _when(alert.time),
                    "severity": alert.severity,
                    "source": alert.source,
                    "step": alert.step,
                    "message": alert.message,
                }
                for alert in alerts[:HISTORY_ROWS]
            ],
            hide_index=True,
        )


def activity_page() -> None:
    """The commands-and-agents page of the chosen run."""
    run: RunInfo | None = st.session_state["run"]
    if run is None:
        st.info("Pick a run in the sidebar.")
        return
    run_header(run.run_id)
    tracked_commands(run.run_id)
    proposals(run.run_id)
    history(run.run_id)
    alert_feed(run.run_id)


activity_page()
