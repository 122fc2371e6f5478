"""Drawing the health charts (branches overlaid, one dash style per branch) and the health banner."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.books import AlertBook, describe_command
from dashboard.series import ChartSpec, RunSeries
from protocols.commands import CommandRecord

CHART_HEIGHT = 230
RECENT_ALERT_S = 600.0
"""An alert raised within this many seconds shows as a banner until dismissed."""
MARKER_COLUMNS = ["step", "source", "command", "reason"]


def intervention_rows(records: Iterable[CommandRecord]) -> list[tuple[int, str, str, str]]:
    """(step, source, command, reason) of every applied command, by anyone, at the step it took effect (a
    rollback at the step it left, where the drawn curve turns away)."""
    rows = []
    for record in records:
        if record.status != "applied" or record.applied_step is None:
            continue
        left = (record.effective or {}).get("from_step")
        step = left if record.command.type == "rollback" and isinstance(left, int) else record.applied_step
        rows.append((step, record.source, describe_command(record.command), record.reason))
    return sorted(rows)


def chart(
    series: RunSeries, spec: ChartSpec, markers: Sequence[tuple[int, str, str, str]] = ()
) -> alt.Chart | alt.LayerChart | None:
    """One Altair line chart with a marker (a dashed rule and a symbol per source) at every intervention, or None
    when no metric of the spec has a point yet."""
    rows = series.rows(spec)
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "value", "metric", "branch"])
    scale = alt.Scale(type="log") if spec.log_scale and (frame["value"] > 0).all() else alt.Scale(zero=False)
    metric_legend = alt.Legend(title=None) if frame["metric"].nunique() > 1 else None
    branch_legend = alt.Legend(title="branch") if frame["branch"].nunique() > 1 else None
    sparse = frame.groupby(["metric", "branch"])["step"].count().min() < 3
    lines = (
        alt.Chart(frame, title=spec.title)
        .mark_line(point=bool(sparse))
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=None, scale=scale),
            color=alt.Color("metric:N", legend=metric_legend),
            strokeDash=alt.StrokeDash("branch:N", legend=branch_legend),
            tooltip=["branch", "metric", "step", alt.Tooltip("value:Q", format=".4g")],
        )
    )
    if not markers:
        return lines
    marked = alt.Chart(pd.DataFrame(list(markers), columns=MARKER_COLUMNS))
    rules = marked.mark_rule(strokeDash=[4, 3], opacity=0.6, color="gray").encode(x="step:Q")
    symbols = marked.mark_point(filled=True, size=70, color="black").encode(
        x="step:Q",
        y=alt.value(6),
        shape=alt.Shape("source:N", legend=alt.Legend(title="intervention")),
        tooltip=MARKER_COLUMNS,
    )
    return alt.layer(lines, rules, symbols)


def draw_charts(
    series: RunSeries, specs: tuple[ChartSpec, ...], markers: Sequence[tuple[int, str, str, str]] = ()
) -> None:
    """Every chart that has data, two per row, each with the run's interventions marked."""
    drawn = [found for spec in specs if (found := chart(series, spec, markers)) is not None]
    if not drawn:
        st.info("No metrics yet: the charts appear with the trainer's first batch.")
        return
    for start in range(0, len(drawn), 2):
        for column, found in zip(st.columns(2), drawn[start : start + 2], strict=False):
            column.altair_chart(found, width="stretch", height=CHART_HEIGHT)


def health_banner(series: RunSeries, branch: str, alerts: AlertBook) -> None:
    """A banner for non-finite metrics on the current branch and for recent alerts not yet dismissed."""
    bad_steps = series.nonfinite_steps(branch)
    if bad_steps:
        st.error(
            f"Non-finite metrics on branch {branch}: {len(bad_steps)} step(s), the latest at step "
            f"{bad_steps[-1]}. Consider a rollback to the latest healthy checkpoint (Control).",
            icon=":material/emergency_home:",
        )
    recent = [
        alert
        for alert in alerts.newest_first()
        if alert.event_id > st.session_state["dismissed_alert"]
        and alert.time > time.time() - RECENT_ALERT_S
        and alert.severity != "info"
    ]
    if recent:
        newest = recent[0]
        icon = ":material/emergency_home:" if newest.severity == "critical" else ":material/warning:"
        where = f" at step {newest.step}" if newest.step is not None else ""
        left, right = st.columns([6, 1])
        left.error(
            f"Alert from {newest.source}{where}: {newest.message}"
            + (f" (and {len(recent) - 1} more)" if len(recent) > 1 else ""),
            icon=icon,
        )
        if right.button("Dismiss", key="dismiss_alert"):
            st.session_state["dismissed_alert"] = newest.event_id
            st.rerun(scope="fragment")
