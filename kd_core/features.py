"""Feature taps: forward hooks on a model's layers, never model rewrites.

* ``FeatureTap``: the stages and penultimate embedding a model declares (``models.FeatureSpec``), for the losses;
* ``LayerTap``: any named modules (``"layer3.1.conv2"``, ``"fc:input"`` for a module's input), for the analysis,
  with ``feature_layers`` (its default layers) and ``pool_features`` (maps to ``[B, p]`` matrices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from kd_core.losses.base import ModelShapes
from kd_core.models import feature_spec

Pooling = Literal["flatten", "mean"]
INPUT_SUFFIX = ":input"  # a layer name with this suffix taps the module's input (a forward pre-hook)


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


def pool_features(t: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduce a layer output ``[B, C, *spatial]`` to a matrix ``[B, p]``.

    ``"flatten"``: ``C·H·W`` columns. ``"mean"``: global average pooling: over every dim after the channel
    dim of a ``[B, C, H, W]`` map, over the tokens of a ``[B, N, D]`` token sequence (ViT, MLP-Mixer stages:
    the channel dim is last there, so one ``D``-vector per example as for a map); 2-D outputs are returned
    as they are.
    """
    if pooling == "flatten":
        return t.flatten(1)
    if pooling == "mean":
        if t.ndim == 3:
            return t.mean(dim=1)
        return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
    raise ValueError(f"unknown pooling {pooling!r} (use 'flatten' or 'mean')")


def first_tensor(obj: Any) -> torch.Tensor:
    """The tensor in a module's output, a pre-hook's arguments or a data batch: itself, or the first of a tuple/list."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"cannot take a feature tensor from a {type(obj).__name__}")


class LayerTap:
    """Context manager that hooks named modules of a model and collects their outputs per forward.

    ``LayerTap(model, ["layer1", "layer4", "fc:input"])``; after each forward call ``pop()`` returns the
    tensors in the requested order (and clears them). A module that fires more than once in one forward
    (a re-used ``nn.ReLU``) is an error rather than a silent overwrite (the torch_cka misalignment bug).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], detach: bool = True) -> None:
        self.model = model
        self.layers = list(layers)
        self.detach = detach
        self._store: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layer names in {self.layers}")
        names = dict(model.named_modules())
        for layer in self.layers:
            base = layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer
            if base not in names:
                close = [k for k in names if k and (base in k or k in base)][:8]
                raise KeyError(f"model has no module {base!r}" + (f"; similar: {close}" if close else ""))

    def _record(self, key: str, value: Any) -> None:
        if key in self._store:
            raise RuntimeError(
                f"module for layer {key!r} ran more than once in one forward pass; tap a module that is "
                "called exactly once (e.g. a block, not a shared ReLU)"
            )
        t = first_tensor(value)
        self._store[key] = t.detach() if self.detach else t

    def __enter__(self) -> LayerTap:
        for layer in self.layers:
            if layer.endswith(INPUT_SUFFIX):
                module = self.model.get_submodule(layer[: -len(INPUT_SUFFIX)])

                def pre_hook(_m: nn.Module, args: tuple[Any, ...], key: str = layer) -> None:
                    self._record(key, args)

                self._handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                module = self.model.get_submodule(layer)

                def hook(_m: nn.Module, _args: Any, output: Any, key: str = layer) -> None:
                    self._record(key, output)

                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    def pop(self) -> list[torch.Tensor]:
        """Tensors of the last forward in the order of ``layers``; raises if a layer did not fire."""
        missing = [k for k in self.layers if k not in self._store]
        if missing:
            self._store.clear()
            raise RuntimeError(f"layers did not run in the forward pass: {missing}")
        out = [self._store[k] for k in self.layers]
        self._store.clear()
        return out


def feature_layers(model: nn.Module, embedding: bool = True, logits: bool = False) -> list[str]:
    """Default CKA layers from ``model.feature_spec``: the stages, then the penultimate embedding
    (``"<classifier>:input"``) and optionally the logits (``"<classifier>"``)."""
    spec = getattr(model, "feature_spec", None)
    if spec is None:
        raise ValueError("model has no feature_spec; pass layer names explicitly")
    layers = list(spec.stages)
    if embedding:
        layers.append(spec.classifier + INPUT_SUFFIX)
    if logits:
        layers.append(spec.classifier)
    return layers
