"""Where training reports to. ``kd_core`` knows only this protocol; ``storage.RunSink`` implements it."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import torch


class MetricsSink(Protocol):
    def log_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Store metric rows: dicts with phase, step, epoch, key, value, time."""

    def update_progress(self, progress: dict[str, Any]) -> None:
        """Replace the run's progress (phase, epoch, step, ETA...); doubles as a heartbeat."""

    def update_summary(self, values: dict[str, Any]) -> None:
        """Merge values into the run's summary."""

    def add_artifact(self, kind: str, path: str, meta: dict[str, Any]) -> None:
        """Record a file the run produced."""

    def discard_metrics_after(self, phase: str, step: int) -> None:
        """Drop rows of ``phase`` past ``step`` (resuming from a checkpoint taken at ``step``)."""


class MemorySink:
    """Keeps everything in lists: for using ``kd_core`` as a plain library, and for benchmarks."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.artifacts: list[tuple[str, str, dict[str, Any]]] = []

    def log_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def update_progress(self, progress: dict[str, Any]) -> None:
        self.progress = progress

    def update_summary(self, values: dict[str, Any]) -> None:
        self.summary.update(values)

    def add_artifact(self, kind: str, path: str, meta: dict[str, Any]) -> None:
        self.artifacts.append((kind, path, meta))

    def discard_metrics_after(self, phase: str, step: int) -> None:
        self.rows = [r for r in self.rows if r["phase"] != phase or r["step"] <= step]

    def series(self, key: str, phase: str | None = None) -> list[float]:
        return [r["value"] for r in self.rows if r["key"] == key and (phase is None or r["phase"] == phase)]


class MetricLogger:
    """Buffers metric rows and hands them to the sink at most once per ``flush_interval_s``.

    Values may be 0-d tensors: they are converted in one batch at flush time, so a GPU run syncs once a
    second rather than once per step.
    """

    def __init__(self, sink: MetricsSink, flush_interval_s: float = 1.0, on_flush: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self.on_flush = on_flush  # sees every flushed batch after the sink stored it (the non-finite check)
        self._pending: list[tuple[str, int, int, str, float | torch.Tensor, float]] = []
        self._last_flush = time.monotonic()

    def log(self, phase: str, step: int, epoch: int, values: dict[str, float | torch.Tensor]) -> None:
        now = time.time()
        self._pending.extend((phase, step, epoch, key, value, now) for key, value in values.items())
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        tensors = [v for *_, v, _ in self._pending if isinstance(v, torch.Tensor)]
        as_floats = iter(torch.stack([t.detach().float() for t in tensors]).tolist()) if tensors else iter(())
        rows = [
            {"phase": p, "step": s, "epoch": e, "key": k, "value": next(as_floats) if isinstance(v, torch.Tensor) else float(v), "time": t}
            for p, s, e, k, v, t in self._pending
        ]
        self._pending.clear()
        self.sink.log_metrics(rows)
        if self.on_flush is not None:
            self.on_flush(rows)


class NullSink:
    """Drops everything: the sink of every rank but rank 0 in a run on several devices."""

    def log_metrics(self, rows: list[dict[str, Any]]) -> None:
        pass

    def update_progress(self, progress: dict[str, Any]) -> None:
        pass

    def update_summary(self, values: dict[str, Any]) -> None:
        pass

    def add_artifact(self, kind: str, path: str, meta: dict[str, Any]) -> None:
        pass

    def discard_metrics_after(self, phase: str, step: int) -> None:
        pass
