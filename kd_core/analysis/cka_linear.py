"""Linear CKA from stored features: one pair (``linear_cka``) or every pair of layers at once
(``cka_matrix_from_features``), biased (Kornblith et al. 2019, arXiv 1905.00414) or debiased (the unbiased
HSIC_1 of Song et al. 2012, as in Nguyen et al. 2021, arXiv 2010.15327).

For column-centred features X (n×p), Y (n×q) with Grams K = XXᵀ, L = YYᵀ, write
``off = Σ_{a≠b} K_ab L_ab``, ``d_K`` for the diagonal of K and ``t_K = tr K``. Centred features have
``K1 = 0``, so Song's estimator and the biased one reduce to (Kornblith et al.'s feature-space form)::

    n(n-3)·HSIC_1(K, L) = off - 2/(n-2)·d_K·d_L + t_K·t_L / ((n-1)(n-2))
    (n-1)²·HSIC_0(K, L) = off + d_K·d_L                       (= ‖XᵀY‖²_F)

and CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)), all sums in float64. ``off`` (and the diagonals)
for all layer pairs come from one of two paths, picked by a cost model (``choose_method``):

* feature: ``‖X_iᵀY_j‖²_F - d·d`` from float64 GEMMs, 2n·(P·Q + Σp² + Σq²) flops for summed widths P, Q.
  Cheap when widths are small against n. Kept in float64: these entries are sums over n examples and
  float32 left errors of ~1e-7 at n = 10⁴, too close to the 1e-6 we promise.
* gram: each layer's Gram in float32, one triangle only (K is symmetric: BLAS syrk on the diagonal tiles,
  GEMM right of them, in row panels), and all pairwise inner products of the stored panels in one batched
  GEMM per panel, summed in float64 chunk by chunk. About n(n+1)·(P+Q) float32 flops; memory bounded by
  the panel size whatever n. With torch on one CPU thread the products run in scipy's OpenBLAS
  (``blas``: syrk for the triangle); on several threads or a GPU in ``torch.mm``, whose tiles hold both
  triangles (up to twice the flops for one panel, 25 % more for panels of n/4). A Gram entry sums p
  products of centred values, and the entries' independent rounding errors average out in the n² terms of ``off`` (≤ 1.2e-7 from float64 in our checks, n = 128..10⁴); a
  single float32 sum over a whole panel was not accurate enough (2e-6 at n = 2000), hence the chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from kd_core.analysis import blas
from kd_core.analysis.cka_math import ArrayLike, as_matrix, check_pair

Method = Literal["auto", "gram", "feature"]
F64 = torch.float64

# Cost model of the two paths, in float64 GEMM flops, fitted with single-core CPU times of both paths on
# four width sets (10..16 up to 10..2048, n = 256..2000) on the 2-core machine of bench/cka.py, which
# prints the model next to measured times (``--model-check``: at the predicted crossover the measured
# gram/feature time ratio was 1.00 and 1.04 on two width sets):
# - a float32 flop costs half a float64 one (GEMM peak of AVX2 / AVX-512 cores and data-centre GPUs);
F32_FLOP = 0.5
# - per stored Gram entry of each layer the gram path also writes it, masks the diagonal tile, reads it back
#   and multiplies it with the same entry of all L layers (2L flops in skinny batched GEMMs): GRAM_ENTRY + 2L
#   float32 flops (fitted: 1.5 ns per entry and layer with L = 16, i.e. 150 float32 flops in all);
GRAM_ENTRY = 120
# - per feature entry, the centring passes and copies (fitted in float64; float32 on the gram path).
PREP_ENTRY = 600
PANEL_BYTES = 256 * 2**20  # float32 Gram panels of all layers at once
MIN_PANEL_ROWS = 256  # thinner panels lose BLAS efficiency and pay more per-call overhead
CHUNK = 4096  # products summed in float32 before the float64 accumulation (65536: 3x the error)
# Below this many examples the gram path stays float64: float32 rounding of the Gram entries only averages
# out over many entries (worst seen, float32, debiased: 4e-4 at n = 4, 2e-6 at n = 16, 1e-7 at n = 128),
# and Grams that small cost microseconds anyway.
F32_MIN_N = 128


def panel_rows(n: int, layers: int) -> int:
    """Rows per Gram panel: ~n/4, at least ``MIN_PANEL_ROWS``, at most what fits ``PANEL_BYTES`` for all
    layers. (Measured with 16 layers of widths 10..2048: 256 rows or n/4 were within 5 % of the best
    of 128..n rows for n = 256..5000.)"""
    fit = max(1, PANEL_BYTES // (4 * layers * n))
    return min(n, fit, max(MIN_PANEL_ROWS, -(-n // 4)))


def gram_entries(n: int, rows: int) -> int:
    """Gram entries one layer's panels hold: each panel spans its rows and every column from its first row."""
    return sum(min(rows, n - s) * (n - s) for s in range(0, n, rows))


