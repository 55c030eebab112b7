"""The GPU-readiness bench runs end to end on CPU at a tiny size (the real figures come from a GPU session)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_prints_every_knob_against_the_plain_loop() -> None:
    out = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    rows = {m[1].strip(): (float(m[2]), float(m[4])) for m in re.finditer(r"^(\S.*?)\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, re.M)}
    expected = {"plain PyTorch KD loop, fp32 (baseline)", "kd_core KD, defaults", "kd_core DKD, defaults", "kd_core KD, precision fp32",
                "kd_core KD, precision bf16", "kd_core KD, channels_last on", "kd_core KD, channels_last off",
                "kd_core KD, teacher every step (cache off)", "kd_core KD, compile on"}
    assert set(rows) == expected, out
    assert rows["plain PyTorch KD loop, fp32 (baseline)"][1] == 1.0
    assert all(rate > 0 for rate, _ in rows.values())
