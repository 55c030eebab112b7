"""Loading a teacher's weights from where the config's ``teacher.source`` says.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kd_core.models import feature_spec


class TeacherUnavailable(RuntimeError):
    """The teacher's weights cannot be found or do not fit the chosen architecture and dataset."""


RunTeachers = Callable[[int], Path]
"""Maps the id in ``teacher.source: run:<id>`` to that run's trained teacher weights (raises TeacherUnavailable)."""


def run_teachers_in(store: Any) -> RunTeachers:
    """``run:<id>`` lookups in ``store``: the teacher checkpoint that run recorded, wherever it lies.

    Going through the recorded artifact (not a folder name built from the id) is what keeps a run of
    another database, or a deleted run whose number was reused, from ever being taken for this one.
    """

    def lookup(run_id: int) -> Path:
        try:
            store.get_run(run_id)
        except KeyError:
            raise TeacherUnavailable(f"teacher.source: there is no run {run_id} in this database") from None
        for artifact in store.artifacts(run_id, "checkpoint"):
            if artifact.meta.get("model") == "teacher" and artifact.meta.get("which") == "last":
                return Path(artifact.path)
        raise TeacherUnavailable(
            f"teacher.source: run {run_id} has no teacher trained by itself (yet); pick a run whose teacher source was 'train' "
            "and whose teacher phase has finished"
        )

    return lookup


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file of plain tensors (``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherUnavailable(f"teacher.source: no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise TeacherUnavailable(f"teacher.source: {path.name} is not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise TeacherUnavailable(
            f"teacher.source: {path.name} is not a plain torch state dict that can be loaded safely "
            f"({exc.__class__.__name__}); save it with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherUnavailable(f"teacher.source: {path.name} does not hold a state dict of tensors")
    return state


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], arch: str, num_classes: int, origin: str) -> None:
    """Refuse, with a readable reason, weights that do not belong to ``model``."""
    classifier = feature_spec(model).classifier + ".weight"
    if classifier in state and state[classifier].shape[0] != num_classes:
        raise TeacherUnavailable(
            f"teacher.source: {origin} has {state[classifier].shape[0]} classes but the dataset has {num_classes}; "
            "pick a teacher trained on this dataset"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{'…' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
            if keys
        )
        raise TeacherUnavailable(f"teacher.source: {origin} does not match teacher.arch {arch!r} ({detail})")


def torchvision_weights_path(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s default ImageNet weights once downloaded."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_teacher_weights(model: nn.Module, source: str, arch: str, num_classes: int, *, run_teachers: RunTeachers | None,
                         input_shape: tuple[int, int] | None = None) -> None:
    """Fill ``model`` with the weights ``source`` names (``file:``, ``run:``, ``torchvision`` or ``timm``).

    ``input_shape`` is (channels, image size) the model was built for; ``timm`` needs it to have timm adapt its
    checkpoint the same way.
    """
    if source.startswith("file:"):
        state = read_state_dict(source[5:])
        check_fits(model, state, arch, num_classes, Path(source[5:]).name)
        model.load_state_dict(state)
    elif source.startswith("run:"):
        run_id = int(source[4:])
        if run_teachers is None:
            raise TeacherUnavailable(f"teacher.source: {source} names a run, but no runs database was given to look it up in")
        state = read_state_dict(run_teachers(run_id))
        check_fits(model, state, arch, num_classes, f"run {run_id}'s teacher")
        model.load_state_dict(state)
    elif source == "torchvision":
        path = torchvision_weights_path(arch)
        if not path.exists():
            raise TeacherUnavailable(
                f"teacher.source: torchvision weights for {arch} are not on this machine; place {path.name} in {path.parent} "
                "(copied from a machine with internet), or use source: train"
            )
        state = read_state_dict(path)
        own = model.state_dict()
        # ImageNet classifier and (for other channel counts or small images) the stem do not fit: keep ours
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    elif source == "timm":
        from kd_core.timm_pretrained import load_pretrained

        if input_shape is None:
            raise ValueError("teacher.source timm needs the input_shape the teacher was built for")
        load_pretrained(model, arch, num_classes, *input_shape)
    else:
        raise ValueError(f"teacher.source {source!r} has no weights to load")
