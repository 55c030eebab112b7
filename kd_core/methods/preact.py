"""Pre-activation stage features through hooks, for any model whose stages end in a ReLU.

ReviewKD (and other feature methods: mdistiller's ``preact_feats``) match the teacher's stage features
*before* the final ReLU, which keeps the negative responses a ReLU throws away. Our models name their
stages (``models.FeatureSpec``) but a forward hook on a stage only sees its output, and the ReLU that
produced it is often a function call inside a block (``F.relu(out + shortcut)`` in the CIFAR ResNets),
not a module one could hook.

:class:`PreActivationTap` watches the torch functions a stage calls while it runs (a
``TorchFunctionMode`` entered by a forward pre-hook and left by the forward hook):

* the input of the last ``relu`` call is remembered (copied first when the ReLU works in place);
* max pooling applied to that ReLU's output afterwards is remembered too (max pooling commutes with a
  ReLU, so ``pool(relu(z)) = relu(pool(z))``: the pre-activation of a conv-BN-ReLU-maxpool stage is
  ``pool(z)``);
* when the stage's output *is* the tensor that chain produced, the stage's pre-activation is the ReLU's
  input with the recorded pooling replayed on it; otherwise the stage did not end in a ReLU (a Wide
  ResNet block, a MobileNetV2 linear bottleneck) and its output already is its pre-activation.

Either way ``relu(preact) == output`` holds whenever a ReLU ended the stage, and nothing about a
particular model is hard-coded: no model code changes, no state added to any model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kd_core.models import feature_spec

_RELU = ("relu", "relu_")


class _StageWatch(TorchFunctionMode):
    """Records the last ReLU of one stage's forward and the max-pooling applied to its result."""

    def __init__(self) -> None:
        super().__init__()
        self.pre: torch.Tensor | None = None  # input of the last ReLU
        self.tail: torch.Tensor | None = None  # the ReLU's output, after the pooling recorded so far
        self.replay: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RELU and args and isinstance(args[0], torch.Tensor):
            inplace = name.endswith("_") or bool(kwargs.get("inplace", False)) or (len(args) > 1 and args[1] is True)
            pre = args[0].clone() if inplace else args[0]
            out = func(*args, **kwargs)
            self.pre, self.tail, self.replay = pre, out, []
            return out
        out = func(*args, **kwargs)
        if "max_pool" in name and self.tail is not None and args and args[0] is self.tail and isinstance(out, torch.Tensor):
            self.replay.append((func, args[1:], kwargs))
            self.tail = out
        return out

    def preactivation(self, output: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The stage's pre-activation given its ``output``, and whether a ReLU ended the stage."""
        if self.pre is None or output is not self.tail:
            return output, False
        x = self.pre
        for func, rest, kwargs in self.replay:
            x = func(x, *rest, **kwargs)
        return x, True


class PreActivationTap:
    """Forward hooks on ``model``'s named stages collecting each stage's pre-activation (shallow to deep).

    After each forward of ``model``, ``stages`` holds one tensor per stage and ``ended_in_relu`` says, per stage, whether it
    is a true pre-activation (the stage ended in a ReLU) or the stage's output (it did not).
    """

    def __init__(self, model: nn.Module) -> None:
        self.stages: list[torch.Tensor] = []
        self.ended_in_relu: list[bool] = []
        self._watches: dict[int, _StageWatch] = {}
        self._handles: list[Any] = [model.register_forward_pre_hook(lambda module, args: self.clear())]  # each forward starts afresh
        for name in feature_spec(model).stages:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: Any) -> None:
        watch = _StageWatch()
        watch.__enter__()
        self._watches[id(module)] = watch

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        watch = self._watches.pop(id(module), None)
        if watch is None:
            return
        watch.__exit__(None, None, None)
        if isinstance(output, torch.Tensor):
            pre, ended = watch.preactivation(output)
            self.stages.append(pre)
            self.ended_in_relu.append(ended)

    def clear(self) -> None:
        self.stages = []
        self.ended_in_relu = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PreActivationTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
