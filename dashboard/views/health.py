"""Health: live charts of the run's metrics, every branch overlaid, with a banner when something is wrong."""

from __future__ import annotations

import streamlit as st

from dashboard.charts import draw_charts, health_banner, intervention_rows
from dashboard.guard import guarded
from dashboard.overview import run_header
from dashboard.series import CHARTS
from dashboard.session import alert_book, client, command_book, run_series

REFRESH_S = 2.0


@st.fragment(run_every=REFRESH_S)
def live_charts(run_id: str) -> None:
    """Fetch only the steps after each branch's cursor (and the commands that may have changed), then redraw."""
    with guarded(recover=False):
        api = client()
        run = api.get_run(run_id)
        series = run_series(run_id)
        series.refresh(api, run_id, run.branches)
        alerts = alert_book(run_id)
        alerts.refresh(api, run_id)
        book = command_book(run_id)
        book.refresh(api, run_id)
        health_banner(series, run.branch, alerts)
        draw_charts(series, CHARTS, intervention_rows(book.records.values()))


def health_page() -> None:
    """The health page of the chosen run."""
    run = st.session_state["run"]
    if run is None:
        st.info("Pick a run in the sidebar.")
        return
    run_header(run.run_id)
    live_charts(run.run_id)


health_page()
