"""The adapter through which kd_core reports a run: its metrics, progress, summary and files."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.store import Store


class RunSink:
    """Adapts ``(Store, run_id)`` to the metrics-sink protocol used by kd_core.

    kd_core only knows this duck-typed interface, which keeps ``storage`` free
    of torch and kd_core free of SQL.
    """

    def __init__(self, store: Store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def log_metrics(self, rows: list[dict]) -> None:
        """Append a batch of metric rows (phase, step, epoch, key, value, time)."""
        self.store.append_metrics(self.run_id, rows)

    def update_progress(self, progress: dict) -> None:
        """Heartbeat and replace the run's progress dict."""
        self.store.heartbeat(self.run_id, progress)

    def update_summary(self, values: dict) -> None:
        """Merge values into the run's summary."""
        self.store.merge_summary(self.run_id, values)

    def add_artifact(self, kind: str, path: str, meta: dict) -> None:
        """Record a file the run produced."""
        self.store.add_artifact(self.run_id, kind, path, meta)

    def discard_metrics_after(self, phase: str, step: int) -> None:
        """Drop rows of ``phase`` past ``step`` (resuming from a checkpoint taken at ``step``)."""
        self.store.delete_metrics_after(self.run_id, phase, step)
