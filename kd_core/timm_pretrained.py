"""timm's pretrained ImageNet weights for ``teacher.source: timm``, read from local files only.

The network is never used: the weights are ``$DISTILLERY_HOME/timm/<timm name>.safetensors`` or, failing that,
the file timm would fetch from the Hugging Face hub if it is already in the hub cache. Only safetensors are
read (nothing is unpickled). Loading goes through timm (kd_core.timm_models with ``pretrained_file``), which
adapts the checkpoint to the small-image model; what timm cannot adapt is refused, never loaded partially.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from kd_core.settings import data_home
from kd_core.teachers import TeacherUnavailable
from kd_core.timm_models import TIMM_ARCHS, convnext_stem


def weights_folder() -> Path:
    """Where timm weights are placed by hand: ``$DISTILLERY_HOME/timm``."""
    return data_home() / "timm"


def weights_path(arch: str) -> Path:
    """``$DISTILLERY_HOME/timm/<timm name>.safetensors`` for ``timm:<timm name>``."""
    return weights_folder() / f"{arch.removeprefix('timm:')}.safetensors"


def _pretrained_cfg(arch: str) -> Any:
    import timm

    return timm.models.get_pretrained_cfg(arch.removeprefix("timm:"))


def _hub_filename(cfg: Any) -> str:
    # timm's hub repos hold model.safetensors unless the config names another safetensors file
    name = getattr(cfg, "hf_hub_filename", None)
    return name if name and name.endswith(".safetensors") else "model.safetensors"


def download_hint(arch: str) -> str:
    """Where the weights can be downloaded, from timm's pretrained_cfg."""
    cfg = _pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        return f"download {_hub_filename(cfg)} from https://huggingface.co/{cfg.hf_hub_id} and rename it"
    if cfg is not None and cfg.url:
        return f"it is published at {cfg.url} (convert it to safetensors)"
    return "timm names no download for it"


def source_problem(arch: str, image_size: int) -> str | None:
    """Why ``source: timm`` cannot serve ``arch`` at ``image_size`` (None: it can, once the file is there)."""
    if arch not in TIMM_ARCHS:
        return (f"timm weights exist only for timm: architectures ({', '.join(TIMM_ARCHS)}); "
                "pick one of them as teacher.arch or use source: train")
    kind, _ = TIMM_ARCHS[arch]
    cfg = _pretrained_cfg(arch)
    if kind == "mixer" or cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no pretrained weights for {arch}; pick another timm: architecture or use source: train"
    if kind == "convnext" and convnext_stem(image_size) != 4:
        return (f"timm cannot adapt {arch}'s 4×4 ImageNet stem to the 1-pixel stem used below 64 pixels "
                f"(this dataset is {image_size}×{image_size}); set dataset.image_size to 64 or more, or use source: train")
    return None


def _hub_cache_file(arch: str) -> Path | None:
    """The hub file in the local Hugging Face cache, if there; looks only, never downloads."""
    cfg = _pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=cfg.hf_hub_id, filename=_hub_filename(cfg))
    return Path(found) if isinstance(found, str) else None  # None or a "known missing" marker otherwise


def find_weights(arch: str) -> Path:
    """The local safetensors file of ``arch``'s timm weights, or TeacherUnavailable saying what to place where."""
    path = weights_path(arch)
    if path.is_file():
        return path
    cached = _hub_cache_file(arch)
    if cached is not None and cached.is_file():
        return cached
    pickled = [p.name for p in (path.with_suffix(".pt"), path.with_suffix(".pth"), path.with_suffix(".bin")) if p.is_file()]
    note = f" ({', '.join(pickled)} there is not read: pickle files are never loaded, save it as safetensors)" if pickled else ""
    raise TeacherUnavailable(
        f"teacher.source: timm weights for {arch} are not on this machine{note}; place {path.name} in {path.parent} "
        f"({download_hint(arch)}; copy it from a machine with internet), or use source: train"
    )


class _TimmWarnings(logging.Handler):
    """Collects timm's load warnings: timm falls back to random init for a stem it cannot convert."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _key_mismatch(model: nn.Module, path: Path, arch: str) -> None:
    """Refuse a file that lacks tensors of ``model`` (bar its new classifier), or holds tensors ``model`` does not.

    timm loads non-strictly once it has dropped the ImageNet head, so a file of another model, or a truncated
    one, would otherwise leave part of the teacher at its random init without a word.
    """
    from safetensors import SafetensorError, safe_open

    from kd_core.models import feature_spec

    try:
        with safe_open(str(path), framework="pt") as file:
            in_file = set(file.keys())
    except SafetensorError as exc:
        raise TeacherUnavailable(f"teacher.source: {path} is not a valid safetensors file ({exc})") from None
    head = feature_spec(model).classifier + "."
    ours = {k for k in model.state_dict() if not k.startswith(head)}
    missing, unexpected = sorted(ours - in_file), sorted(k for k in in_file - ours if not k.startswith(head))
    if missing or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{'…' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise TeacherUnavailable(f"teacher.source: {path.name} does not hold timm's {arch} weights ({detail})")


def checked_weights(model: nn.Module, arch: str, image_size: int) -> Path:
    """The weights file for ``model`` (``arch`` at ``image_size``), refused unless timm can load all of it."""
    problem = source_problem(arch, image_size)
    if problem:
        raise TeacherUnavailable(f"teacher.source: {problem}")
    path = find_weights(arch)
    _key_mismatch(model, path, arch)
    return path


def load_pretrained(model: nn.Module, arch: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """Fill ``model`` (built by create_model for ``arch``) with timm's pretrained weights, adapted by timm."""
    from kd_core.timm_models import build

    path = checked_weights(model, arch, image_size)
    warnings = _TimmWarnings()
    logger = logging.getLogger("timm.models._builder")
    logger.addHandler(warnings)
    try:
        pretrained, *_ = build(arch, num_classes, in_channels, image_size, pretrained_file=path)
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches timm cannot resample, unreadable files
        raise TeacherUnavailable(f"teacher.source: timm cannot adapt {path.name} to {arch} here ({str(exc)[:300]})") from None
    finally:
        logger.removeHandler(warnings)
    partial = [m for m in warnings.messages if "random init" in m]
    if partial:  # a checkpoint half loaded is worse than none: refuse rather than train on it
        raise TeacherUnavailable(f"teacher.source: timm could not adapt all of {path.name} to {arch} ({partial[0]})")
    # same builder, same arguments: the keys and shapes are the project's model's (with its FeatureSpec)
    model.load_state_dict(pretrained.state_dict())
