"""Control: hyperparameters, schedule, optimizer, data mix; checkpoints and rollback; pause, stop, evaluate."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from dashboard.commands import build, send, tracked_commands
from dashboard.forms import checkbox_field, choice_field, field_spec, number_field
from dashboard.guard import guarded
from dashboard.overview import run_header
from dashboard.session import client
from protocols.commands import (
    Evaluate,
    Pause,
    Resume,
    Rollback,
    SaveCheckpoint,
    SetDataMix,
    SetHparams,
    SetOptimizer,
    SetSchedule,
    Stop,
    rollback_branch,
)
from protocols.records import CheckpointInfo, RunInfo, RunState

CHECKPOINTS_EVERY_S = 3.0
CHECKPOINT_ROWS = 15


def _now(value: float | None) -> str:
    return "blank keeps the current value" if value is None else f"now {value:.4g}"


def hparams_form(run: RunInfo, state: RunState | None) -> None:
    """Learning rate, weight decay, gradient clipping and betas; blank fields keep their value."""
    with st.form("hparams_form", clear_on_submit=True):
        st.markdown("**Hyperparameters** (blank keeps the current value)")
        left, right = st.columns(2)
        lr = number_field(
            left,
            SetHparams,
            "lr",
            "Learning rate",
            key="hp_lr",
            step=1e-4,
            placeholder=_now(state.lr if state else None),
        )
        weight_decay = number_field(
            right,
            SetHparams,
            "weight_decay",
            "Weight decay",
            key="hp_weight_decay",
            step=0.01,
            placeholder=_now(state.weight_decay if state else None),
        )
        grad_clip = number_field(
            left,
            SetHparams,
            "grad_clip",
            "Gradient clip (0 = off)",
            key="hp_grad_clip",
            step=0.1,
            placeholder=_now(state.grad_clip if state else None),
        )
        beta1 = number_field(right, SetHparams, "betas", "Beta 1", key="hp_beta1", step=0.01, placeholder="e.g. 0.9")
        beta2 = number_field(left, SetHparams, "betas", "Beta 2", key="hp_beta2", step=0.001, placeholder="e.g. 0.95")
        if st.form_submit_button("Apply hyperparameters", type="primary"):
            if (beta1 is None) != (beta2 is None):
                st.error("Set both betas, or neither.", icon=":material/block:")
                return
            betas = (beta1, beta2) if beta1 is not None else None
            send(run.run_id, build(SetHparams, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, betas=betas))


def schedule_form(run: RunInfo, state: RunState | None) -> None:
    """A new learning-rate schedule, starting at the step it is applied."""
    current = state.schedule if state else None
    with st.form("schedule_form"):
        st.markdown("**Schedule**" + (f" (now {current.kind}, peak {current.peak_lr:.4g})" if current else ""))
        left, right = st.columns(2)
        kind = choice_field(left, SetSchedule, "kind", "Kind", key="sched_kind")
        peak = number_field(
            right, SetSchedule, "peak_lr", "Peak lr", key="sched_peak", step=1e-4, placeholder="the current lr"
        )
        warmup = number_field(left, SetSchedule, "warmup_steps", "Warmup steps", key="sched_warmup", step=10)
        horizon = number_field(
            right,
            SetSchedule,
            "horizon_steps",
            "Horizon steps",
            key="sched_horizon",
            step=100,
            placeholder="required by cosine, linear, wsd",
        )
        floor = number_field(left, SetSchedule, "floor", "Floor (fraction of peak)", key="sched_floor", step=0.05)
        decay = number_field(right, SetSchedule, "decay_fraction", "Decay fraction (wsd)", key="sched_decay", step=0.05)
        if st.form_submit_button("Set schedule"):
            command = build(
                SetSchedule,
                kind=kind,
                peak_lr=peak,
                warmup_steps=warmup,
                horizon_steps=horizon,
                floor=floor,
                decay_fraction=decay,
            )
            send(run.run_id, command)


def optimizer_form(run: RunInfo, state: RunState | None) -> None:
    """Swap the optimizer, carrying moment state where the two are compatible."""
    with st.form("optimizer_form"):
        st.markdown("**Optimizer**" + (f" (now {state.optimizer})" if state and state.optimizer else ""))
        left, right = st.columns(2)
        name = choice_field(left, SetOptimizer, "name", "Switch to", key="opt_name")
        lr = number_field(
            right, SetOptimizer, "lr", "Learning rate", key="opt_lr", step=1e-4, placeholder="keep the current lr"
        )
        carry = checkbox_field(st, SetOptimizer, "carry_state", "Carry moment state where compatible", key="opt_carry")
        if st.form_submit_button("Swap optimizer"):
            send(run.run_id, build(SetOptimizer, name=name, lr=lr, carry_state=carry))


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
            help=f"{field_spec(SetDataMix, 'weights').help} Relative: the mix is normalised to sum to one.",
            key=f"mix_{run.run_id}_{domain}",
        )
        for domain in run.domains
    }
    mix = normalised(weights)
    st.caption("Normalised mix: " + " · ".join(f"{domain} {share:.0%}" for domain, share in mix.items()))
    if st.button("Apply data mix", key="mix_apply", disabled=not any(weights.values())):
        send(run.run_id, build(SetDataMix, weights=weights))


def run_controls(run: RunInfo) -> None:
    """Save a checkpoint, evaluate now, pause, resume, and stop (which asks first)."""
    st.markdown("**Run**")
    tag = st.text_input("Checkpoint tag (optional)", key="ckpt_tag")
    save, evaluate = st.columns(2)
    pause, resume, stop = st.columns(3)
    if save.button("Save checkpoint", key="ckpt_save"):
        send(run.run_id, build(SaveCheckpoint, tag=tag or None))
    if evaluate.button("Evaluate now", key="run_evaluate"):
        send(run.run_id, Evaluate())
    if pause.button("Pause", key="run_pause"):
        send(run.run_id, Pause())
    if resume.button("Resume", key="run_resume"):
        send(run.run_id, Resume())
    if stop.button("Stop…", key="run_stop"):
        st.session_state["confirm_stop"] = True
    if st.session_state["confirm_stop"]:
        st.warning(f"Stop run {run.name}? It writes a final checkpoint and ends; it cannot be resumed from here.")
        yes, no = st.columns(2)
        if yes.button("Yes, stop the run", key="run_stop_confirm", type="primary"):
            st.session_state["confirm_stop"] = False
            send(run.run_id, Stop())
        if no.button("Cancel", key="run_stop_cancel"):
            st.session_state["confirm_stop"] = False
            st.rerun()


def rollback_cell(run: RunInfo, checkpoint: CheckpointInfo) -> None:
    """The rollback button of one checkpoint row, with the new branch's name (the trainer's when left blank) and
    batches to skip."""
    with st.popover("Roll back…", key=f"rb_{checkpoint.checkpoint_id}"):
        branch = st.text_input(
            "New branch name",
            key=f"rb_branch_{checkpoint.checkpoint_id}",
            placeholder=f"{rollback_branch(run.branch, checkpoint.step, run.branches)} when blank",
            help=field_spec(Rollback, "branch").help,
        )
        skip = number_field(
            st, Rollback, "skip_batches", "Skip batches", key=f"rb_skip_{checkpoint.checkpoint_id}", step=1
        )
        if st.button(f"Roll back to step {checkpoint.step}", key=f"rb_go_{checkpoint.checkpoint_id}", type="primary"):
            command = build(Rollback, checkpoint_id=checkpoint.checkpoint_id, skip_batches=skip, branch=branch or None)
            send(run.run_id, command)


@st.fragment(run_every=CHECKPOINTS_EVERY_S)
def checkpoint_table(run_id: str) -> None:
    """The newest checkpoints, one row each with a rollback button."""
    st.markdown("**Checkpoints**")
    with guarded(recover=False):
        run = client().get_run(run_id)
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
                rollback_cell(run, checkpoint)


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
