"""Prototype (class-mean) embeddings of teacher and student, and 2-D projections for plotting.

Prototype ``μ_c`` = mean of the penultimate embeddings (the input of the final ``nn.Linear``) of class c
over one split, computed in eval mode. Teacher and student widths may differ, so the
report compares them without projection through class-by-class cosine-similarity matrices, and
``align_student_to_teacher`` fits a least-squares linear map when both must share one picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from kd_core.analysis.cka import linear_cka

ArrayLike = Union[torch.Tensor, np.ndarray]
Method = Literal["pca", "tsne", "umap"]

__all__ = [
    "LinearMap",
    "Projection2D",
    "PrototypeReport",
    "align_student_to_teacher",
    "class_means",
    "project_2d",
    "prototype_report",
]


def _t64(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x.detach()
    return t.to("cpu", torch.float64)


def _targets(t: ArrayLike) -> torch.Tensor:
    tt = torch.as_tensor(t) if isinstance(t, np.ndarray) else t.detach()
    return tt.to("cpu", torch.long).reshape(-1)


def class_means(
    embeddings: ArrayLike, targets: ArrayLike, num_classes: int, return_counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean embeddings ``[C, D]`` (float64) via one ``index_add``.

    Classes without samples get NaN rows (not a fake prototype at the origin). With
    ``return_counts=True`` also returns the per-class counts ``[C]`` (int64).
    """
    x = _t64(embeddings)
    y = _targets(targets)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"embeddings must be [N, D] with N = len(targets); got {tuple(x.shape)}, {y.shape[0]}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError("targets out of range [0, num_classes)")
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes)
    means = sums / counts[:, None].clamp_min(1)
    means[counts == 0] = float("nan")
    return (means, counts) if return_counts else means


def _cosine_matrix(p: torch.Tensor) -> torch.Tensor:
    pn = F.normalize(p, dim=1)
    return pn @ pn.T


@dataclass
class PrototypeReport:
    """Teacher/student prototype statistics (all NumPy float64; ``t`` = teacher, ``s`` = student)."""

    prototypes_t: np.ndarray  # [C, D_t]
    prototypes_s: np.ndarray  # [C, D_s]
    counts: np.ndarray  # [C]
    cos_t: np.ndarray  # [C, C] cosine similarity between teacher prototypes
    cos_s: np.ndarray  # [C, C]
    cos_diff: np.ndarray  # cos_s - cos_t
    prototype_cka: float  # linear CKA between P_t and P_s (n = C rows; NaN classes excluded)
    sample_cos_t: np.ndarray  # [N] cosine of each teacher embedding to its own teacher prototype
    sample_cos_s: np.ndarray  # [N] same for the student
    ncm_pred_t: np.ndarray  # [N] nearest-class-mean (Euclidean) prediction in teacher space
    ncm_pred_s: np.ndarray
    ncm_acc_t: float
    ncm_acc_s: float
    spread_t: np.ndarray  # [C] mean ‖φ − μ_y‖ per class
    spread_s: np.ndarray
    rel_spread_t: np.ndarray  # [C] spread / ‖μ_c‖ (scale-free, comparable across widths and norms)
    rel_spread_s: np.ndarray
    norm_t: np.ndarray  # [N] feature norms ‖φ‖
    norm_s: np.ndarray
    mean_norm_t: float
    mean_norm_s: float
    class_norm_t: np.ndarray  # [C] mean feature norm per class
    class_norm_s: np.ndarray

    @property
    def norm_ratio(self) -> float:
        """Mean student norm / mean teacher norm (ND, ECCV 2024: typically < 1 for students)."""
        return self.mean_norm_s / self.mean_norm_t


def _side(emb: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    means, counts = class_means(emb, y, num_classes, return_counts=True)
    own = means[y]  # [N, D]
    sample_cos = F.cosine_similarity(emb, own, dim=1)
    present = counts > 0
    d2 = torch.cdist(emb, means[present])  # [N, C_present]
    pred = torch.nonzero(present).reshape(-1)[d2.argmin(1)]
    dist_own = torch.linalg.vector_norm(emb - own, dim=1)
    spread = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, dist_own) / counts.clamp_min(1)
    spread[~present] = float("nan")
    norms = torch.linalg.vector_norm(emb, dim=1)
    class_norm = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, norms) / counts.clamp_min(1)
    class_norm[~present] = float("nan")
    return {
        "means": means,
        "counts": counts,
        "cos": _cosine_matrix(means),
        "sample_cos": sample_cos,
        "pred": pred,
        "acc": (pred == y).double().mean(),
        "spread": spread,
        "rel_spread": spread / torch.linalg.vector_norm(means, dim=1),
        "norms": norms,
        "class_norm": class_norm,
    }


