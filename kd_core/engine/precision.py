"""Numeric precision of the forward passes (``precision:`` in a config).

Forward passes may run in reduced precision; every loss term gets float32 inputs and runs outside
autocast, because the Gram/distance/``bmm`` terms (RKD, SP, PKT, CRD, DIST's correlations) lose their
meaning in bf16: on post-ReLU features bf16 shifted RKD's distances by up to 5.7 % and its loss 27-fold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(RuntimeError):
    """The requested precision cannot run on this device."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``fp32``, ``bf16`` or ``fp16`` (the last with a gradient scaler)."""

    name: Literal["fp32", "bf16", "fp16"]
    device_type: str

    def autocast(self) -> AbstractContextManager[object]:
        """Reduced-precision forward passes, or nothing for fp32."""
        return torch.autocast(self.device_type, dtype=_DTYPES.get(self.name, torch.float32), enabled=self.name != "fp32")

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve_precision(requested: PrecisionName, device: torch.device) -> Precision:
    """``auto`` is bf16 on GPUs that support it and fp32 elsewhere; an explicit choice is checked, never swapped."""
    cuda = device.type == "cuda"
    if requested == "auto":
        return Precision("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32", device.type)
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return Precision(requested, device.type)
