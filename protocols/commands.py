"""The commands a run accepts, the envelope that carries them and the record of their life."""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Literal, Self

from pydantic import Field, JsonValue, TypeAdapter, model_validator

from protocols.base import MAX_WIRE_INT, Name, Source, Step, Text, TypedModel, UnixTime, WholeNumber, WireModel
from protocols.constants import CommandStatus

LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

OptimizerName = Literal["adamw", "adam", "sgd", "rmsprop", "adafactor", "nadam", "radam", "adagrad"]
ScheduleKind = Literal["constant", "cosine", "linear", "wsd", "inverse_sqrt"]


class SetHparams(TypedModel):
    """Change optimizer hyperparameters at the next step boundary; fields left out keep their value, and at least
    one of lr, weight_decay, betas, momentum, eps or grad_clip must be set."""

    type: Literal["set_hparams"] = "set_hparams"
    lr: LearningRate | None = None
    """Learning rate; with a schedule running it becomes the schedule's current value."""
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    """Decoupled (AdamW) or L2 weight decay coefficient. Without `param_groups` it changes the groups that decay: a
    group whose decay was 0 beside decaying groups when the run was first steered (the usual no-decay group of norms
    and biases) keeps its value unless named, even after the others were set to 0 and back."""
    betas: tuple[Fraction, Fraction] | None = None
    """Adam-family moment decay rates, each in [0, 1)."""
    momentum: Fraction | None = None
    """SGD/RMSprop momentum in [0, 1)."""
    eps: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Denominator epsilon of adaptive optimizers."""
    grad_clip: Annotated[float, Field(ge=0.0, le=1e6)] | None = None
    """Global gradient-norm clipping threshold; 0 turns clipping off."""
    param_groups: list[Name] | None = Field(default=None, min_length=1, max_length=64)
    """Names of the parameter groups to change; all groups when left out."""

    @model_validator(mode="after")
    def _changes_something(self) -> Self:
        fields = ("lr", "weight_decay", "betas", "momentum", "eps", "grad_clip")
        if all(getattr(self, name) is None for name in fields):
            raise ValueError(f"set_hparams must set at least one of {', '.join(fields)}")
        return self


class SetSchedule(TypedModel):
    """Replace the learning-rate schedule; it starts at the step the command is applied. cosine, linear and wsd
    need horizon_steps, which must exceed warmup_steps."""

    type: Literal["set_schedule"] = "set_schedule"
    kind: ScheduleKind
    """constant, cosine, linear (decay), wsd (warmup-stable-decay) or inverse_sqrt."""
    peak_lr: LearningRate | None = None
    """The schedule's peak learning rate; the run's current learning rate when left out."""
    warmup_steps: Annotated[int, Field(ge=0, le=10**9), WholeNumber] = 0
    """Steps of linear warmup from `floor * peak_lr` up to `peak_lr`."""
    horizon_steps: Annotated[int, Field(ge=1, le=10**9), WholeNumber] | None = None
    """Steps from now until the schedule reaches its floor; required by cosine, linear and wsd."""
    floor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """The lowest learning rate as a fraction of `peak_lr`."""
    decay_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    """For wsd: the last fraction of the horizon spent decaying."""

    @model_validator(mode="after")
    def _horizon_when_needed(self) -> Self:
        if self.kind in ("cosine", "linear", "wsd") and self.horizon_steps is None:
            raise ValueError(f"horizon_steps is required for a {self.kind} schedule")
        if self.horizon_steps is not None and self.warmup_steps >= self.horizon_steps:
            raise ValueError("warmup_steps must be smaller than horizon_steps")
        return self


class SetOptimizer(TypedModel):
    """Swap the optimizer, carrying moment state across where the two are compatible."""

    type: Literal["set_optimizer"] = "set_optimizer"
    name: OptimizerName
    """The torch.optim optimizer to switch to."""
    lr: LearningRate | None = None
    """Learning rate of the new optimizer; the current one when left out."""
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    """Weight decay of the new optimizer, for the groups `set_hparams.weight_decay` without `param_groups` would
    change; the current one when left out."""
    betas: tuple[Fraction, Fraction] | None = None
    momentum: Fraction | None = None
    eps: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    carry_state: bool = True
    """Carry moment estimates (e.g. Adam's exp_avg) over where the new optimizer keeps the same ones and they cannot
    make its next step larger than it would make from its own history; the result lists what was dropped and why."""


class SetDataMix(TypedModel):
    """New sampling weights over the run's data domains, not all zero; they are normalised to sum to one."""

    type: Literal["set_data_mix"] = "set_data_mix"
    weights: dict[Name, Annotated[float, Field(ge=0.0, le=1e6)]] = Field(min_length=1, max_length=256)
    """Weight per domain name; domains left out keep their current weight."""

    @model_validator(mode="after")
    def _not_all_zero(self) -> Self:
        if not any(weight > 0 for weight in self.weights.values()):
            raise ValueError("weights must not all be zero")
        return self


class SaveCheckpoint(TypedModel):
    """Save a checkpoint now."""

    type: Literal["save_checkpoint"] = "save_checkpoint"
    tag: Name | None = None
    """An optional label kept with the checkpoint."""


class Rollback(TypedModel):
    """Restore a checkpoint onto a new branch, optionally skipping the batches that followed it; name exactly one
    of checkpoint_id, step or latest_healthy=true."""

    type: Literal["rollback"] = "rollback"
    checkpoint_id: Name | None = None
    """The checkpoint to restore."""
    step: Step | None = None
    """Restore the latest checkpoint at or before this step on the current branch."""
    latest_healthy: bool = False
    """Restore the newest checkpoint saved with no NaN or infinite metric since the one before it (`healthy`)."""
    branch: Name | None = None
    """Name of the new branch; `{branch}.r{step}` of the current branch and the checkpoint's step when left out."""
    skip_batches: Annotated[int, Field(ge=0, le=10**7), WholeNumber] = 0
    """Skip the next N batches that the original run saw after the checkpoint."""

    @model_validator(mode="after")
    def _exactly_one_target(self) -> Self:
        chosen = [self.checkpoint_id is not None, self.step is not None, self.latest_healthy]
        if sum(chosen) != 1:
            raise ValueError("rollback needs exactly one of checkpoint_id, step or latest_healthy=true")
        return self


def rollback_branch(base: str, step: int, taken: Collection[str] = ()) -> str:
    """The branch a rollback to `step` opens when it names none: `{base}.r{step}` (base cut to 40 characters, so
    the name stays a valid `Name`), then `-2`, `-3`, ... while that name is in `taken`."""
    stem = f"{base[:40]}.r{step}"
    name, suffix = stem, 2
    while name in taken:
        name, suffix = f"{stem}-{suffix}", suffix + 1
    return name


class Pause(TypedModel):
    """Pause between steps; the run still heartbeats and takes commands."""

    type: Literal["pause"] = "pause"


class Resume(TypedModel):
    """Resume a paused run."""

    type: Literal["resume"] = "resume"


class Stop(TypedModel):
    """Stop the run gracefully and mark it finished."""

    type: Literal["stop"] = "stop"
    final_checkpoint: bool = True
    """Write a final checkpoint before stopping."""


class Evaluate(TypedModel):
    """Run evaluation now on every domain's held-out split."""

    type: Literal["evaluate"] = "evaluate"
    max_batches: Annotated[int, Field(ge=1, le=100_000), WholeNumber] | None = None
    """Evaluate on at most this many batches per domain; the run's default when left out."""


Command = Annotated[
    SetHparams | SetSchedule | SetOptimizer | SetDataMix | SaveCheckpoint | Rollback | Pause | Resume | Stop | Evaluate,
    Field(discriminator="type"),
]
"""Any command, told apart by its `type`."""

command_adapter: TypeAdapter[Command] = TypeAdapter(Command)

CommandType = Literal[
    "set_hparams",
    "set_schedule",
    "set_optimizer",
    "set_data_mix",
    "save_checkpoint",
    "rollback",
    "pause",
    "resume",
    "stop",
    "evaluate",
]


class CommandEnvelope(WireModel):
    """A command as submitted: the command, who sent it and why, and an optional idempotency id."""

    command: Command
    id: Name | None = None
    """A client-chosen id; resubmitting the same id returns the first record instead of a new command."""
    source: Source = "user:anonymous"
    """Who sends it, e.g. `user:alice` or `agent:rules`; the run's policy may hold some sources for approval."""
    reason: Text = ""
    """Why, in a sentence a person can read."""
    hold: bool = False
    """Hold the command in `pending_approval` until a person approves it (agents propose this way).

    A sender may ask to be held; it can never skip the hold that the run's policy puts on its source.
    """


class CommandResult(WireModel):
    """The trainer's answer to a delivered command."""

    status: Literal["applied", "rejected", "failed"]
    step: Step | None = None
    """The step boundary at which the command took effect (before this step ran)."""
    effective: dict[str, JsonValue] = Field(default_factory=dict)
    """The values in force after applying, e.g. {"lr": 0.0003}."""
    message: Text = ""
    """For rejected or failed commands, the reason."""


class CommandRecord(WireModel):
    """A command's whole life as the server stores it."""

    id: Name
    run_id: Name
    seq: Annotated[int, Field(ge=1, le=MAX_WIRE_INT), WholeNumber]
    """Position in the run's command queue; commands are delivered and applied in this order."""
    command: Command
    source: Source
    reason: Text
    status: CommandStatus
    created_at: UnixTime
    updated_at: UnixTime
    delivered_at: UnixTime | None = None
    finished_at: UnixTime | None = None
    applied_step: Step | None = None
    effective: dict[str, JsonValue] | None = None
    message: Text = ""

    @property
    def finished(self) -> bool:
        """True once the command was applied, rejected or failed."""
        return self.status in ("applied", "rejected", "failed")


class CommandDecision(WireModel):
    """A person's approval or rejection of a command held for approval."""

    source: Source = "user:anonymous"
    reason: Text = ""


class CommandList(WireModel):
    """Command records in `seq` order."""

    commands: list[CommandRecord]