def prototype_report(
    emb_t: ArrayLike, emb_s: ArrayLike, targets: ArrayLike, num_classes: int
) -> PrototypeReport:
    """Compare teacher and student penultimate embeddings of the same N examples at class level.

    ``emb_t``: ``[N, D_t]``, ``emb_s``: ``[N, D_s]`` (widths may differ), ``targets``: ``[N]`` labels.
    """
    et, es, y = _t64(emb_t), _t64(emb_s), _targets(targets)
    if not (et.shape[0] == es.shape[0] == y.shape[0]):
        raise ValueError("emb_t, emb_s and targets must have the same number of rows")
    t = _side(et, y, num_classes)
    s = _side(es, y, num_classes)
    present = t["counts"] > 0
    pcka = linear_cka(t["means"][present], s["means"][present]) if int(present.sum()) >= 2 else float("nan")

    def np_(v: torch.Tensor) -> np.ndarray:
        return v.numpy()

    return PrototypeReport(
        prototypes_t=np_(t["means"]),
        prototypes_s=np_(s["means"]),
        counts=np_(t["counts"]),
        cos_t=np_(t["cos"]),
        cos_s=np_(s["cos"]),
        cos_diff=np_(s["cos"] - t["cos"]),
        prototype_cka=float(pcka),
        sample_cos_t=np_(t["sample_cos"]),
        sample_cos_s=np_(s["sample_cos"]),
        ncm_pred_t=np_(t["pred"]),
        ncm_pred_s=np_(s["pred"]),
        ncm_acc_t=float(t["acc"]),
        ncm_acc_s=float(s["acc"]),
        spread_t=np_(t["spread"]),
        spread_s=np_(s["spread"]),
        rel_spread_t=np_(t["rel_spread"]),
        rel_spread_s=np_(s["rel_spread"]),
        norm_t=np_(t["norms"]),
        norm_s=np_(s["norms"]),
        mean_norm_t=float(t["norms"].mean()),
        mean_norm_s=float(s["norms"].mean()),
        class_norm_t=np_(t["class_norm"]),
        class_norm_s=np_(s["class_norm"]),
    )


# ----------------------------------------------------------------------------------------------------
# Least-squares alignment of the student to the teacher width
# ----------------------------------------------------------------------------------------------------


@dataclass
class LinearMap:
    """Affine map ``x ↦ x @ weight + bias`` fitted by least squares (student → teacher width)."""

    weight: np.ndarray  # [D_s, D_t]
    bias: np.ndarray  # [D_t]
    r2: float  # fraction of the teacher's (centered) variance explained on the fitting data

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return _t64(x).numpy() @ self.weight + self.bias


def align_student_to_teacher(emb_s: ArrayLike, emb_t: ArrayLike, ridge: float = 0.0) -> LinearMap:
    """Least-squares affine map from student embeddings ``[N, D_s]`` to teacher embeddings ``[N, D_t]``.

    Fitted on the same N images (centered, optional ridge penalty ``ridge · ‖W‖²``); apply with
    ``mapping(emb_s)`` and project ``vstack([emb_t, mapping(emb_s)])`` with one ``project_2d`` call.
    """
    xs, xt = _t64(emb_s), _t64(emb_t)
    if xs.shape[0] != xt.shape[0]:
        raise ValueError("emb_s and emb_t must hold the same examples")
    ms, mt = xs.mean(0), xt.mean(0)
    a, b = xs - ms, xt - mt
    if ridge > 0:
        gram = a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, a.T @ b)
    else:
        w = torch.linalg.lstsq(a, b, driver="gelsd").solution
    resid = b - a @ w
    tot = (b * b).sum()
    r2 = float(1 - (resid * resid).sum() / tot) if tot > 0 else float("nan")
    return LinearMap(weight=w.numpy(), bias=(mt - ms @ w).numpy(), r2=r2)


# ----------------------------------------------------------------------------------------------------
# 2-D projections
# ----------------------------------------------------------------------------------------------------


@dataclass
class Projection2D:
    """2-D coordinates of samples (and optionally prototypes) from one fitted projection."""

    points: np.ndarray  # [N, 2]
    prototypes: np.ndarray | None  # [C, 2] if prototypes were given
    method: str
    components: np.ndarray | None = None  # PCA: [2, D] sign-fixed principal axes
    mean: np.ndarray | None = None  # PCA: [D]
    explained_variance_ratio: np.ndarray | None = None  # PCA: [2]

    def transform(self, x: ArrayLike) -> np.ndarray:
        """Apply the fitted PCA projection to new points (PCA only)."""
        if self.components is None or self.mean is None:
            raise ValueError(f"{self.method} has no out-of-sample transform; embed the points together")
        return (_t64(x).numpy() - self.mean) @ self.components.T


