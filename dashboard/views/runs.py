"""Runs: every run on the server with its status, step, throughput, branch and age; pick one to watch."""

from __future__ import annotations

import streamlit as st

from dashboard.guard import guarded
from dashboard.overview import run_row
from dashboard.session import client

REFRESH_S = 3.0


def choose_row() -> None:
    """Make the run of the selected table row the current run."""
    rows = st.session_state["runs_table"].selection.rows
    if rows:
        run_id = st.session_state["runs_table_ids"][rows[0]]
        st.session_state["run_id"] = run_id
        st.session_state["run_picker"] = run_id
        st.session_state["picked"] = True


@st.fragment(run_every=REFRESH_S)
def runs_table() -> None:
    """The live table of runs; selecting a row picks that run."""
    if st.session_state.pop("picked", False):
        st.rerun()
    with guarded(recover=False):
        api = client()
        runs = api.list_runs()
        if not runs:
            st.info("No runs yet. Start one with `runsteer train --server URL` or `runsteer demo`.")
            return
        st.session_state["runs_table_ids"] = [run.run_id for run in runs]
        st.dataframe(
            [run_row(api, run) for run in runs],
            key="runs_table",
            on_select=choose_row,
            selection_mode="single-row",
            hide_index=True,
        )


def runs_page() -> None:
    """The runs picker page."""
    st.header("Runs")
    st.caption("Select a row (or use the sidebar) to watch and steer that run on the other pages.")
    runs_table()


runs_page()
