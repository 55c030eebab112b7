"""The reconcile loop that keeps the queue moving when nobody is looking.

A worker killed with -9 cannot report its own death, and the next queued run only starts when something
calls :func:`kd_core.runner.reconcile`. The dashboard server runs one :class:`Supervisor` thread per
process (not per browser session), and ``python -m kd_core supervise`` runs the same loop headless on a
server without a dashboard. Several supervisors on one database are safe: claims are atomic.
"""

from __future__ import annotations

import threading
import time

from kd_core.runner.base import positive_env, warn

# with the 10 s heartbeat staleness, a killed worker is noticed within about 12 s
DEFAULT_INTERVAL_S = 2.0


def supervise_interval() -> float:
    return positive_env("DISTILLERY_SUPERVISE_INTERVAL_S", DEFAULT_INTERVAL_S, float, "seconds between reconcile passes")


class Supervisor(threading.Thread):
    """Calls ``reconcile`` on one database every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, url: str, interval: float | None = None) -> None:
        super().__init__(name="distillery-supervisor", daemon=True)
        self.url = url
        self.interval = interval or supervise_interval()
        self.passes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        from storage import Store

        from kd_core.runner import reconcile

        store = Store(self.url)
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                reconcile(store)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a database hiccup
                warn(f"supervisor: reconcile failed: {exc.__class__.__name__}: {exc}")
            self.passes += 1
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))
        store.dispose()

    def stop(self) -> None:
        self._stop_event.set()


_running: dict[str, Supervisor] = {}
_lock = threading.Lock()


def ensure_supervisor(url: str) -> Supervisor:
    """The process's supervisor for ``url``, started on the first call (cheap on every later call)."""
    with _lock:
        supervisor = _running.get(url)
        if supervisor is None or not supervisor.is_alive():
            supervisor = _running[url] = Supervisor(url)
            supervisor.start()
        return supervisor
