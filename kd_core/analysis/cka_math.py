"""Kernels, Gram centering and kernel CKA (Kornblith et al. 2019, arXiv 1905.00414).

* linear and RBF Gram matrices (``gram_linear``, ``gram_rbf`` with the median heuristic of the
  google-research ``representation_similarity`` demo);
* biased centering ``H K H`` and U-centering (``center_gram``), whose Frobenius inner product is
  ``n(n-3)`` times the unbiased HSIC_1 of Song et al. 2012 used by Nguyen et al. 2021 (arXiv 2010.15327);
* CKA of two Gram matrices (``cka_from_grams``) and RBF CKA of two representations (``rbf_cka``).

Linear CKA from features (one pair or all pairs of layers) is in ``cka_linear``. Everything here is
float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_matrix(
    x: ArrayLike, device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """``x`` as a 2-D tensor ``[n, p]`` (higher-rank inputs are flattened per row, 1-D ones are a column).

    ``dtype=None`` keeps a floating dtype (no copy) and turns anything else into float64.
    """
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    t = t.detach()
    if device is not None:
        t = t.to(device)
    if dtype is None and not t.is_floating_point():
        dtype = torch.float64
    if dtype is not None:
        t = t.to(dtype)
    if t.ndim == 1:
        t = t[:, None]
    elif t.ndim > 2:
        t = t.flatten(1)
    return t


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must hold the same examples (rows): {x.shape[0]} != {y.shape[0]}")


def gram_linear(x: ArrayLike) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X Xᵀ`` (float64) of an ``[n, p]`` matrix."""
    t = as_matrix(x)
    return t @ t.T


def _median(values: torch.Tensor) -> torch.Tensor:
    """NumPy-compatible median of all entries (mean of the two middle values for even counts).

    ``torch.median`` returns the lower middle value and ``torch.quantile`` refuses inputs above 2^24
    elements, so the median is taken with ``kthvalue`` (works for the n² entries of a large Gram).
    """
    flat = values.reshape(-1)
    m = flat.numel()
    if m % 2 == 1:
        return flat.kthvalue(m // 2 + 1).values
    lo = flat.kthvalue(m // 2).values
    hi = flat.kthvalue(m // 2 + 1).values
    return (lo + hi) / 2


def gram_rbf(x: ArrayLike, threshold: float = 0.5) -> torch.Tensor:
    """RBF Gram matrix with the median heuristic of the google-research demo (``gram_rbf``).

    ``K_ij = exp(-D²_ij / (2 · threshold² · median(D²)))`` where the median runs over the full ``n×n``
    matrix of squared distances, zero diagonal included (NumPy median semantics).
    """
    t = as_matrix(x)
    dot = t @ t.T
    sq = torch.diagonal(dot)
    d2 = (-2 * dot + sq[:, None] + sq[None, :]).clamp_min_(0)
    med = _median(d2)
    if med <= 0:
        raise ValueError("median squared distance is 0 (more than half the examples coincide)")
    return torch.exp(-d2 / (2 * threshold**2 * med))


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Center Gram matrices ``[..., n, n]`` (returns a new tensor).

    ``unbiased=False``: ``H K H`` with ``H = I - 11ᵀ/n`` (computed from means, O(n²)).
    ``unbiased=True``: U-centering (Székely & Rizzo; google ``center_gram(unbiased=True)``), for which
    ``<Ũ_K, Ũ_L>_F = n(n-3) · HSIC_1(K, L)`` (unbiased HSIC of Song et al. 2012). Needs ``n >= 4``.
    """
    g = gram.to(torch.float64).clone()
    n = g.shape[-1]
    if unbiased:
        if n < 4:
            raise ValueError(f"unbiased (debiased) HSIC needs at least 4 examples, got {n}")
        g.diagonal(dim1=-2, dim2=-1).zero_()
        means = g.sum(dim=-2) / (n - 2)
        means = means - means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
        g -= means[..., :, None]
        g -= means[..., None, :]
        g.diagonal(dim1=-2, dim2=-1).zero_()
    else:
        means = g.mean(dim=-2)
        means = means - means.mean(dim=-1, keepdim=True) / 2
        g -= means[..., :, None]
        g -= means[..., None, :]
    return g


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> float:
    """CKA of two ``n×n`` Gram matrices (biased HSIC_0 or debiased HSIC_1 form)."""
    gx = center_gram(gram_x, unbiased=debiased)
    gy = center_gram(gram_y, unbiased=debiased)
    num = (gx * gy).sum()
    den = torch.linalg.vector_norm(gx) * torch.linalg.vector_norm(gy)
    return float(num / den)


def stacked_centered_grams(feats: Sequence[torch.Tensor], debiased: bool) -> torch.Tensor:
    """Centered linear Grams of each layer, flattened to rows ``[L, n²]``."""
    n = feats[0].shape[0]
    out = torch.empty(len(feats), n * n, dtype=torch.float64, device=feats[0].device)
    for i, f in enumerate(feats):  # one layer at a time: peak memory ~ 2 Grams besides the output
        out[i] = center_gram(f @ f.T, unbiased=debiased).reshape(-1)
    return out


def rbf_cka(x: ArrayLike, y: ArrayLike, threshold: float = 0.5, debiased: bool = False) -> float:
    """RBF-kernel CKA with the median bandwidth heuristic (``σ² = threshold² · median(D²)``).

    ``threshold=0.5`` is the value used in Kornblith et al. 2019 and the demo notebook.
    """
    xt, yt = as_matrix(x), as_matrix(y)
    check_pair(xt, yt)
    return cka_from_grams(gram_rbf(xt, threshold), gram_rbf(yt, threshold), debiased=debiased)
