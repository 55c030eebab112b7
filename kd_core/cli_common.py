"""What every ``python -m kd_core`` command module shares: the command registry and small output helpers."""

from __future__ import annotations

import argparse
from typing import Any, Callable

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (fn, arguments, help_text)
        return fn

    return wrap


def open_store(args: argparse.Namespace):
    """One Store per CLI call (each new Store would open its own connection pool)."""
    from storage import Store

    if getattr(args, "_store", None) is None:
        args._store = Store(args.db)
    return args._store


def run_id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", type=int, help="the run's id (see `runs`)")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(value: Any) -> str:
    return "" if value is None else f"{value:.2f}"
