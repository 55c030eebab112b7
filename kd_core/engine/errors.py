"""Why a run stops early."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, incompatible teacher...). The message says why and what to do."""


class CheckpointMismatch(TrainingError):
    """A checkpoint that is not provably this run's; resuming from it is refused and nothing is overwritten."""


class StopRequested(Exception):
    """Raised after a requested stop has been checkpointed."""
