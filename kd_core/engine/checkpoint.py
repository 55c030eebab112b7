"""Weights files (safetensors) and the resumable checkpoint, which records whose it is.

``checkpoint.pt`` holds what a resume needs (model, optimizer, scheduler, loss and method state, RNG,
exact step) plus the identity it was written for: the run's uid and the config's fingerprint. A resume
loads it only when both match, so a folder left by another run (another database, a deleted run whose
number was reused) can never be continued as if it were this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_core.engine.errors import CheckpointMismatch

CHECKPOINT = "checkpoint.pt"


def save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def load_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


@dataclass(frozen=True)
class Checkpointer:
    """Writes and verifies ``directory/checkpoint.pt`` for one run."""

    directory: Path
    config_sha: str
    run_uid: str | None = None  # None when kd_core is used as a library without a runs database

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT

    def identity(self) -> dict[str, str | None]:
        return {"run_uid": self.run_uid, "config_sha": self.config_sha}

    def save(self, state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint (a crash mid-write leaves the previous one)."""
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save({**state, "identity": self.identity()}, tmp)
        tmp.replace(self.path)

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The checkpoint's state, None when there is none; :class:`CheckpointMismatch` when it is not ours."""
        if not self.path.exists():
            return None
        # our own file format, but still never unpickle arbitrary objects
        state = torch.load(self.path, map_location=device, weights_only=True)
        self.verify(state.get("identity"))
        return state

    def verify(self, recorded: dict[str, Any] | None) -> None:
        where = f"the checkpoint in {self.directory}"
        refuse = "refusing to resume from it; nothing was overwritten. Rerun the config as a new run instead"
        if recorded is None:
            raise CheckpointMismatch(f"{where} was written before runs recorded their identity, so it cannot be shown to be this run's: {refuse}")
        if self.run_uid is not None and recorded.get("run_uid") != self.run_uid:
            raise CheckpointMismatch(f"{where} belongs to run {recorded.get('run_uid')}, not to this run ({self.run_uid}): {refuse}")
        if recorded.get("config_sha") != self.config_sha:
            raise CheckpointMismatch(f"{where} was written for a different config (fingerprint {str(recorded.get('config_sha'))[:12]}, this run's is {self.config_sha[:12]}): {refuse}")
