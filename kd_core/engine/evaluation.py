"""Evaluation: predictions in eval mode, accuracy and agreement metrics, test reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.data import image_batches
from kd_core.engine.precision import Precision
from kd_core.features import FeatureTap
from kd_core.methods.base import Method

EVAL_BATCH = 512


@torch.no_grad()
def outputs_with_embedding(model: nn.Module, x: torch.Tensor, precision: Precision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and penultimate embeddings for ``x`` in eval mode, batched; training mode restored."""
    was_training = model.training
    model.eval()
    precision = precision or Precision("fp32", x.device.type)
    logits, embeddings = [], []
    with FeatureTap(model, embedding=True) as tap, precision.autocast():
        for xb in image_batches(x, EVAL_BATCH):
            logits.append(model(xb).float())
            embeddings.append(tap.embedding.float())
    model.train(was_training)
    return torch.cat(logits), torch.cat(embeddings)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, precision: Precision | None = None, method: Method | None = None) -> torch.Tensor:
    """Float32 logits for ``x`` in eval mode, batched; with a method, its prediction (e.g. DHO's blend)."""
    if method is not None and "embedding" in method.student_needs:
        logits, embedding = outputs_with_embedding(model, x, precision)
        was_training = method.training
        method.eval()
        out = method.student_logits(logits, embedding)
        method.train(was_training)
        return out
    was_training = model.training
    model.eval()
    precision = precision or Precision("fp32", x.device.type)
    with precision.autocast():
        out = torch.cat([model(xb).float() for xb in image_batches(x, EVAL_BATCH)])
    model.train(was_training)
    return out if method is None else method.student_logits(out, None)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int, teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1/top-5 (%), CE loss, per-class accuracy and, against a teacher, agreement and KL(teacher‖student)."""
    pred = logits.argmax(1)
    out = {"top1": 100.0 * (pred == target).float().mean().item(), "loss": F.cross_entropy(logits, target).item()}
    if num_classes >= 10:
        top5 = logits.topk(5, 1).indices.eq(target[:, None]).any(1)
        out["top5"] = 100.0 * top5.float().mean().item()
    correct = torch.zeros(num_classes, device=logits.device).index_add_(0, target, (pred == target).float())
    counts = torch.bincount(target, minlength=num_classes).clamp(min=1)
    for c, acc in enumerate((100.0 * correct / counts).tolist()):
        out[f"class_acc/{c}"] = acc
    if teacher_logits is not None:
        out["agreement"] = 100.0 * (pred == teacher_logits.argmax(1)).float().mean().item()
        log_p_t = F.log_softmax(teacher_logits, 1)
        out["kl_teacher_student"] = F.kl_div(F.log_softmax(logits, 1), log_p_t, reduction="batchmean", log_target=True).item()
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[list[int]]:
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()
