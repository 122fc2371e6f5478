"""Runs, metrics, checkpoints and the reports a trainer sends about its run."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, JsonValue, field_validator

from protocols.base import (
    PRINCIPAL_PATTERN,
    Count,
    MetricName,
    Name,
    Source,
    Step,
    Text,
    TypedModel,
    UnixTime,
    WireModel,
)
from protocols.commands import OptimizerName
from protocols.constants import PROTOCOL_VERSION, RunStatus
from protocols.policy import Policy

COMPATIBLE_VERSION = rf"^{PROTOCOL_VERSION.split('.')[0]}\.[0-9]+$"
"""The protocol versions this server speaks: any minor version of its major one."""

MAX_CONFIG_BYTES = 64 * 1024
"""A run's `config` as compact JSON: every run is held in memory and sent to watchers whenever it changes."""

MetricValues = Annotated[dict[MetricName, float], Field(max_length=4096)]


class MetricsSample(WireModel):
    """One step's metric values on one branch; non-finite values are named in `nonfinite`, not sent."""

    branch: Name = "main"
    step: Step
    time: UnixTime
    values: MetricValues
    nonfinite: list[MetricName] = Field(default_factory=list, max_length=4096)
    """Metrics whose value was NaN or infinite at this step (JSON cannot carry them)."""


class MetricsBatch(WireModel):
    """Samples sent together; `batch_id` makes a resend after a lost answer harmless."""

    samples: list[MetricsSample] = Field(min_length=1, max_length=10_000)
    batch_id: Name | None = None
    """Unique per run; a batch resent with the id of one of the run's recent batches (the server keeps the newest
    few dozen) is acknowledged and not stored again."""


class MetricsRecord(MetricsSample):
    """A sample with the run it belongs to, as history and the stream return it."""

    run_id: Name


class MetricsAck(WireModel):
    """The server's answer to a metrics batch: stored (or already stored) before this was sent."""

    stored_values: Count
    duplicate: bool = False


class MetricSeries(WireModel):
    """One metric's history, column-wise; with downsampling, each point is a bucket of `bucket_steps`."""

    steps: list[Step]
    """The last step of each bucket (each point's step without downsampling)."""
    values: list[float]
    """The bucket mean (the value itself without downsampling)."""
    min: list[float] | None = None
    """Bucket minimum; present only when downsampled, so spikes stay visible."""
    max: list[float] | None = None


class MetricsHistory(WireModel):
    """Metric history for one run and branch."""

    run_id: Name
    branch: Name
    bucket_steps: Count
    """Steps per point: 1 when not downsampled."""
    series: dict[MetricName, MetricSeries]


class ScheduleState(WireModel):
    """The learning-rate schedule in force."""

    kind: str
    peak_lr: float
    warmup_steps: Step = 0
    horizon_steps: Step | None = None
    floor: float = 0.0
    start_step: Step = 0


class RunState(WireModel):
    """What the trainer reports about its current settings, so that relative changes have a base."""

    step: Step
    branch: Name = "main"
    paused: bool = False
    lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    optimizer: OptimizerName | None = None
    schedule: ScheduleState | None = None
    data_mix: dict[Name, float] = Field(default_factory=dict)
    param_groups: list[Name] = Field(default_factory=list)


class RunRegistration(WireModel):
    """What a trainer sends to register (or re-attach to) a run."""

    name: Name
    run_id: Name | None = None
    """Re-attach to an existing run after a trainer restart; a new id is made when left out."""
    config: dict[str, JsonValue] = Field(default_factory=dict)
    """Free-form run configuration shown to people and agents (model size, preset, ...), at most
    MAX_CONFIG_BYTES as JSON."""
    domains: list[Name] = Field(default_factory=list, max_length=256)
    """The data domains `set_data_mix` may name."""
    policy: Policy | None = None
    """The run's command policy; the server's default when left out. Re-attaching with a different policy
    needs an admin token (`PUT .../policy` is the way to change it)."""
    protocol_version: Annotated[str, Field(max_length=32, json_schema_extra={"pattern": COMPATIBLE_VERSION})] = (
        PROTOCOL_VERSION
    )
    """The trainer's protocol version; the server takes any minor version of its own major one."""

    @field_validator("config")
    @classmethod
    def _config_is_bounded(cls, config: dict[str, JsonValue]) -> dict[str, JsonValue]:
        size = len(json.dumps(config, separators=(",", ":")).encode())
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} are kept with a run")
        return config


class RunInfo(WireModel):
    """A run as the server knows it."""

    run_id: Name
    name: Name
    status: RunStatus
    created_at: UnixTime
    updated_at: UnixTime
    last_heartbeat: UnixTime | None = None
    step: Step = 0
    branch: Name = "main"
    branches: list[Name] = Field(default_factory=lambda: ["main"])
    config: dict[str, JsonValue] = Field(default_factory=dict)
    domains: list[Name] = Field(default_factory=list)
    policy: Policy = Field(default_factory=Policy)
    state: RunState | None = None
    protocol_version: str = PROTOCOL_VERSION
    registered_by: Annotated[str, Field(pattern=PRINCIPAL_PATTERN)] | None = None
    """The token that registered the run: only it (or an admin token) may act as the run's trainer."""


class CheckpointInfo(WireModel):
    """A checkpoint the trainer wrote, as indexed by the server."""

    checkpoint_id: Name
    branch: Name
    step: Step
    time: UnixTime
    tag: Name | None = None
    path: Annotated[str, Field(max_length=4096)] = ""
    """Where the file lives on the trainer's machine; empty for an in-memory snapshot."""
    size_bytes: Count = 0
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    healthy: bool = True
    """False when a metric recorded since the previous checkpoint (up to this save) was NaN or infinite."""
    metrics: dict[MetricName, float] = Field(default_factory=dict)


class Heartbeat(TypedModel):
    """The trainer is alive; carries its current state."""

    type: Literal["heartbeat"] = "heartbeat"
    state: RunState


class StatusReport(TypedModel):
    """The run changed status (paused, resumed, finished, failed)."""

    type: Literal["status"] = "status"
    status: RunStatus
    message: Text = ""


class CheckpointSaved(TypedModel):
    """A checkpoint was written (or evicted when `deleted`)."""

    type: Literal["checkpoint"] = "checkpoint"
    checkpoint: CheckpointInfo
    deleted: bool = False


class LogReport(TypedModel):
    """A log line from the trainer."""

    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: Text
    step: Step | None = None


class AlertReport(TypedModel):
    """Something a person should see: raised by a trainer or an agent."""

    type: Literal["alert"] = "alert"
    severity: Literal["info", "warning", "critical"] = "warning"
    message: Text
    step: Step | None = None
    source: Source | Literal["trainer"] = "trainer"
    """Who raised it: `trainer` when the run's trainer reports it, else the sender's own source (its token's)."""


RunReport = Annotated[Heartbeat | StatusReport | CheckpointSaved | LogReport | AlertReport, Field(discriminator="type")]
"""Anything posted to `/runs/{run_id}/events`."""


class RunReportBatch(WireModel):
    """Reports sent together."""

    reports: list[RunReport] = Field(min_length=1, max_length=1000)


class RunList(WireModel):
    """Every run the server knows, newest first."""

    runs: list[RunInfo]


class CheckpointList(WireModel):
    """A run's checkpoints, oldest first."""

    checkpoints: list[CheckpointInfo]


class ReportAck(WireModel):
    """How many reports were stored."""

    accepted: Count
