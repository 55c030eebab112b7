"""``dataset.loader: auto``: resident when the uint8 images fit the memory budget, else streamed from disk."""

from __future__ import annotations

import torch

from kd_core.data.folder import FolderIndex, index_folder
from kd_core.data.registry import DatasetInfo


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def choose_loader(info: DatasetInfo, root: str, image_size: int | None, requested: str,
                  device: torch.device) -> tuple[str, str, FolderIndex | None]:
    """(``resident`` or ``streaming``, why, the folder's index when it was read to decide)."""
    from kd_core.settings import resident_budget_bytes

    if not info.streamable:
        if requested == "streaming":
            raise ValueError(f"dataset.loader: {info.name} is not read from image files, so it cannot be streamed; "
                             "use resident or auto (an imagefolder dataset can be streamed)")
        return "resident", f"{info.name} is loaded whole and kept on the {device.type} as uint8", None
    index = index_folder(root)
    size = image_size or info.image_size
    need = len(index) * 3 * size * size
    if requested != "auto":
        return requested, f"dataset.loader: {requested} ({len(index):,} images, {_mb(need)} as uint8 at {size}px)", index
    budget = resident_budget_bytes(device)
    if need <= budget:
        return "resident", f"auto: {len(index):,} images take {_mb(need)} as uint8 at {size}px, within the {_mb(budget)} budget", index
    return "streaming", f"auto: {len(index):,} images would take {_mb(need)} as uint8 at {size}px, over the {_mb(budget)} budget", index
