"""Catching a non-finite loss without waiting for the device on every step.

Term values reach the host only when the metric logger flushes (about once a second); the guard reads
those rows, and at the first non-finite term names it, the step, and the likely cause.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Any

from kd_core.engine.errors import TrainingError

HISTORY = 20  # finite values kept per term, to tell divergence from a term that cannot be computed
GROWTH = 10.0  # a term this many times larger than its recent minimum was diverging


class NonFiniteGuard:
    def __init__(self) -> None:
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HISTORY))
        self.phase = ""
        self.lr = 0.0
        self.weights: dict[str, float] = {}

    def start_phase(self, phase: str, lr: float, weights: dict[str, float]) -> None:
        self.phase, self.lr, self.weights = phase, lr, weights
        self.history.clear()

    def check(self, rows: list[dict[str, Any]]) -> None:
        """Raise :class:`TrainingError` at the first non-finite loss value in ``rows``."""
        for row in rows:
            key = row["key"]
            if not key.startswith("loss/") or row["phase"] != self.phase:
                continue
            if math.isfinite(row["value"]):
                self.history[key].append(row["value"])
                continue
            same_step = {r["key"]: r["value"] for r in rows if r["phase"] == self.phase and r["step"] == row["step"] and r["key"].startswith("loss/")}
            raise TrainingError(self.explain(row, same_step))

    def explain(self, row: dict[str, Any], same_step: dict[str, float]) -> str:
        bad = [k.removeprefix("loss/") for k, v in same_step.items() if k != "loss/total" and not math.isfinite(v)]
        where = f"at {self.phase} epoch {row['epoch'] + 1}, step {row['step']}"
        lr_fix = f"lower {self.phase}.optimizer.lr (now {self.lr:g})"
        if not bad:
            return f"the total loss became {row['value']} {where} although every term was finite: the weighted sum overflowed; lower the recipe weights or {lr_fix}"
        terms = [k for k in same_step if k != "loss/total"]
        if len(bad) == len(terms) > 1:
            heaviest = max(self.weights, key=self.weights.get) if self.weights else "?"
            return (f"every loss term became non-finite at once ({where.removeprefix('at ')}): the model's outputs are no longer finite, so "
                    f"training diverged; {lr_fix} or the recipe weights (largest: {heaviest} {self.weights.get(heaviest, 0):g})")
        name = bad[0]
        value = same_step[f"loss/{name}"]
        seen = self.history.get(f"loss/{name}")
        if not seen:
            return (f"loss term '{name}' was {value} from its first logged step ({where}), so its inputs, not the learning rate, are the "
                    f"likely cause: check the term's parameters and that the batch and features suit it")
        low, last = min(seen), seen[-1]
        if last > GROWTH * max(low, 1e-12):
            return (f"loss term '{name}' grew from {low:.4g} to {last:.4g} and then became {value} {where}: the optimisation diverged; "
                    f"{lr_fix} or the term's weight (now {self.weights.get(name, 0):g})")
        return (f"loss term '{name}' became {value} {where} right after finite values (last {last:.4g}): a numerical edge of that term "
                f"rather than divergence; check its parameters, or lower its weight (now {self.weights.get(name, 0):g})")
