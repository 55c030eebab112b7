"""Run one config through the engine on the ranks torchrun started (a test helper, not a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_run.py CONFIG.json OUT_DIR RESULT.json [STOP_AFTER]

Every rank trains; rank 0 writes RESULT.json: the summary, the metric rows its sink received and how
many processes wrote rows. With STOP_AFTER, rank 0 asks to stop after that many steps (as a cancel would).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kd_core.config import validate_config
from kd_core.engine import StopRequested, run_experiment
from kd_core.engine.distributed import end_rank
from kd_core.sink import MemorySink


def main(config_path: str, out_dir: str, result_path: str, stop_after: int | None = None) -> None:
    config = validate_config(json.loads(Path(config_path).read_text()))
    sink = MemorySink()
    steps = [0]

    def stop_requested() -> bool:  # called once per step on every rank; only rank 0 asks
        steps[0] += 1
        return stop_after is not None and os.environ.get("RANK", "0") == "0" and steps[0] >= stop_after

    try:
        summary, stopped = run_experiment(config, sink, out_dir, stop_requested=stop_requested, resume=True), False
    except StopRequested:
        summary, stopped = {}, True
    rank = os.environ.get("RANK", "0")
    # every rank reports how many rows its own sink got: only rank 0's may have any
    Path(f"{result_path}.rank{rank}").write_text(json.dumps({"rows": len(sink.rows), "steps": steps[0]}))
    if rank == "0":
        Path(result_path).write_text(json.dumps({"summary": summary, "rows": sink.rows, "stopped": stopped}))
    end_rank(0)  # as the worker does: no rank exits while another still talks to it, and none through C++ teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
