"""Small text renderings shared by the pages: status badges, recipe strings, durations."""

from __future__ import annotations

from typing import Any

STATUS_BADGE = {
    "queued": "🟡 queued",
    "starting": "🟠 starting",
    "running": "🔵 running",
    "cancelling": "🟠 cancelling",
    "completed": "🟢 completed",
    "failed": "🔴 failed",
    "cancelled": "⚪ cancelled",
}
STATUS_HELP = (
    "queued: waiting for a free slot · starting: worker launching · running: training · "
    "cancelling: stopping after a checkpoint · completed · failed (see the run's log) · cancelled"
)
_SHORT = {"temperature": "T", "alpha": "α", "beta": "β", "gamma": "γ"}


def status_badge(status: str) -> str:
    return STATUS_BADGE.get(status, f"⚫ {status}")


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def recipe_text(recipe: list[dict[str, Any]] | None) -> str:
    """``0.1·ce + 0.9·kd(T=4)`` from a config's recipe list."""
    parts = []
    for term in recipe or []:
        params = term.get("params") or {}
        inner = ", ".join(f"{_SHORT.get(k, k)}={_num(v)}" for k, v in params.items() if v is not None)
        weight = term.get("weight", 1.0)
        text = f"{_num(float(weight))}·{term.get('loss', '?')}" + (f"({inner})" if inner else "")
        if term.get("warmup_epochs"):
            text += f"↗{term['warmup_epochs']}"
        parts.append(text)
    return " + ".join(parts)


def duration_text(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def progress_fraction(status: str, progress: dict[str, Any] | None) -> float | None:
    """Overall progress 0..1 over all phases (teacher, student, baseline), from RunRecord.progress."""
    if status == "completed":
        return 1.0
    p = progress or {}
    try:
        phases = max(int(p.get("phases") or 0), 1)
        index = max(int(p.get("phase_index") or 1), 1)  # 1-based
        steps = int(p.get("steps") or 0)
        step = int(p.get("step") or 0)
    except (TypeError, ValueError):
        return None
    if not p:
        return 0.0 if status in ("queued", "starting") else None
    within = min(step / steps, 1.0) if steps > 0 else 0.0
    return min(((index - 1) + within) / phases, 1.0)


def count_text(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)
