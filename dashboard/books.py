"""Command records and alerts of a run, kept current by fetching only what may have changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.client import Client
from protocols.commands import Command, CommandRecord
from protocols.constants import OPEN_COMMAND_STATUSES
from protocols.events import AlertEvent

STATUS_ICONS = {
    "queued": ":material/schedule:",
    "pending_approval": ":material/front_hand:",
    "delivered": ":material/send:",
    "applied": ":green[:material/check_circle:]",
    "rejected": ":red[:material/block:]",
    "failed": ":red[:material/error:]",
}
"""A Material icon per command status, for Markdown."""

HIDDEN_EFFECTIVE = frozenset({"path", "sha256"})
"""Effective values too long to read in a line; the full record is in the history."""


def describe_command(command: Command) -> str:
    """The command in a few words: its type and the fields it sets, e.g. `set_hparams lr=0.001`."""
    fields = command.model_dump(exclude_defaults=True, exclude={"type"})
    if not fields:
        return command.type
    shown = ", ".join(f"{key}={_short(value)}" for key, value in fields.items())
    return f"{command.type} {shown}"


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_short(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_short(item) for item in value) + ")"
    return str(value)


def lifecycle(record: CommandRecord) -> str:
    """Where a command stands, in words: `applied at step 120 (lr=0.001)`, `rejected: <reason>`, ..."""
    if record.status == "applied":
        shown = {
            key: value
            for key, value in (record.effective or {}).items()
            if isinstance(value, int | float | str | bool) and key not in HIDDEN_EFFECTIVE
        }
        effective = f" ({_short(shown)[1:-1]})" if shown else ""
        return f"applied at step {record.applied_step}{effective}"
    if record.status in ("rejected", "failed"):
        return f"{record.status}: {record.message or 'no reason given'}"
    words = {
        "queued": "queued, waiting for the trainer",
        "pending_approval": "waiting for approval",
        "delivered": "delivered, applying at the next step",
    }
    return words[record.status]


@dataclass
class CommandBook:
    """A run's command records by id; each refresh asks only from the oldest still-open `seq` on."""

    records: dict[str, CommandRecord] = field(default_factory=dict)

    def watermark(self) -> int:
        """The `seq` after which records may be new or changed."""
        open_seqs = [record.seq for record in self.records.values() if record.status in OPEN_COMMAND_STATUSES]
        if open_seqs:
            return min(open_seqs) - 1
        return max((record.seq for record in self.records.values()), default=0)

    def refresh(self, client: Client, run_id: str) -> None:
        """Fetch new and changed records (an approved command returns under a new `seq`)."""
        while True:
            fetched = client.list_commands(run_id, after_seq=self.watermark(), limit=1000)
            for record in fetched:
                self.records[record.id] = record
            if len(fetched) < 1000:
                return

    def newest_first(self) -> list[CommandRecord]:
        """Every record, newest `seq` first."""
        return sorted(self.records.values(), key=lambda record: record.seq, reverse=True)

    def pending(self) -> list[CommandRecord]:
        """Commands held for a person's approval, oldest first."""
        return sorted(
            (record for record in self.records.values() if record.status == "pending_approval"),
            key=lambda record: record.seq,
        )


@dataclass
class AlertBook:
    """A run's alerts, fetched after the last event id seen."""

    alerts: list[AlertEvent] = field(default_factory=list)
    cursor: int = 0

    def refresh(self, client: Client, run_id: str) -> None:
        """Fetch alerts raised since the last refresh."""
        for event in client.list_events(run_id, after=self.cursor, kinds=["alert"]):
            self.cursor = max(self.cursor, event.event_id)
            if isinstance(event, AlertEvent):
                self.alerts.append(event)

    def newest_first(self) -> list[AlertEvent]:
        """Every alert, newest first."""
        return list(reversed(self.alerts))
