"""A case study's picture: loss and learning rate against steps, the unsteered runs side by side in the first
column and each steered run in its own, every branch drawn (thrown-away ones faded) and every command marked
with its source. Needs the `plots` extra (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmarks.case_studies._harness import RunOutcome, lineage_of, number
from protocols.commands import CommandRecord

SMOOTH = 10
"""Training loss is drawn as the mean of this many steps (one step's loss is noisy)."""
MARKERS = {"rollback": "X", "set_hparams": "D", "save_checkpoint": "s", "set_data_mix": "P", "pause": "o"}
"""Marker shape per command type (any other type: `*`)."""
ON_TOP = ("save_checkpoint", "set_hparams", "rollback")
"""Drawing order where markers meet at one step: a rollback stays visible over the checkpoint saved before it."""
SOURCE_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
REFERENCE_COLOR = "lightgray"
"""The unsteered runs, drawn again behind each steered run for comparison."""
RUN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:cyan", "tab:gray", "tab:olive")


def smoothed(points: dict[int, float]) -> tuple[list[int], list[float]]:
    """Steps and the trailing mean of `SMOOTH` values at each."""
    steps = sorted(points)
    values = [points[s] for s in steps]
    means = [sum(values[max(0, i - SMOOTH + 1) : i + 1]) / (i + 1 - max(0, i - SMOOTH + 1)) for i in range(len(steps))]
    return steps, means


def applied_on(outcome: RunOutcome) -> list[tuple[CommandRecord, str]]:
    """Each applied command of anyone (agent, script, person) with the branch it was applied on, in `seq` order."""
    branch, found = "main", []
    for record in sorted(outcome.commands, key=lambda r: r.seq):
        if record.status != "applied" or record.applied_step is None:
            continue
        effective = record.effective or {}
        found.append((record, str(effective.get("from_branch", branch))))
        if record.command.type == "rollback":
            branch = str(effective.get("branch", branch))
    return found


def draw(outcomes: Sequence[RunOutcome], path: Path, title: str) -> Path:
    """Write the picture of these outcomes to `path` (PNG) and return it."""
    reference = [o for o in outcomes if not o.spec.steered]
    columns = ([reference] if reference else []) + [[o] for o in outcomes if o.spec.steered]
    figure = Figure(figsize=(max(7.0, 4.6 * len(columns)), 6.2))
    axes = figure.subplots(2, len(columns), sharex="col", squeeze=False, gridspec_kw={"height_ratios": [2, 1]})
    sources = sorted({r.source for o in outcomes for r, _ in applied_on(o)})
    source_color = {source: SOURCE_COLORS[i % len(SOURCE_COLORS)] for i, source in enumerate(sources)}
    marked: dict[tuple[str, str], Line2D] = {}
    for column, group in enumerate(columns):
        loss_axis, lr_axis = axes[0][column], axes[1][column]
        steered = group[0].spec.steered
        loss_axis.set_title(group[0].spec.label if steered else "without an agent", fontsize=10)
        for index, outcome in enumerate(group):
            color = RUN_COLORS[index % len(RUN_COLORS)] if not steered else "tab:blue"
            label = f"{outcome.spec.label}: {outcome.final_eval:.3f}" if not steered else None
            _draw_run(outcome, loss_axis, lr_axis, color, label)
            for record, branch in applied_on(outcome):
                _mark(record, branch, outcome, loss_axis, lr_axis, source_color[record.source], marked)
        if steered:
            for other in reference:
                _draw_run(other, loss_axis, lr_axis, REFERENCE_COLOR, None, faint=True)
            outcome = group[0]
            loss_axis.text(
                0.98,
                0.97,
                f"final eval {outcome.final_eval:.3f}\n{outcome.trained_steps} steps trained",
                transform=loss_axis.transAxes,
                ha="right",
                va="top",
                fontsize=8,
            )
        else:
            loss_axis.legend(fontsize=7, title="final eval loss", title_fontsize=7, loc="upper right")
        loss_axis.set_ylabel("training loss (mean of 10 steps)" if column == 0 else "", fontsize=8)
        lr_axis.set_ylabel("learning rate" if column == 0 else "", fontsize=8)
        lr_axis.set_yscale("log")
        lr_axis.set_xlabel("step", fontsize=8)
        for axis in (loss_axis, lr_axis):
            axis.tick_params(which="both", labelsize=7)
            axis.grid(alpha=0.3)
    lows = [min(smoothed(series["loss"])[1]) for o in outcomes for series in o.branches.values() if series.get("loss")]
    if lows:
        for axis in axes[0]:
            axis.set_ylim(min(lows) - 0.1, min(lows) + 2.2)
    handles = [Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="eval loss")]
    if any(o.spec.steered for o in outcomes):
        handles[:0] = [
            Line2D([], [], color="tab:blue", label="final branch"),
            Line2D([], [], color="tab:blue", alpha=0.35, linestyle="--", label="thrown-away branch"),
        ]
        if reference:
            handles.append(Line2D([], [], color=REFERENCE_COLOR, label="runs without an agent, for comparison"))
    handles += marked.values()
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _draw_run(
    outcome: RunOutcome, loss_axis: Axes, lr_axis: Axes, color: str, label: str | None, *, faint: bool = False
) -> None:
    """Every branch of one run: the final lineage solid, thrown-away stretches faded and dashed (all thin and
    behind the rest when `faint`)."""
    final = {branch: (first, last) for branch, first, last in lineage_of(outcome.parents, outcome.branch)}
    for branch, series in outcome.branches.items():
        first, last = final.get(branch, (1, 0))
        for key, axis in (("loss", loss_axis), ("lr", lr_axis)):
            points = series.get(key, {})
            kept = {s: v for s, v in points.items() if first <= s <= last}
            thrown = {s: v for s, v in points.items() if not first <= s <= last}
            steps, values = smoothed(points) if key == "loss" else (sorted(points), [points[s] for s in sorted(points)])
            curve = dict(zip(steps, values, strict=True))
            width, depth = (0.8, 1) if faint else (1.3, 2)
            if thrown:
                axis.plot(*_xy(curve, thrown), color=color, alpha=0.35, linestyle="--", linewidth=1, zorder=depth)
            if kept:
                named = label if key == "loss" else None
                axis.plot(*_xy(curve, kept), color=color, linewidth=width, label=named, zorder=depth)
        evals = {s: v for s, v in series.get("eval_loss", {}).items() if first <= s <= last}
        if evals and not faint:
            loss_axis.plot(list(evals), list(evals.values()), "o", color=color, markersize=4, zorder=3)


