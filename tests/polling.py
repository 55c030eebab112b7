"""Waiting for background runs the way the dashboard does: reconcile, then look, until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kd_core.runner import reconcile
from storage import Store


def wait_for(store: Store, what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; on timeout, fail listing every run's status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reconcile(store)
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    statuses = {r.id: (r.status, r.error) for r in store.list_runs(include_hidden=True)}
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; runs: {statuses}")
