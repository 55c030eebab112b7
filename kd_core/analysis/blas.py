"""CPU matrix products for the CKA paths through scipy's OpenBLAS instead of torch's bundled BLAS.

Why: a Gram ``XXᵀ`` is symmetric, and BLAS ``syrk`` computes one triangle for half the flops of the GEMM that
``torch.mm`` runs (torch exposes no syrk). On one core of our 2-core AMD EPYC, ``[256, 2048]`` float32:
syrk 1.43 ms, OpenBLAS GEMM 2.39 ms, ``torch.mm`` 2.58 ms. All functions take C-contiguous CPU tensors of
one dtype (float32 or float64) and write into ``out`` without copies (a C-contiguous ``[m, k]`` block is a
Fortran ``[k, m]`` matrix, so transposes are free). BLAS runs on as many threads as torch
(``torch.get_num_threads()``), inside ``same_threads_as_torch()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController


@cache
def _scipy_blas() -> ThreadpoolController:
    """The thread pools of the BLAS libraries loaded so far (scipy's included, imported above); looked up
    once, since a lookup walks every loaded library (~2 ms) while a limit on the cached set takes ~10 µs."""
    return ThreadpoolController().select(user_api="blas")


@contextmanager
def same_threads_as_torch() -> Iterator[None]:
    """OpenBLAS defaults to one thread per core; a run's thread setting (or a benchmark's) is torch's."""
    with _scipy_blas().limit(limits=torch.get_num_threads()):
        yield


def _routines(t: torch.Tensor):
    if t.dtype == torch.float32:
        return blas.ssyrk, blas.sgemm
    if t.dtype == torch.float64:
        return blas.dsyrk, blas.dgemm
    raise TypeError(f"BLAS products need float32 or float64, got {t.dtype}")


def gram_upper(rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out [r, r]`` (C-contiguous) ← ``rows·rowsᵀ`` for ``rows [r, p]``, one triangle (the lower one in
    ``out``'s C order: the upper of the Fortran matrix BLAS sees); the other triangle is set to zero."""
    syrk, _ = _routines(rows)
    out.zero_()
    syrk(1.0, rows.numpy().T, trans=1, c=out.numpy().T, overwrite_c=1)


def cross(rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (C-contiguous ``[m, r]``) ← ``(rows·colsᵀ)ᵀ`` for ``rows [r, p]``, ``cols [m, p]``: the r×m
    product, stored column-major."""
    _, gemm = _routines(rows)
    gemm(1.0, rows.numpy().T, cols.numpy().T, trans_a=1, c=out.numpy().T, overwrite_c=1)


def at_b(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ·b`` for ``a [n, p]``, ``b [n, q]`` as a new ``[p, q]`` tensor."""
    _, gemm = _routines(a)
    return torch.from_numpy(np.asarray(gemm(1.0, a.numpy().T, b.numpy().T, trans_b=1)))
