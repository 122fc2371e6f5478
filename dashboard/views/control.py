"""Control: hyperparameters, schedule, optimizer, data mix; checkpoints and rollback; pause, stop, evaluate."""

from __future__ import annotations

from datetime import datetime
from typing import Any, get_args

import streamlit as st

from dashboard.commands import send, tracked_commands
from dashboard.guard import guarded
from dashboard.overview import run_header
from dashboard.session import client
from protocols.commands import OptimizerName, ScheduleKind
from protocols.records import CheckpointInfo, RunInfo, RunState

CHECKPOINTS_EVERY_S = 3.0
CHECKPOINT_ROWS = 15


def _now(value: float | None, fmt: str = "{:.4g}") -> str:
    return "blank keeps the current value" if value is None else "now " + fmt.format(value)


def hparams_form(run: RunInfo, state: RunState | None) -> None:
    """Learning rate, weight decay, gradient clipping and betas; blank fields keep their value."""
    with st.form("hparams_form", clear_on_submit=True):
        st.markdown("**Hyperparameters** (blank keeps the current value)")
        left, right = st.columns(2)
        lr = left.number_input(
            "Learning rate",
            min_value=0.0,
            max_value=10.0,
            value=None,
            step=1e-4,
            format="%g",
            placeholder=_now(state.lr if state else None),
            key="hp_lr",
        )
        weight_decay = right.number_input(
            "Weight decay",
            min_value=0.0,
            max_value=10.0,
            value=None,
            step=0.01,
            format="%g",
            placeholder=_now(state.weight_decay if state else None),
            key="hp_weight_decay",
        )
        grad_clip = left.number_input(
            "Gradient clip (0 = off)",
            min_value=0.0,
            max_value=1e6,
            value=None,
            step=0.1,
            format="%g",
            placeholder=_now(state.grad_clip if state else None),
            key="hp_grad_clip",
        )
        beta1 = right.number_input(
            "Beta 1",
            min_value=0.0,
            max_value=0.9999,
            value=None,
            step=0.01,
            format="%g",
            placeholder="e.g. 0.9",
            key="hp_beta1",
        )
        beta2 = left.number_input(
            "Beta 2",
            min_value=0.0,
            max_value=0.9999,
            value=None,
            step=0.001,
            format="%g",
            placeholder="e.g. 0.95",
            key="hp_beta2",
        )
        if st.form_submit_button("Apply hyperparameters", type="primary"):
            changes: dict[str, Any] = {
                key: value
                for key, value in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip", grad_clip))
                if value is not None
            }
            if (beta1 is None) != (beta2 is None):
                st.error("Set both betas, or neither.", icon=":material/block:")
                return
            if beta1 is not None:
                changes["betas"] = [beta1, beta2]
            if not changes:
                st.warning("Nothing to change: every field was blank.")
                return
            send(run.run_id, {"type": "set_hparams", **changes})


def schedule_form(run: RunInfo, state: RunState | None) -> None:
    """A new learning-rate schedule, starting at the step it is applied."""
    current = state.schedule if state else None
    with st.form("schedule_form"):
        st.markdown("**Schedule**" + (f" (now {current.kind}, peak {current.peak_lr:.4g})" if current else ""))
        kinds = list(get_args(ScheduleKind))
        left, right = st.columns(2)
        kind = left.selectbox("Kind", kinds, key="sched_kind")
        peak = right.number_input(
            "Peak lr",
            min_value=0.0,
            max_value=10.0,
            value=None,
            format="%g",
            placeholder="the current lr",
            key="sched_peak",
        )
        warmup = left.number_input("Warmup steps", min_value=0, value=0, step=10, key="sched_warmup")
        horizon = right.number_input(
            "Horizon steps",
            min_value=1,
            value=None,
            step=100,
            placeholder="required by cosine, linear, wsd",
            key="sched_horizon",
        )
        floor = left.number_input(
            "Floor (fraction of peak)", min_value=0.0, max_value=1.0, value=0.0, step=0.05, key="sched_floor"
        )
        decay = right.number_input(
            "Decay fraction (wsd)", min_value=0.01, max_value=1.0, value=0.2, step=0.05, key="sched_decay"
        )
        if st.form_submit_button("Set schedule"):
            command: dict[str, Any] = {
                "type": "set_schedule",
                "kind": kind,
                "warmup_steps": int(warmup),
                "floor": floor,
                "decay_fraction": decay,
            }
            if peak is not None:
                command["peak_lr"] = peak
            if horizon is not None:
                command["horizon_steps"] = int(horizon)
            send(run.run_id, command)


def optimizer_form(run: RunInfo, state: RunState | None) -> None:
    """Swap the optimizer, carrying moment state where the two are compatible."""
    with st.form("optimizer_form"):
        st.markdown("**Optimizer**" + (f" (now {state.optimizer})" if state and state.optimizer else ""))
        left, right = st.columns(2)
        name = left.selectbox("Switch to", list(get_args(OptimizerName)), key="opt_name")
        lr = right.number_input(
            "Learning rate",
            min_value=0.0,
            max_value=10.0,
            value=None,
            format="%g",
            placeholder="keep the current lr",
            key="opt_lr",
        )
        carry = st.checkbox("Carry moment state where compatible", value=True, key="opt_carry")
        if st.form_submit_button("Swap optimizer"):
            command: dict[str, Any] = {"type": "set_optimizer", "name": name, "carry_state": carry}
            if lr is not None:
                command["lr"] = lr
            send(run.run_id, command)