def gram_path_cost(n: int, widths_x: Sequence[int], widths_y: Sequence[int]) -> float:
    layers, width = len(widths_x) + len(widths_y), sum(widths_x) + sum(widths_y)
    entries = gram_entries(n, panel_rows(n, layers))
    products = n * (n + 1) * width  # one triangle of each Gram (syrk on the diagonal tiles)
    work = products + entries * layers * (GRAM_ENTRY + 2 * layers) + n * width * PREP_ENTRY
    return work * (F32_FLOP if n >= F32_MIN_N else 1.0)


def feature_path_cost(n: int, widths_x: Sequence[int], widths_y: Sequence[int]) -> float:
    cross = sum(widths_x) * sum(widths_y)
    own = sum(p * p for p in widths_x) + sum(q * q for q in widths_y)
    return 2.0 * n * (cross + own) + n * (sum(widths_x) + sum(widths_y)) * PREP_ENTRY


def choose_method(n: int, widths_x: Sequence[int], widths_y: Sequence[int]) -> Literal["gram", "feature"]:
    """The cheaper path by the cost model (``"feature"`` on ties: it is exact float64)."""
    gram = gram_path_cost(n, widths_x, widths_y)
    return "gram" if gram < feature_path_cost(n, widths_x, widths_y) else "feature"


