"""Where things live on disk, and which folders a path typed into the dashboard may point into.

Every location can be moved with an environment variable; relative values are relative to the current
working directory (as the default SQLite URL is), so ``make run`` keeps everything under the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def data_home() -> Path:
    """The project's data folder: ``$DISTILLERY_HOME``, default ``./distillery-data``."""
    return Path(os.environ.get("DISTILLERY_HOME", "distillery-data")).expanduser()


def default_dataset_root() -> str:
    """Where datasets are downloaded or looked for unless a config says otherwise."""
    return str(data_home() / "datasets")


def artifacts_root() -> Path:
    """Checkpoints and reports of every run; on a cluster, a path every node sees (``DISTILLERY_ARTIFACTS``)."""
    return Path(os.environ.get("DISTILLERY_ARTIFACTS", data_home() / "artifacts")).expanduser()


def soft_labels_root() -> Path:
    """Stored teacher soft labels, shared by every run with the same teacher and data (``DISTILLERY_SOFT_LABELS``)."""
    return Path(os.environ.get("DISTILLERY_SOFT_LABELS", data_home() / "soft_labels")).expanduser()


def run_dir(run_uid: str) -> Path:
    """A run's folder, keyed by its identity (unique across databases), never by its reusable number."""
    if not run_uid or not run_uid.isalnum():
        raise ValueError(f"a run identity is a hex string, got {run_uid!r}")
    return (artifacts_root() / f"run-{run_uid}").resolve()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_budget_bytes(device: "torch.device | None" = None) -> int:
    """How many bytes of uint8 images ``dataset.loader: auto`` keeps resident before it streams from disk.

    ``$DISTILLERY_RESIDENT_MAX_MB`` when set; else a quarter of the available RAM (and of the free GPU
    memory when training on CUDA), leaving room for models, activations and a second run.
    """
    if os.environ.get("DISTILLERY_RESIDENT_MAX_MB"):
        return int(float(os.environ["DISTILLERY_RESIDENT_MAX_MB"]) * 2**20)
    budget = _available_ram() // 4
    if device is not None and device.type == "cuda":
        import torch

        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return budget


# --------------------------------------------------------------------------- paths from a form


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute and normalised *lexically*: no file is touched."""
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(str(path)))))


def allowed_roots() -> list[Path]:
    """Folders a path typed into the dashboard may point into: the data folder and ``DISTILLERY_ALLOWED_ROOTS``."""
    roots = [_absolute(data_home())]
    for part in os.environ.get("DISTILLERY_ALLOWED_ROOTS", "").split(os.pathsep):
        if part.strip():
            roots.append(_absolute(part.strip()))
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def path_error(field: str, path: str | Path) -> str | None:
    """None when ``path`` lies under an allowed folder, else a message naming ``field`` and the fix.

    The check is lexical first, so a path outside every allowed folder is refused without being opened or
    stat'ed (the answer never reveals whether such a file exists). Only a path that is lexically inside is
    resolved, which catches symbolic links pointing out.
    """
    if not str(path).strip():
        return f"{field}: give a path"
    roots = allowed_roots()
    absolute = _absolute(path)
    if _inside(absolute, roots) and _inside(absolute.resolve(), [r.resolve() for r in roots]):
        return None
    allowed = ", ".join(str(r) for r in roots)
    return (
        f"{field}: {str(path)!r} is outside the folders the dashboard may read ({allowed}); "
        "move it there or add its folder to DISTILLERY_ALLOWED_ROOTS"
    )


def resolve_path(path: str | Path) -> Path:
    """A path made absolute with symbolic links followed (call :func:`path_error` first for form input)."""
    return _absolute(path).resolve()
