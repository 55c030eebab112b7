"""Parameter counts of the model zoo, for the New-experiment form's architecture labels and size summary.

A count depends only on the architecture and the input shape (classes, channels, image size). Building the whole
zoo to count it took ~3.5 s on the first view of New experiment in a server process (meta-device builds still
import torch._dynamo and timm and run every initialiser's decomposition; bench/dashboard.py, page section), so
the counts for the built-in datasets' shapes are shipped in ``param_counts.json``, written by

    .venv/bin/python -m ui.param_counts

and checked against fresh builds by tests/test_ui_param_counts.py.  Any other shape (an image size set in the
form) or an architecture the table lacks is built on the meta device once per process, as before.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TABLE_FILE = Path(__file__).with_name("param_counts.json")


def shape_key(num_classes: int, in_channels: int, image_size: int) -> str:
    return f"{int(num_classes)}x{int(in_channels)}x{int(image_size)}"


@functools.lru_cache(maxsize=1)
def table() -> dict[str, dict[str, int | None]]:
    """{shape key: {arch: count or None}} from ``param_counts.json`` ({} if it is missing or unreadable)."""
    try:
        counts = json.loads(TABLE_FILE.read_text())["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return counts if isinstance(counts, dict) else {}


@functools.lru_cache(maxsize=1024)
def built_count(arch: str, num_classes: int, in_channels: int, image_size: int) -> int | None:
    """Build ``arch`` on the meta device (shapes only, no memory) and count; None if it cannot be built for it."""
    import torch

    from kd_core.models import MODELS, count_parameters, create_model

    if arch not in MODELS:
        return None
    try:
        with torch.device("meta"):
            return count_parameters(create_model(arch, num_classes, in_channels, image_size))
    except Exception:  # noqa: BLE001 - an input too small for the net: the config check says so at launch
        return None


def param_count(arch: str, num_classes: int, in_channels: int, image_size: int) -> int | None:
    """``arch``'s parameter count for this input shape (None: unknown arch, or it cannot take these images)."""
    known = table().get(shape_key(num_classes, in_channels, image_size), {})
    if arch in known:
        return known[arch]
    return built_count(arch, int(num_classes), int(in_channels), int(image_size))


def shipped_shapes() -> list[tuple[int, int, int]]:
    """The built-in datasets' shapes at their own image size (what the form shows unless a size is set)."""
    from kd_core.data import DATASETS

    return sorted({((info.num_classes or 10), info.in_channels, int(info.image_size)) for info in DATASETS.values()})


def build_table() -> dict[str, dict[str, int | None]]:
    from kd_core.models import MODELS

    return {shape_key(*shape): {arch: built_count(arch, *shape) for arch in sorted(MODELS)} for shape in shipped_shapes()}


if __name__ == "__main__":
    counts = build_table()
    TABLE_FILE.write_text(json.dumps({"about": "written by `python -m ui.param_counts`; see ui/param_counts.py",
                                      "counts": counts}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE_FILE}: {sum(len(v) for v in counts.values())} counts for {len(counts)} shapes")