def _centered(xs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Column-centred copies of the layers ``xs`` in ``dtype``, contiguous views of one allocation (one fresh
    block of memory for all layers, each written once)."""
    n = xs[0].shape[0]
    flat = torch.empty(n * sum(x.shape[1] for x in xs), dtype=dtype, device=xs[0].device)
    out, start = [], 0
    for x in xs:
        out.append(_center_into(x, flat[start : start + x.numel()].view(x.shape)))
        start += x.numel()
    return out


def _center_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` ← ``x`` with its columns centred, in ``out``'s dtype.

    The first mean is taken in the finer of the input's and the target precision (a float64 input with a
    large offset must not be rounded before centring); the second pass removes the rounding of the first
    mean, since the formulas above rely on columns that sum to zero (``K1 = 0``).
    """
    wide = x.to(torch.promote_types(x.dtype, out.dtype))
    torch.sub(wide, _column_mean(wide), out=out)
    out -= _column_mean(out)
    return out


def _column_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(0)`` as a matrix-vector product: BLAS gemv took 0.14 ms where torch's column reduction took
    0.24 ms, for the 16 layers of bench/cka.py at n = 256 (centring is about a tenth of the gram path there)."""
    return torch.full((1, x.shape[0]), 1.0 / x.shape[0], dtype=x.dtype, device=x.device) @ x


def _fill_panel(f: torch.Tensor, s: int, r: int, out: torch.Tensor) -> None:
    """``out`` ← rows ``s:s+r`` of ``f``'s Gram from column ``s`` on: the ``r×r`` diagonal tile (one triangle,
    the other zero) then the block right of it, stored ``[n-s-r, r]`` (column-major, as BLAS writes it)."""
    rows, cols = f[s : s + r], f[s + r :]
    tile, block = out[: r * r].view(r, r), out[r * r :].view(len(cols), r)
    if blas.usable(f):
        blas.gram_upper(rows, tile)
        if len(cols):
            blas.cross(rows, cols, block)
    else:
        torch.mm(rows, rows.T, out=tile).tril_()
        torch.mm(cols, rows.T, out=block)


def _gram_path(xs: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For the given layers: ``Σ_{a≠b} K_ab L_ab`` of their centred Grams (computed in ``dtype``) for every
    pair ``[L, L]`` and each Gram's diagonal ``[L, n]``, both float64.

    A panel holds, per layer, ``K[s:s+r, s:]`` flattened (``_fill_panel``'s layout, the same for all layers);
    its leading ``r×r`` tile keeps one triangle without the diagonal, so every ``a < b`` is counted once.
    Several panels read every centred layer each, so all are centred first; a single panel centres each
    layer just before its Gram, in one reused buffer that BLAS then reads from cache (0.5 ms of 8 at n = 256
    in bench/cka.py, one thread).
    """
    n, layers, device = xs[0].shape[0], len(xs), xs[0].device
    rows = panel_rows(n, layers)
    if rows < n:
        centred = _centered(xs, dtype)
    else:
        scratch = torch.empty(max(x.numel() for x in xs), dtype=dtype, device=device)
    chunks_max = -(-rows * n // CHUNK)
    buf = torch.empty(layers, chunks_max * CHUNK, dtype=dtype, device=device)
    total = torch.zeros(layers, layers, dtype=F64, device=device)
    diag = torch.empty(layers, n, dtype=F64, device=device)
    for s in range(0, n, rows):
        r, c = min(rows, n - s), n - s
        size, chunks = r * c, -(-r * c // CHUNK)
        panel = buf[:, : chunks * CHUNK]
        for i, x in enumerate(xs):
            f = centred[i] if rows < n else _center_into(x, scratch[: x.numel()].view(x.shape))
            _fill_panel(f, s, r, panel[i, :size])
        tile_diagonals = panel[:, : r * r].view(layers, r, r).diagonal(dim1=1, dim2=2)
        diag[:, s : s + r] = tile_diagonals
        tile_diagonals.zero_()
        panel[:, size:].zero_()  # padding of the last chunk
        per_chunk = panel.view(layers, chunks, CHUNK).transpose(0, 1)
        total += torch.bmm(per_chunk, per_chunk.transpose(1, 2)).sum(0, dtype=F64)
    return 2 * total, diag


def _at_b(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return blas.at_b(a, b) if blas.usable(a) else a.T @ b


def _feature_path(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], dx: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For centred float64 layers: ``off`` for every (x, y) pair ``[Lx, Ly]`` and for each layer with
    itself ``[Lx + Ly]``, as ``‖AᵀB‖²_F`` minus the diagonal products (``dx``, ``dy``: Gram diagonals)."""
    ycat = torch.cat(list(ys), dim=1)
    seg = torch.repeat_interleave(
        torch.arange(len(ys), device=ycat.device), torch.tensor([y.shape[1] for y in ys], device=ycat.device)
    )
    full = torch.zeros(len(xs), len(ys), dtype=F64, device=ycat.device)
    for i, x in enumerate(xs):  # ‖X_iᵀY_j‖²: X_iᵀ[Y_1 … Y_L] squared, summed per y layer (memory p_i × ΣQ)
        full[i].index_add_(0, seg, _at_b(x, ycat).square_().sum(0))
    own = torch.stack([torch.linalg.matrix_norm(_at_b(f, f)).square() for f in (*xs, *ys)])
    d = torch.cat([dx, dy])
    return full - dx @ dy.T, own - (d * d).sum(1)


def _scaled_hsic(
    off: torch.Tensor, dd: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, n: int, debiased: bool
) -> torch.Tensor:
    """n(n-3)·HSIC_1 or (n-1)²·HSIC_0 (the factors cancel in CKA) from the module docstring's formula."""
    if debiased:
        return off - 2.0 / (n - 2) * dd + t_a * t_b / ((n - 1) * (n - 2))
    return off + dd


def cka_matrix_from_features(
    xs: Sequence[ArrayLike],
    ys: Sequence[ArrayLike],
    debiased: bool = True,
    method: Method = "auto",
) -> np.ndarray:
    """Full-data linear CKA for every pair of layers: ``out[i, j] = CKA(xs[i], ys[j])``.

    ``xs``/``ys`` are per-layer ``[n, d]`` matrices of the same n examples (4-D maps are flattened), on
    one device. ``method="feature"`` or ``"gram"`` forces a path (see the module docstring); ``"auto"``
    takes the cheaper by ``choose_method``. The gram path agrees with float64 to ~1e-7 (float32 Grams from
    ``F32_MIN_N`` examples on), the feature path to ~1e-12. Returns float64 ``[len(xs), len(ys)]``.
    """
    if not xs or not ys:
        raise ValueError("xs and ys must each hold at least one layer")
    xt = [as_matrix(x, dtype=None) for x in xs]
    yt = [as_matrix(y, device=xt[0].device, dtype=None) for y in ys]
    for t in (*xt[1:], *yt):
        check_pair(xt[0], t)
    n = xt[0].shape[0]
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    if method == "auto":
        method = choose_method(n, [x.shape[1] for x in xt], [y.shape[1] for y in yt])
    if method not in ("gram", "feature"):
        raise ValueError(f"unknown method {method!r}")
    lx = len(xt)
    with blas.one_thread():
        if method == "gram":
            total, diag = _gram_path([*xt, *yt], torch.float32 if n >= F32_MIN_N else F64)
            off, own = total[:lx, lx:], total.diagonal()
        else:
            feats = _centered([*xt, *yt], F64)
            diag = torch.stack([torch.linalg.vector_norm(f, dim=1).square_() for f in feats])
            off, own = _feature_path(feats[:lx], feats[lx:], diag[:lx], diag[lx:])
    dx, dy = diag[:lx], diag[lx:]
    own_x, own_y = own[:lx], own[lx:]
    tx, ty = dx.sum(1), dy.sum(1)
    xy = _scaled_hsic(off, dx @ dy.T, tx[:, None], ty[None, :], n, debiased)
    xx = _scaled_hsic(own_x, (dx * dx).sum(1), tx, tx, n, debiased)
    yy = _scaled_hsic(own_y, (dy * dy).sum(1), ty, ty, n, debiased)
    return (xy / torch.sqrt(xx[:, None] * yy[None, :])).cpu().numpy()


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of two representations ``[n, p1]``, ``[n, p2]`` of the same n examples.

    Biased (Kornblith et al. 2019) or debiased (unbiased HSIC_1); the path is chosen as in
    ``cka_matrix_from_features``. Inputs with more than 2 dims are flattened.
    """
    return float(cka_matrix_from_features([x], [y], debiased=debiased)[0, 0])
