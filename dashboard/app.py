"""The dashboard's entry: connection and run picker in the sidebar, and the pages.

Run it with `runsteer dashboard --server URL` (or `streamlit run dashboard/app.py -- --server URL`).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.guard import connection_form, guarded
from dashboard.overview import label
from dashboard.session import client, init_state
from protocols.records import RunInfo

VIEWS = Path(__file__).resolve().parent / "views"


def pick_run(runs: list[RunInfo]) -> RunInfo | None:
    """The sidebar picker; keeps the chosen run across reruns, defaulting to the newest running run."""
    if not runs:
        return None
    by_id = {run.run_id: run for run in runs}
    chosen = st.session_state["run_id"]
    if chosen not in by_id:
        running = [run for run in runs if run.status in ("running", "paused")]
        chosen = (running or runs)[0].run_id
    st.session_state["run_id"] = chosen
    st.session_state["run_picker"] = chosen
    st.selectbox(
        "Run", list(by_id), format_func=lambda run_id: label(by_id[run_id]), key="run_picker", on_change=_picked
    )
    return by_id[chosen]


def _picked() -> None:
    st.session_state["run_id"] = st.session_state["run_picker"]


def main() -> None:
    """Render one pass of the app."""
    st.set_page_config(page_title="runsteer", page_icon=":material/explore:", layout="wide")
    init_state()
    pages = st.navigation(
        [
            st.Page(VIEWS / "health.py", title="Health", icon=":material/monitoring:", default=True),
            st.Page(VIEWS / "control.py", title="Control", icon=":material/tune:"),
            st.Page(VIEWS / "activity.py", title="Commands & agents", icon=":material/smart_toy:"),
            st.Page(VIEWS / "runs.py", title="Runs", icon=":material/list:"),
        ]
    )
    runs: list[RunInfo] = []
    with guarded():
        runs = client().list_runs()
        st.session_state["needs_token"] = False
    with st.sidebar:
        st.title(":material/explore: runsteer")
        st.session_state["run"] = pick_run(runs)
        connection_form()
    pages.run()


main()
