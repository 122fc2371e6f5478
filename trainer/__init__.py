"""Everything inside the training process: the `Steer` hook, appliers, metrics, checkpoints, the built-in run."""

from trainer.appliers import APPLIERS, CommandRejected
from trainer.io import IOConfig, Transport
from trainer.schedule import Schedule
from trainer.steer import Steer, SteerConfig, StopTraining

__all__ = ["APPLIERS", "CommandRejected", "IOConfig", "Schedule", "Steer", "SteerConfig", "StopTraining", "Transport"]
