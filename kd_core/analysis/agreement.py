"""Teacher/student agreement buckets, per-class accuracy and calibration (reliability diagram, ECE)."""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

BUCKETS: tuple[str, ...] = (
    "both_right",
    "teacher_right_student_wrong",
    "teacher_wrong_student_right",
    "both_wrong",
)

__all__ = ["BUCKETS", "Calibration", "agreement_buckets", "calibration", "per_class_accuracy"]


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _labels(pred: ArrayLike) -> np.ndarray:
    """Class labels ``[N]``; 2-D inputs (logits or probabilities ``[N, C]``) are arg-maxed."""
    p = _np(pred)
    if p.ndim == 2:
        p = p.argmax(1)
    if p.ndim != 1:
        raise ValueError(f"predictions must be [N] labels or [N, C] scores, got shape {p.shape}")
    return p.astype(np.int64)


def agreement_buckets(
    teacher_pred: ArrayLike, student_pred: ArrayLike, target: ArrayLike
) -> dict[str, object]:
    """Split examples by who is right (the disagreement explorer).

    Predictions are labels ``[N]`` or scores ``[N, C]`` (arg-maxed). Returns a dict with the counts of
    ``both_right``, ``teacher_right_student_wrong``, ``teacher_wrong_student_right``, ``both_wrong``
    (ints), ``masks`` (bucket → bool ``[N]``), ``n``, ``agree`` (count of identical predictions, right or
    wrong), ``agreement_rate`` (agree / n; top-1 agreement), and ``teacher_acc`` / ``student_acc``.
    """
    t, s, y = _labels(teacher_pred), _labels(student_pred), _labels(target)
    if not (t.shape == s.shape == y.shape):
        raise ValueError(f"shapes differ: teacher {t.shape}, student {s.shape}, target {y.shape}")
    tr, sr = t == y, s == y
    masks = {
        "both_right": tr & sr,
        "teacher_right_student_wrong": tr & ~sr,
        "teacher_wrong_student_right": ~tr & sr,
        "both_wrong": ~tr & ~sr,
    }
    n = int(y.shape[0])
    out: dict[str, object] = {k: int(v.sum()) for k, v in masks.items()}
    agree = int((t == s).sum())
    out.update(
        masks=masks,
        n=n,
        agree=agree,
        agreement_rate=agree / n if n else float("nan"),
        teacher_acc=float(tr.mean()) if n else float("nan"),
        student_acc=float(sr.mean()) if n else float("nan"),
    )
    return out


def per_class_accuracy(pred: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """Accuracy per true class ``[num_classes]`` (float64); NaN for classes with no examples."""
    p, y = _labels(pred), _labels(target)
    if p.shape != y.shape:
        raise ValueError("pred and target shapes differ")
    total = np.bincount(y, minlength=num_classes).astype(np.float64)
    right = np.bincount(y[p == y], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = right / total
    acc[total == 0] = np.nan
    return acc[:num_classes]


class Calibration(NamedTuple):
    """Reliability-diagram data; unpacks as ``(bin_confidence, bin_accuracy, counts, ece)``."""

    bin_confidence: np.ndarray  # [n_bins] mean max-probability in each bin (NaN if empty)
    bin_accuracy: np.ndarray  # [n_bins] accuracy in each bin (NaN if empty)
    counts: np.ndarray  # [n_bins] int64
    ece: float  # Σ_b (count_b / N) · |acc_b − conf_b|


def calibration(probs: ArrayLike, target: ArrayLike, n_bins: int = 15) -> Calibration:
    """Top-label calibration (Guo et al. 2017): equal-width confidence bins ``(lo, hi]`` on [0, 1]
    (a confidence of exactly 0 goes to the first bin), per-bin mean confidence and accuracy, counts, ECE.

    ``probs``: ``[N, C]`` probabilities (rows summing to 1; pass ``softmax(logits)``, not logits).
    """
    p = _np(probs).astype(np.float64)
    y = _labels(target)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [N, C] with N = len(target); got {p.shape}, {y.shape}")
    if p.size and (p.min() < -1e-6 or not np.allclose(p.sum(1), 1.0, atol=1e-3)):
        raise ValueError("probs rows must be probabilities summing to 1 (apply softmax to logits)")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_conf = sum_conf / counts
        bin_acc = sum_acc / counts
    n = conf.shape[0]
    ece = float(np.abs(sum_acc - sum_conf).sum() / n) if n else float("nan")
    return Calibration(bin_conf, bin_acc, counts.astype(np.int64), ece)
