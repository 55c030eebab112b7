"""Small text renderings shared by the pages: status badges, recipe strings, durations."""

from __future__ import annotations

from typing import Any

from kd_core.runner import ACTIVE_STATUSES

# colour and Material icon of each status: icons ship with Streamlit, so they render without an emoji font
STATUS_STYLE = {
    "queued": ("violet", "schedule"),
    "starting": ("orange", "hourglass_top"),
    "running": ("blue", "sync"),
    "cancelling": ("orange", "stop_circle"),
    "completed": ("green", "check_circle"),
    "failed": ("red", "error"),
    "cancelled": ("gray", "cancel"),
}
STATUSES = list(STATUS_STYLE)
STATUS_HELP = (
    "queued: waiting for a free slot · starting: worker launching · running: training · "
    "cancelling: stopping after a checkpoint · completed · failed (see the run's log) · cancelled"
)
_SHORT = {"temperature": "T", "alpha": "α", "beta": "β", "gamma": "γ"}


def status_badge(status: str) -> str:
    """The status as a coloured Markdown badge with its icon, e.g. ``:blue-badge[:material/sync: running]``."""
    color, icon = STATUS_STYLE.get(status, ("gray", "help"))
    return f":{color}-badge[:material/{icon}: {status}]"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def recipe_text(recipe: list[dict[str, Any]] | None) -> str:
    """``0.1·ce + 0.9·kd(T=4)`` from a config's recipe list: parameters at their default left out, the temperature
    always shown (stored configs write every default out, which would bury the parameters that were chosen)."""
    from ui.form_fields import loss_params

    parts = []
    for term in recipe or []:
        defaults = loss_params(term.get("loss"))
        params = {k: v for k, v in (term.get("params") or {}).items()
                  if v is not None and (k == "temperature" or k not in defaults or defaults[k] != v)}
        inner = ", ".join(f"{_SHORT.get(k, k)}={_num(v)}" for k, v in params.items())
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
    """Overall progress 0..1 over all phases (teacher, student, baseline, analysis), from RunRecord.progress."""
    if status == "completed":
        return 1.0
    p = progress or {}
    if not p:
        return 0.0 if status in ("queued", "starting") else None
    try:
        phases = max(int(p.get("phases") or 0), 1)
        index = max(int(p.get("phase_index") or 1), 1)  # 1-based
        steps = int(p.get("steps") or 0)
        step = int(p.get("step") or 0)
    except (TypeError, ValueError):
        return None
    within = min(step / steps, 1.0) if steps > 0 else 0.0
    return min(((index - 1) + within) / phases, 1.0)


def progress_text(status: str, progress: dict[str, Any] | None) -> str:
    """Where a run stands, in one line. A run that is not active says how it ended, never a stale epoch or ETA."""
    p = progress or {}
    if status not in ACTIVE_STATUSES or p.get("finished"):
        return f"finished: {p['ended']}" if p.get("ended") else f"finished: {status}"
    if status == "queued":
        return "waiting for a free worker slot"
    if not p:
        return "the worker is starting"
    where = f"{p.get('phase', '?')} (phase {p.get('phase_index', '?')}/{p.get('phases', '?')})"
    if p.get("phase") == "analysis":
        parts = [where, str(p.get("stage") or "starting")]
    else:
        parts = [where, f"epoch {p.get('epoch', '?')}/{p.get('epochs', '?')}", f"step {p.get('step', '?')}/{p.get('steps', '?')}"]
        if p.get("images_per_s"):
            parts.append(f"{p['images_per_s']:,.0f} images/s")
    eta = eta_text(p)
    return " · ".join(parts + ([eta] if eta else []))


def eta_text(progress: dict[str, Any]) -> str:
    """"about 3m 10s left", saying when the end-of-run analysis is not in it (no earlier run measured it)."""
    eta = progress.get("eta_s")
    if not isinstance(eta, (int, float)):
        return ""
    text = f"about {duration_text(eta)} left"
    return text if progress.get("eta_includes_analysis", True) else text + " (training only: the end-of-run analysis comes on top)"


def trained_seconds(summary: dict[str, Any] | None, progress: dict[str, Any] | None) -> float | None:
    """Time actually trained, summed across resumes: final in the summary, live in the progress."""
    for source in (summary or {}, progress or {}):
        value = source.get("trained_s")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def count_text(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)
