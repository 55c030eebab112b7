"""Distillation losses: functional forms (like ``torch.nn.functional``) and registered recipe terms.

Importing this package registers every term (``ce``, ``kd``, ``dkd`` …) in :data:`LOSSES`.
"""

from __future__ import annotations

from typing import Any

from kd_core.losses.base import (
    LOSSES,
    BuildContext,
    DistillLoss,
    LossInputs,
    ModelShapes,
    create_loss,
    register_loss,
)
from kd_core.losses.contrastive import nce_loss
from kd_core.losses.feature import at_loss, fitnet_loss, nd_loss
from kd_core.losses.logit import (
    dist_loss,
    dkd_loss,
    kd_loss,
    logit_std_kd_loss,
    nkd_loss,
    ofa_loss,
    pld_loss,
)
from kd_core.losses.params import constructor_params
from kd_core.losses.relation import pkt_loss, rkd_loss, sp_loss
from kd_core.losses.taid import TAIDSchedule, taid_loss


def loss_names() -> list[str]:
    """Names usable in a recipe, sorted."""
    return sorted(LOSSES)


def describe_loss(name: str) -> dict[str, Any]:
    """What the UI shows for a term: ``{"name", "summary", "needs", "params", "paper"}``."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; choose one of {loss_names()}") from None
    return {
        "name": name,
        "summary": getattr(cls, "summary", ""),
        "needs": sorted(cls.needs),
        "params": constructor_params(cls),
        "paper": getattr(cls, "paper", ""),
    }


__all__ = [
    "LOSSES",
    "BuildContext",
    "DistillLoss",
    "LossInputs",
    "ModelShapes",
    "TAIDSchedule",
    "at_loss",
    "create_loss",
    "describe_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "kd_loss",
    "logit_std_kd_loss",
    "loss_names",
    "nce_loss",
    "nd_loss",
    "nkd_loss",
    "ofa_loss",
    "pkt_loss",
    "pld_loss",
    "register_loss",
    "rkd_loss",
    "sp_loss",
    "taid_loss",
]