def _fix_signs(scores: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Per-axis signs (±1) for 2-D coordinates.

    With ``reference`` (coordinates of the same points from an earlier view): the sign that makes the axis
    positively correlated with the reference axis. Otherwise a rule that depends only on the projected
    scores (so it is unchanged by sign flips or rotations of the input features): positive third moment
    (skewness), falling back to "the largest-|score| point is positive" for near-symmetric axes.
    """
    signs = np.ones(scores.shape[1])
    for j in range(scores.shape[1]):
        s = scores[:, j]
        if reference is not None:
            c = float(np.dot(s - s.mean(), reference[:, j] - reference[:, j].mean()))
            signs[j] = -1.0 if c < 0 else 1.0
            continue
        scale = float(np.sqrt(np.mean(s**2))) or 1.0
        skew = float(np.mean((s / scale) ** 3))
        if abs(skew) > 1e-3:
            signs[j] = np.sign(skew)
        else:
            signs[j] = np.sign(s[np.argmax(np.abs(s))]) or 1.0
    return signs


def _pca(
    x: np.ndarray, protos: np.ndarray | None, reference: np.ndarray | None
) -> Projection2D:
    mean = x.mean(0)
    xc = x - mean
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # 1-D data: pad with a zero axis
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    scores = xc @ comps.T
    signs = _fix_signs(scores, reference)
    comps = comps * signs[:, None]
    var = sv**2
    evr = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return Projection2D(
        points=xc @ comps.T,
        prototypes=None if protos is None else (protos - mean) @ comps.T,
        method="pca",
        components=comps,
        mean=mean,
        explained_variance_ratio=np.pad(evr, (0, 2 - evr.shape[0])),
    )


def _pre_reduce(x: np.ndarray, dims: int = 50) -> np.ndarray:
    """PCA to ``dims`` dims before t-SNE/UMAP when the width is larger (sklearn's recommendation)."""
    if x.shape[1] <= dims:
        return x
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:dims].T


def project_2d(
    embeddings: ArrayLike,
    method: Method = "pca",
    seed: int = 0,
    reference: ArrayLike | None = None,
    prototypes: ArrayLike | None = None,
    options: Mapping[str, object] | None = None,
) -> Projection2D:
    """Project ``[N, D]`` embeddings (and optional ``[C, D]`` prototypes) to 2-D.

    * ``"pca"``: deterministic SVD; prototypes go through the same transform; axis signs are fixed so the
      picture does not flip between checkpoints (see ``_fix_signs``).
    * ``"tsne"``: scikit-learn ``TSNE(random_state=seed)``; samples and prototypes are embedded together;
      perplexity defaults to ``min(30, (N_total - 1) / 3)``; inputs wider than 50 are PCA-reduced first.
    * ``"umap"``: umap-learn ``UMAP(random_state=seed)`` (deterministic, single-threaded), samples and
      prototypes together; raises ``ImportError`` with an install hint if umap-learn is missing.

    ``reference``: ``[N, 2]`` coordinates of the same samples from an earlier view (e.g. the previous
    checkpoint). PCA aligns each axis' sign to it; t-SNE/UMAP use it (plus, for prototypes, their class
    means in the reference) as the initialization, which keeps successive views comparable.
    ``options``: extra keyword arguments for the ``TSNE`` / ``UMAP`` constructor (e.g.
    ``{"max_iter": 500, "method": "exact"}`` or ``{"metric": "cosine"}``).
    """
    x = _t64(embeddings).numpy()
    if x.ndim != 2:
        raise ValueError("embeddings must be [N, D]")
    p = None if prototypes is None else _t64(prototypes).numpy()
    ref = None if reference is None else _t64(reference).numpy()
    if ref is not None and ref.shape != (x.shape[0], 2):
        raise ValueError(f"reference must be [N, 2] = {(x.shape[0], 2)}, got {ref.shape}")
    if method == "pca":
        return _pca(x, p, ref)

    allx = x if p is None else np.vstack([x, p])
    allx = _pre_reduce(allx)
    init: np.ndarray | str
    if ref is not None:
        init = ref if p is None else np.vstack([ref, _nearest_init(x, p, ref)])
        init = init.astype(np.float64)
    else:
        init = "pca" if method == "tsne" else "spectral"
    n_total = allx.shape[0]
    if method == "tsne":
        from sklearn.manifold import TSNE

        params: dict[str, object] = {
            "n_components": 2,
            "perplexity": min(30.0, max(1.0, (n_total - 1) / 3.0)),
            "init": init,
            "random_state": seed,
            "learning_rate": "auto",
        }
        params.update(options or {})
        if isinstance(init, np.ndarray):  # sklearn expects a reasonably small-scale init
            init_std = init[:, 0].std() or 1.0
            params["init"] = init / init_std * 1e-4
        out = TSNE(**params).fit_transform(allx)
    elif method == "umap":
        try:
            import umap  # type: ignore[import-untyped]
        except Exception as e:  # ImportError, or numba/llvmlite failing at import time
            raise ImportError(
                f"method='umap' needs umap-learn (pip install umap-learn); import failed: {e}"
            ) from e
        params = {
            "n_components": 2,
            "random_state": seed,
            "n_neighbors": min(15, n_total - 1),
            "init": init,
        }
        params.update(options or {})
        out = umap.UMAP(**params).fit_transform(allx)
    else:
        raise ValueError(f"unknown method {method!r} (use 'pca', 'tsne' or 'umap')")
    out = np.asarray(out, dtype=np.float64)
    n = x.shape[0]
    return Projection2D(points=out[:n], prototypes=None if p is None else out[n:], method=method)


def _nearest_init(x: np.ndarray, p: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Initial 2-D positions of prototypes: the reference position of each prototype's nearest sample."""
    d = ((p[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return ref[d.argmin(1)]
