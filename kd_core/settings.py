"""Where things live on disk. Every path can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

DATA_HOME = Path(os.environ.get("DISTILLERY_HOME", "distillery-data"))


def artifacts_root() -> Path:
    """Checkpoints and reports of every run; on a cluster, a path every node sees (``DISTILLERY_ARTIFACTS``)."""
    return Path(os.environ.get("DISTILLERY_ARTIFACTS", DATA_HOME / "artifacts"))


def run_dir(run_id: int) -> Path:
    return artifacts_root() / f"run-{run_id}"
