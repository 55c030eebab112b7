"""CPU matrix products for the CKA paths through scipy's OpenBLAS instead of torch's bundled BLAS.

Why: a Gram ``XXᵀ`` is symmetric, and BLAS ``syrk`` computes one triangle for half the flops of the GEMM that
``torch.mm`` runs (torch exposes no syrk). On one core of our 2-core AMD EPYC, ``[256, 2048]`` float32:
syrk 1.43 ms, OpenBLAS GEMM 2.39 ms, ``torch.mm`` 2.58 ms. All functions take C-contiguous CPU tensors of
one dtype (float32 or float64) and write into ``out`` without copies (a C-contiguous ``[m, k]`` block is a
Fortran ``[k, m]`` matrix, so transposes are free). Callers use them where
``usable`` says so, inside ``one_thread()``.
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


def usable(t: torch.Tensor) -> bool:
    """Whether ``t``'s products go through this module: CPU tensors while torch runs on one thread.

    With several threads they stay in torch (``torch.mm``), in torch's own OpenMP pool. After each parallel
    op, torch's OpenMP workers spin for about 10 ms waiting for more work, and OpenBLAS threads started
    beside them fight them for the cores: on our 2 cores the gram path of bench/cka.py (n = 256, 2 threads)
    took 140 ms with 2-thread OpenBLAS calls between torch ops, 9 ms with OpenBLAS on one thread, and
    12-30 ms with 2-thread OpenBLAS right after a parallel torch op even with torch set to one thread
    meanwhile. One BLAS thread on the caller's thread, as torch uses on one thread, never waits.
    """
    return t.device.type == "cpu" and torch.get_num_threads() == 1


@contextmanager
def one_thread() -> Iterator[None]:
    """OpenBLAS defaults to one thread per core; ``usable`` calls it from torch's single thread."""
    with _scipy_blas().limit(limits=1):
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
