"""Progress reports: where the run stands and a smoothed ETA that includes the end-of-run analysis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kd_core.engine.phases import Phase, Progress
from kd_core.sink import MetricsSink

REPORT_INTERVAL_S = 2.0
RATE_SMOOTHING = 0.2  # weight of the newest throughput measurement: the ETA follows trends, not jitter


class ProgressReporter:
    """Writes ``progress`` (which doubles as a heartbeat) at most every couple of seconds.

    The throughput behind the ETA is an exponential moving average of the images/s measured between
    reports. The analysis after training is counted with ``analysis_estimate_s`` (measured on earlier
    runs with the same analysis settings); without one the report says that the ETA excludes it.
    """

    def __init__(self, sink: MetricsSink, phases: list[Phase], train_size: int, analysis: bool, analysis_estimate_s: float | None) -> None:
        self.sink = sink
        self.phases = phases
        self.train_size = train_size
        self.analysis = analysis
        self.analysis_estimate_s = analysis_estimate_s if analysis else None
        self.images_seen = 0
        self._rate: float | None = None
        self._last_time = time.monotonic()
        self._last_images = 0
        self._analysis_started = 0.0

    @property
    def total_phases(self) -> int:
        return len(self.phases) + int(self.analysis)

    def _measure(self, now: float) -> float | None:
        elapsed = now - self._last_time
        if elapsed > 0 and self.images_seen > self._last_images:
            rate = (self.images_seen - self._last_images) / elapsed
            self._rate = rate if self._rate is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self._rate
        self._last_time, self._last_images = now, self.images_seen
        return self._rate

    def start_clock(self) -> None:
        """Measure throughput from now on (a phase's set-up, e.g. caching teacher outputs, is not training speed)."""
        self._last_time, self._last_images = time.monotonic(), self.images_seen

    def training(self, phase: Phase, progress: Progress, steps_per_epoch: int, extra: Callable[[], dict[str, Any]],
                 force: bool = False) -> None:
        """Progress for the dashboard, at most every ``REPORT_INTERVAL_S`` (``extra`` is only called then: this runs
        after every step)."""
        now = time.monotonic()
        if not force and now - self._last_time < REPORT_INTERVAL_S:
            return
        rate = self._measure(now)
        cfg = phase.model_config
        remaining = (steps_per_epoch * cfg.epochs - progress.step) * cfg.batch_size
        remaining += sum(later.model_config.epochs * self.train_size for later in self.phases[progress.phase_index + 1 :])
        eta = remaining / rate + (self.analysis_estimate_s or 0.0) if rate else None
        self.sink.update_progress({
            "phase": phase.name, "phase_index": progress.phase_index + 1, "phases": self.total_phases,
            "epoch": progress.epoch + 1, "epochs": cfg.epochs, "step": progress.step, "steps": steps_per_epoch * cfg.epochs,
            "images_per_s": round(rate, 1) if rate else None, "eta_s": round(eta, 1) if eta is not None else None,
            "eta_includes_analysis": not self.analysis or self.analysis_estimate_s is not None, **extra(),
        })

    def analysis_stage(self, stage: str) -> None:
        """A new stage of the end-of-run analysis began ("t-SNE 2/3")."""
        now = time.monotonic()
        if not self._analysis_started:
            self._analysis_started = now
        left = None if self.analysis_estimate_s is None else max(0.0, self.analysis_estimate_s - (now - self._analysis_started))
        self.sink.update_progress({
            "phase": "analysis", "phase_index": self.total_phases, "phases": self.total_phases, "stage": stage,
            "eta_s": None if left is None else round(left, 1), "eta_includes_analysis": left is not None,
        })


def progress_line(progress: dict[str, Any]) -> str:
    """One line a person reads: the phase and where it stands (an analysis stage, or epoch and step), and the ETA."""
    if not progress:
        return "not started"
    if progress.get("finished"):
        return f"finished: {progress.get('ended', '')}".rstrip(": ")
    head = f"{progress.get('phase')} ({progress.get('phase_index')}/{progress.get('phases')})"
    if progress.get("phase") == "analysis":
        where = f"analysis: {progress.get('stage', '')}"
        head = f"{where} ({progress.get('phase_index')}/{progress.get('phases')})"
    else:
        head += f", epoch {progress.get('epoch')}/{progress.get('epochs')}, step {progress.get('step')}/{progress.get('steps')}"
        if progress.get("images_per_s"):
            head += f", {progress['images_per_s']:.0f} img/s"
    eta = progress.get("eta_s")
    if isinstance(eta, (int, float)):
        head += f", ETA {eta:.0f} s" + ("" if progress.get("eta_includes_analysis", True) else " (analysis not included)")
    return head

