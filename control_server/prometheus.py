"""`GET /metrics`: server health and each run's latest training values, in Prometheus text format.

Counters and histograms are updated as things happen; per-run training values are read from
server state at scrape time by a custom collector, so finished runs simply stop appearing once
`finished_run_ttl_s` has passed.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from control_server.commands import CommandService
from control_server.events import EventLog
from control_server.fanout import Broadcaster
from control_server.metrics import MetricsService
from control_server.runs import RunRegistry
from control_server.store import Store
from protocols.commands import CommandRecord
from protocols.constants import RUN_STATUSES
from protocols.events import Event, MetricsEvent
from protocols.records import RunInfo

TRAINING_GAUGES: dict[str, tuple[str, str]] = {
    "loss": ("runsteer_train_loss", "Latest training loss."),
    "eval_loss": ("runsteer_eval_loss", "Latest evaluation loss."),
    "lr": ("runsteer_learning_rate", "Learning rate in force."),
    "weight_decay": ("runsteer_weight_decay", "Weight decay in force."),
    "grad_norm": ("runsteer_grad_norm", "Global gradient norm before clipping."),
    "param_norm": ("runsteer_param_norm", "Global parameter norm."),
    "update_ratio": ("runsteer_update_ratio", "Update norm over parameter norm."),
    "logit_max": ("runsteer_output_logit_max", "Largest absolute output logit."),
    "logit_z": ("runsteer_output_logit_z", "Mean log-sum-exp of the output logits (log Z)."),
    "tokens_per_s": ("runsteer_throughput_tokens_per_second", "Training throughput."),
    "nonfinite": ("runsteer_nonfinite", "1 when a metric was NaN or infinite at the latest step."),
}
"""Metric key → (Prometheus name, help); other keys stay out of the exposition to keep it bounded."""

LAYERED_GAUGES: dict[str, tuple[str, str, str]] = {
    "attn_logit_max/": (
        "runsteer_attention_logit_max",
        "layer",
        "Largest pre-softmax attention logit of each layer (the trainer measures it every few steps).",
    ),
    "grad_norm/": ("runsteer_block_grad_norm", "block", "Gradient norm before clipping of each block."),
}
"""Metric key prefix → (Prometheus name, label of the part after the prefix, help): the per-layer signals."""

MAX_LAYERS = 128
"""At most this many layers (or blocks) per run and branch are exported, the first in sorted order."""

LAYER_NAME = re.compile(r"^[A-Za-z0-9_.]{1,32}$")
"""What a layer or block label may be (`0`, `block.11`, `ln_f`); other keys are left out."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class StepTimes:
    """A histogram of one run's step times, fed from its `step_time_ms` metric."""

    counts: list[int] = field(default_factory=lambda: [0] * len(STEP_TIME_BUCKETS))
    total_s: float = 0.0
    observed: int = 0

    def observe(self, seconds: float) -> None:
        """Count one step."""
        index = bisect_left(STEP_TIME_BUCKETS, seconds)
        if index < len(self.counts):  # above the largest bound it counts only towards +Inf
            self.counts[index] += 1
        self.total_s += seconds
        self.observed += 1

    def buckets(self) -> Sequence[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as Prometheus wants them."""
        cumulative = list(accumulate(self.counts))
        return [(f"{bound:g}", count) for bound, count in zip(STEP_TIME_BUCKETS, cumulative, strict=True)] + [
            ("+Inf", self.observed)
        ]


def _layers(values: dict[str, float], prefix: str) -> list[tuple[str, float]]:
    """(layer, value) of the keys under `prefix` whose rest is a plain layer name, at most `MAX_LAYERS` of them."""
    found = sorted((key[len(prefix) :], value) for key, value in values.items() if key.startswith(prefix))
    return [(layer, value) for layer, value in found if LAYER_NAME.match(layer)][:MAX_LAYERS]


class _LiveState(Collector):
    """Reads runs and latest values from server state at scrape time."""

    def __init__(self, exposition: Exposition) -> None:
        self.exposition = exposition

    def collect(self) -> Iterator[Metric]:
        runs, metrics = self.exposition.runs, self.exposition.metrics
        by_status = GaugeMetricFamily("runsteer_runs", "Runs by status.", labels=["status"])
        for status in RUN_STATUSES:
            by_status.add_metric([status], sum(1 for run in runs.runs.values() if run.status == status))
        yield by_status
        labels = ["run_id", "run_name", "branch"]
        step = GaugeMetricFamily("runsteer_step", "Latest step reported.", labels=labels)
        heartbeat = GaugeMetricFamily(
            "runsteer_last_heartbeat_timestamp_seconds",
            "Unix time of the run's last heartbeat.",
            labels=["run_id", "run_name"],
        )
        families = {key: GaugeMetricFamily(name, text, labels=labels) for key, (name, text) in TRAINING_GAUGES.items()}
        layered = {
            prefix: GaugeMetricFamily(name, text, labels=[*labels, label])
            for prefix, (name, label, text) in LAYERED_GAUGES.items()
        }
        visible = self.exposition.visible_runs()
        self.exposition.forget_hidden(visible)
        for (run_id, branch), values in metrics.latest.items():
            run = visible.get(run_id)
            if run is None:
                continue
            label_values = [run_id, run.name, branch]
            for key, family in families.items():
                if key == "nonfinite":
                    family.add_metric(label_values, 1.0 if metrics.latest_nonfinite.get((run_id, branch)) else 0.0)
                elif key in values:
                    family.add_metric(label_values, values[key])
            for prefix, family in layered.items():
                for layer, value in _layers(values, prefix):
                    family.add_metric([*label_values, layer], value)
        for run in visible.values():
            step.add_metric([run.run_id, run.name, run.branch], run.step)
            if run.last_heartbeat is not None:
                heartbeat.add_metric([run.run_id, run.name], run.last_heartbeat)
        step_times = HistogramMetricFamily(
            "runsteer_step_duration_seconds",
            "Training step time reported by the trainer.",
            labels=["run_id", "run_name"],
        )
        for run_id, histogram in self.exposition.step_times.items():
            run = visible.get(run_id)
            if run is not None:
                step_times.add_metric([run_id, run.name], histogram.buckets(), histogram.total_s)
        yield step_times
        yield step
        yield heartbeat
        yield from families.values()
        yield from layered.values()
        yield CounterMetricFamily(
            "runsteer_metric_values_ingested", "Metric values stored.", value=metrics.values_ingested
        )
        yield CounterMetricFamily(
            "runsteer_store_commits", "Group commits made by the store writer.", value=self.exposition.store.commits
        )


class Exposition:
    """The app's own Prometheus registry and the instruments the server updates."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventLog,
        runs: RunRegistry,
        commands: CommandService,
        metrics: MetricsService,
        broadcaster: Broadcaster,
        finished_run_ttl_s: float,
    ) -> None:
        self.store, self.runs, self.metrics, self.broadcaster = store, runs, metrics, broadcaster
        self.finished_run_ttl_s = finished_run_ttl_s
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "runsteer_http_requests", "HTTP requests served.", ["method", "route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "runsteer_http_request_duration_seconds",
            "Time to answer an HTTP request (long-polls included).",
            ["route"],
            registry=self.registry,
        )
        self.commands = Counter(
            "runsteer_commands", "Commands by type and status reached.", ["type", "status"], registry=self.registry
        )
        self.command_latency = Histogram(
            "runsteer_command_latency_seconds",
            "Time from a command's submission to its final status.",
            ["type", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.websocket_clients = Gauge(
            "runsteer_websocket_clients", "Connected websocket clients.", registry=self.registry
        )
        self.websocket_clients.set_function(lambda: len(broadcaster.subscribers))
        self.websocket_dropped = Counter(
            "runsteer_websocket_clients_dropped",
            "Websocket clients closed for reading too slowly.",
            registry=self.registry,
        )
        self._request_counts: dict[tuple[str, str, int], Counter] = {}
        self._request_timers: dict[str, Histogram] = {}
        self.step_times: dict[str, StepTimes] = {}
        self.registry.register(_LiveState(self))
        commands.listeners.append(self._count_command)
        events.listeners.append(self._observe_steps)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and time it; each label set's children are looked up once (`labels()`
        validates and locks, which cost more than the count itself on the hot routes)."""
        counter = self._request_counts.get((method, route, status))
        if counter is None:
            counter = self._request_counts[(method, route, status)] = self.requests.labels(method, route, str(status))
        counter.inc()
        timer = self._request_timers.get(route)
        if timer is None:
            timer = self._request_timers[route] = self.request_seconds.labels(route)
        timer.observe(seconds)

    def visible_runs(self) -> dict[str, RunInfo]:
        """Runs still shown: live ones, and ended or lost ones for `finished_run_ttl_s` after they ended."""
        now = time.time()
        return {
            run_id: run
            for run_id, run in self.runs.runs.items()
            if run.status not in ("finished", "failed", "lost")
            or now - self.runs.status_changed_at.get(run_id, now) <= self.finished_run_ttl_s
        }

    def forget_hidden(self, visible: dict[str, RunInfo]) -> None:
        """Drop the latest values and step-time histograms of runs no longer shown, so that the memory they hold
        stays bounded however many runs a long-lived server has seen (a run that comes back fills them again)."""
        metrics = self.metrics
        for key in [key for key in metrics.latest if key[0] not in visible]:
            del metrics.latest[key]
            metrics.latest_nonfinite.pop(key, None)
        for run_id in [run_id for run_id in self.step_times if run_id not in visible]:
            del self.step_times[run_id]

    def _observe_steps(self, event: Event) -> None:
        if isinstance(event, MetricsEvent):
            for sample in event.samples:
                step_time_ms = sample.values.get("step_time_ms")
                if step_time_ms is not None:
                    self.step_times.setdefault(event.run_id, StepTimes()).observe(step_time_ms / 1000.0)

    def _count_command(self, record: CommandRecord, previous: CommandRecord | None) -> None:
        if previous is not None and previous.status == record.status:
            return
        self.commands.labels(record.command.type, record.status).inc()
        if record.finished:
            self.command_latency.labels(record.command.type, record.status).observe(
                record.updated_at - record.created_at
            )

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