def _xy(curve: dict[int, float], wanted: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(wanted)
    return steps, [curve[s] for s in steps]


def _mark(
    record: CommandRecord,
    branch: str,
    outcome: RunOutcome,
    loss_axis: Axes,
    lr_axis: Axes,
    color: str,
    marked: dict[tuple[str, str], Line2D],
) -> None:
    """One command at the step it was applied, on the branch it was applied on, in its source's color."""
    kind = record.command.type
    at = int(number(record, "from_step")) if kind == "rollback" else record.applied_step or 0
    series = outcome.branches.get(branch, {})
    steps, values = smoothed(series.get("loss", {}))
    curve = dict(zip(steps, values, strict=True))
    known = [s for s in steps if s <= at]
    lrs = series.get("lr", {})
    lr_known = [s for s in sorted(lrs) if s <= at]
    marker = MARKERS.get(kind, "*")
    style = {
        "marker": marker,
        "color": color,
        "markersize": 7,
        "markeredgecolor": "black",
        "markeredgewidth": 0.5,
        "linestyle": "",
    }
    depth = 5 + (ON_TOP.index(kind) if kind in ON_TOP else 0)
    if known:
        loss_axis.plot([at], [curve[known[-1]]], zorder=depth, **style)
    if lr_known:
        lr_axis.plot([at], [lrs[lr_known[-1]]], zorder=depth, **style)
    marked.setdefault((record.source, kind), Line2D([], [], label=f"{record.source} {kind}", **style))