def normalised(weights: dict[str, float]) -> dict[str, float]:
    """Weights scaled to sum to one (all zeros stay zeros)."""
    total = sum(weights.values())
    return {name: (weight / total if total > 0 else 0.0) for name, weight in weights.items()}


def data_mix(run: RunInfo, state: RunState | None) -> None:
    """A slider per data domain, the normalised mix they make, and a button to apply it."""
    st.markdown("**Data mix**")
    if not run.domains:
        st.caption("This run declared no data domains.")
        return
    current = state.data_mix if state else {}
    weights = {
        domain: st.slider(
            domain,
            0.0,
            1.0,
            value=float(current.get(domain, 1.0 / len(run.domains))),
            step=0.05,
            key=f"mix_{run.run_id}_{domain}",
        )
        for domain in run.domains
    }
    mix = normalised(weights)
    st.caption("Normalised mix: " + " · ".join(f"{domain} {share:.0%}" for domain, share in mix.items()))
    if st.button("Apply data mix", key="mix_apply", disabled=not any(weights.values())):
        send(run.run_id, {"type": "set_data_mix", "weights": weights})


def run_controls(run: RunInfo) -> None:
    """Save a checkpoint, evaluate now, pause, resume, and stop (which asks first)."""
    st.markdown("**Run**")
    tag = st.text_input("Checkpoint tag (optional)", key="ckpt_tag")
    save, evaluate = st.columns(2)
    pause, resume, stop = st.columns(3)
    if save.button("Save checkpoint", key="ckpt_save"):
        send(run.run_id, {"type": "save_checkpoint", **({"tag": tag} if tag else {})})
    if evaluate.button("Evaluate now", key="run_evaluate"):
        send(run.run_id, {"type": "evaluate"})
    if pause.button("Pause", key="run_pause"):
        send(run.run_id, {"type": "pause"})
    if resume.button("Resume", key="run_resume"):
        send(run.run_id, {"type": "resume"})
    if stop.button("Stop…", key="run_stop"):
        st.session_state["confirm_stop"] = True
    if st.session_state["confirm_stop"]:
        st.warning(f"Stop run {run.name}? It writes a final checkpoint and ends; it cannot be resumed from here.")
        yes, no = st.columns(2)
        if yes.button("Yes, stop the run", key="run_stop_confirm", type="primary"):
            st.session_state["confirm_stop"] = False
            send(run.run_id, {"type": "stop"})
        if no.button("Cancel", key="run_stop_cancel"):
            st.session_state["confirm_stop"] = False
            st.rerun()


def rollback_cell(run_id: str, checkpoint: CheckpointInfo) -> None:
    """The rollback button of one checkpoint row, with the new branch's name and batches to skip."""
    with st.popover("Roll back…", key=f"rb_{checkpoint.checkpoint_id}"):
        branch = st.text_input(
            "New branch name",
            key=f"rb_branch_{checkpoint.checkpoint_id}",
            placeholder=f"{checkpoint.branch}-r{checkpoint.step} when blank",
        )
        skip = st.number_input("Skip batches", min_value=0, value=0, step=1, key=f"rb_skip_{checkpoint.checkpoint_id}")
        if st.button(f"Roll back to step {checkpoint.step}", key=f"rb_go_{checkpoint.checkpoint_id}", type="primary"):
            command: dict[str, Any] = {
                "type": "rollback",
                "checkpoint_id": checkpoint.checkpoint_id,
                "skip_batches": int(skip),
            }
            if branch:
                command["branch"] = branch
            send(run_id, command)


@st.fragment(run_every=CHECKPOINTS_EVERY_S)
def checkpoint_table(run_id: str) -> None:
    """The newest checkpoints, one row each with a rollback button."""
    st.markdown("**Checkpoints**")
    with guarded(recover=False):
        checkpoints = client().list_checkpoints(run_id)[::-1][:CHECKPOINT_ROWS]
        if not checkpoints:
            st.caption("No checkpoints yet.")
            return
        widths = [3, 2, 1, 2, 1, 2]
        for column, title in zip(
            st.columns(widths), ["checkpoint", "branch", "step", "saved", "healthy", ""], strict=True
        ):
            column.caption(title)
        for checkpoint in checkpoints:
            name, branch, step, saved, healthy, action = st.columns(widths)
            name.write(f"`{checkpoint.checkpoint_id}`" + (f" ({checkpoint.tag})" if checkpoint.tag else ""))
            branch.write(checkpoint.branch)
            step.write(str(checkpoint.step))
            saved.write(datetime.fromtimestamp(checkpoint.time).strftime("%H:%M:%S"))
            healthy.markdown(":green[:material/check:]" if checkpoint.healthy else ":orange[:material/warning:]")
            with action:
                rollback_cell(run_id, checkpoint)


def control_page() -> None:
    """The control page of the chosen run."""
    run: RunInfo | None = st.session_state["run"]
    if run is None:
        st.info("Pick a run in the sidebar.")
        return
    run_header(run.run_id)
    st.text_input("Reason (kept with every command you send)", key="reason", placeholder="from the dashboard")
    tracked_commands(run.run_id)
    left, right = st.columns(2)
    with left:
        hparams_form(run, run.state)
        schedule_form(run, run.state)
        optimizer_form(run, run.state)
    with right:
        run_controls(run)
        data_mix(run, run.state)
    checkpoint_table(run.run_id)


control_page()
