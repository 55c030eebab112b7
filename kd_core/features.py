"""Feature taps: forward hooks on a model's named layers (see ``models.FeatureSpec``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_core.losses.base import ModelShapes
from kd_core.models import feature_spec


def tokens_to_map(tokens: torch.Tensor, prefix: int, height: int, width: int) -> torch.Tensor:
    """A token model's stage output ``[B, prefix + H*W, D]`` as a map ``[B, D, H, W]`` (prefix tokens dropped)."""
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class FeatureTap:
    """Collects stage maps and/or the penultimate embedding during each forward of ``model``.

    Hooks exist only for what was asked, so a logits-only recipe pays nothing. Use as a context manager
    or call ``remove()``; values of the latest forward are in ``stages`` and ``embedding``.
    """

    def __init__(self, model: nn.Module, *, stages: bool = False, embedding: bool = False) -> None:
        spec = feature_spec(model)
        self.tokens = spec.tokens
        self.stages: list[torch.Tensor] = []
        self.embedding: torch.Tensor | None = None
        self._handles: list[Any] = []
        if stages:
            for name in spec.stages:
                self._handles.append(model.get_submodule(name).register_forward_hook(self._store_stage))
        if embedding:
            classifier = model.get_submodule(spec.classifier)
            self._handles.append(classifier.register_forward_pre_hook(self._store_embedding))

    def _store_stage(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.stages.append(output if self.tokens is None else tokens_to_map(output, *self.tokens))

    def _store_embedding(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.embedding = args[0]

    def clear(self) -> None:
        self.stages = []
        self.embedding = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def probe_shapes(model: nn.Module, in_channels: int, image_size: int) -> ModelShapes:
    """One dummy forward (batch of 2, eval mode) to find logits, embedding and stage shapes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FeatureTap(model, stages=True, embedding=True) as tap:
        logits = model(torch.zeros(2, in_channels, image_size, image_size, device=device))
        stage_shapes = [tuple(s.shape[1:]) for s in tap.stages]
        embedding_dim = int(tap.embedding.shape[1])
    model.train(was_training)
    return ModelShapes(num_classes=int(logits.shape[1]), embedding_dim=embedding_dim, stage_shapes=stage_shapes)
