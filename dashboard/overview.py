"""What the dashboard says about a run as a whole: its row in the picker, and the strip atop each run page."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import streamlit as st

from dashboard.guard import guarded
from dashboard.session import client, command_book
from protocols.client import Client
from protocols.records import RunInfo

STATUS_BADGES = {
    "running": ":green-badge[:material/play_arrow: running]",
    "paused": ":blue-badge[:material/pause: paused]",
    "lost": ":orange-badge[:material/link_off: lost]",
    "finished": ":gray-badge[:material/flag: finished]",
    "failed": ":red-badge[:material/error: failed]",
}
"""A Markdown badge per run status."""
HEADER_EVERY_S = 2.0


def elapsed(run: RunInfo, now: float | None = None) -> str:
    """Wall time since the run was registered (until its last update once it ended), as `1h 02m 03s`."""
    end = run.updated_at if run.status in ("finished", "failed") else (now or time.time())
    seconds = max(0, int(end - run.created_at))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def tokens_per_s(api: Client, run: RunInfo) -> float | None:
    """The run's latest throughput on its current branch."""
    history = api.metrics_history(
        run.run_id, keys=["tokens_per_s"], branch=run.branch, since_step=max(0, run.step - 100)
    )
    series = history.series.get("tokens_per_s")
    return series.values[-1] if series and series.values else None


def run_row(api: Client, run: RunInfo) -> dict[str, Any]:
    """One run as a row of the picker table."""
    throughput = tokens_per_s(api, run)
    return {
        "run": run.name,
        "status": run.status,
        "step": run.step,
        "tokens/s": round(throughput) if throughput is not None else None,
        "branch": run.branch,
        "elapsed": elapsed(run),
        "run id": run.run_id,
    }


def label(run: RunInfo) -> str:
    """A run in the sidebar picker (its live status and step are atop each page)."""
    return run.run_id if run.run_id.startswith(run.name) else f"{run.name} ({run.run_id})"


def status_notice(run: RunInfo) -> None:
    """A line saying what is wrong with the run, when something is."""
    if run.status == "lost":
        seen = datetime.fromtimestamp(run.last_heartbeat).strftime("%H:%M:%S") if run.last_heartbeat else "never"
        st.warning(
            f"Run {run.name} is lost: its trainer has not heartbeated since {seen}. Commands wait in the "
            "queue and the run becomes running again when the trainer is back.",
            icon=":material/link_off:",
        )
    elif run.status == "failed":
        st.error(f"Run {run.name} failed; see its alerts and logs.", icon=":material/error:")
    elif run.status == "finished":
        st.info(f"Run {run.name} finished at step {run.step}.", icon=":material/flag:")
    elif run.status == "paused":
        st.info(f"Run {run.name} is paused at step {run.step}; resume it from Control.", icon=":material/pause:")


@st.fragment(run_every=HEADER_EVERY_S)
def run_header(run_id: str) -> None:
    """The run's live status, step, branch and settings, its problems, and proposals awaiting approval."""
    with guarded(recover=False):
        api = client()
        run = api.get_run(run_id)
        state = run.state
        cells = [
            STATUS_BADGES[run.status],
            f"step **{run.step}**",
            f"branch **{run.branch}**",
            f"elapsed **{elapsed(run)}**",
        ]
        if state is not None:
            cells += [f"{state.optimizer or 'optimizer ?'}", f"lr **{state.lr:.4g}**" if state.lr is not None else ""]
        st.markdown(f"### {run.name} \n" + " · ".join(cell for cell in cells if cell))
        status_notice(run)
        book = command_book(run_id)
        book.refresh(api, run_id)
        waiting = len(book.pending())
        if waiting:
            st.warning(f"{waiting} command(s) from agents await your approval.", icon=":material/front_hand:")
            st.page_link("views/activity.py", label="Review proposals", icon=":material/front_hand:")
