"""Centered kernel alignment (CKA) between layers of a teacher and a student: hooks and the minibatch runner.

Estimators (Kornblith et al. 2019, arXiv 1905.00414; Nguyen, Raghu, Kornblith 2021, arXiv 2010.15327):

* biased linear / RBF CKA on the full data (``linear_cka``, ``rbf_cka``), matching the google-research
  ``representation_similarity`` demo; debiased CKA (Song et al. 2012 unbiased HSIC) -- in ``cka_math``
  (kernels, centering) and ``cka_linear`` (linear CKA from features, the all-pairs matrix
  ``cka_matrix_from_features`` and its cost model), re-exported here;
* streaming minibatch CKA between two models (``cka_matrix``, ``self_similarity``), in this module: the
  unbiased HSIC_1 is accumulated per equal-size batch for every layer pair at once, averaged over batches
  and the ratio is taken at the end (average the HSICs, then divide -- not the mean of per-batch CKAs).

The minibatch estimator is float64. Models are run in ``eval()`` under ``torch.no_grad()`` and their
per-module training flags are restored afterwards.

Layer names are module paths as given by ``model.named_modules()`` (``"layer3"``, ``"layer3.1.conv2"``),
tapped by ``kd_core.features.LayerTap``. A name with the suffix ``":input"`` taps the *input* of that module
through a forward pre-hook, e.g. ``"fc:input"`` is the penultimate embedding of a torchvision ResNet.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_core.analysis.cka_linear import cka_matrix_from_features, linear_cka
from kd_core.analysis.cka_math import (
    ArrayLike,
    center_gram,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    rbf_cka,
    stacked_centered_grams,
)
from kd_core.features import LayerTap, Pooling, feature_layers, first_tensor, pool_features

__all__ = [
    "CKAResult",
    "MinibatchCKA",
    "ArrayLike",
    "center_gram",
    "cka_from_grams",
    "cka_matrix",
    "cka_matrix_from_features",
    "extract_features",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "rbf_cka",
    "self_similarity",
]


class _ModeGuard:
    """Put a model in eval() and restore every module's training flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _iter_inputs(data: torch.Tensor | Iterable[Any]) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for item in data:
        if isinstance(item, dict):
            raise TypeError("dict batches are not supported; yield tensors or (inputs, ...) tuples")
        yield first_tensor(item)


class _Rebatcher:
    """Re-chunk a stream of input batches into batches of exactly ``batch_size``.

    Iterating yields the batches; afterwards ``dropped`` holds the size of the unused ragged remainder.
    """

    def __init__(self, data: torch.Tensor | Iterable[Any], batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.dropped = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        buf: list[torch.Tensor] = []
        have = 0
        for x in _iter_inputs(self.data):
            buf.append(x)
            have += x.shape[0]
            while have >= self.batch_size:
                cat = torch.cat(buf) if len(buf) > 1 else buf[0]
                yield cat[: self.batch_size]
                rest = cat[self.batch_size :]
                buf = [rest] if rest.shape[0] else []
                have = rest.shape[0]
        self.dropped = have


# ----------------------------------------------------------------------------------------------------
# Minibatch CKA
# ----------------------------------------------------------------------------------------------------


class MinibatchCKA:
    """Streaming accumulator of the minibatch debiased linear CKA matrix (Nguyen et al. 2021).

    For every batch of the same size b, call ``update(xs, ys)`` with per-layer features ``[b, p]``. Each
    layer's linear Gram is U-centered and flattened; one GEMM per batch adds ``U_x U_yᵀ`` (= b(b-3)·HSIC_1
    for all pairs), and the diagonals ``‖U_x‖²``, ``‖U_y‖²`` are accumulated. ``compute()`` returns
    ``ΣHSIC_1(x,y) / sqrt(ΣHSIC_1(x,x) · ΣHSIC_1(y,y))``; the 1/k and b(b-3) factors cancel because all
    batches have the same size (enforced). ``ys=None`` (self-similarity) reuses ``xs``.
    """

    def __init__(self, num_x: int, num_y: int | None = None, device: torch.device | str = "cpu") -> None:
        self.self_mode = num_y is None
        ny = num_x if num_y is None else num_y
        self.xy = torch.zeros(num_x, ny, dtype=torch.float64, device=device)
        self.xx = torch.zeros(num_x, dtype=torch.float64, device=device)
        self.yy = torch.zeros(ny, dtype=torch.float64, device=device)
        self.batch_size: int | None = None
        self.batches = 0
        self.device = device

    def centered_grams(self, feats: Sequence[torch.Tensor], pooling: Pooling = "flatten") -> torch.Tensor:
        """Pool, cast to float64 and U-center the linear Gram of each layer: ``[L, b²]`` rows."""
        mats = [pool_features(f, pooling).to(device=self.device, dtype=torch.float64) for f in feats]
        return stacked_centered_grams(mats, debiased=True)

    def _check_batch(self, b: int) -> None:
        if self.batch_size is None:
            if b < 4:
                raise ValueError(f"minibatch CKA needs batches of at least 4 examples, got {b}")
            self.batch_size = b
        elif b != self.batch_size:
            raise ValueError(f"all batches must have the same size ({self.batch_size}), got {b}")

    def update(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor] | None = None,
        pooling: Pooling = "flatten",
    ) -> None:
        """Add one batch. ``xs``/``ys``: per-layer tensors with the same batch size (>= 4)."""
        self._check_batch(xs[0].shape[0])
        ux = self.centered_grams(xs, pooling)
        uy = None if ys is None else self.centered_grams(ys, pooling)
        self.update_centered(ux, uy)

    def update_centered(self, ux: torch.Tensor, uy: torch.Tensor | None = None) -> None:
        """Add one batch given its stacked U-centered Grams ``[L, b²]`` (from ``centered_grams``)."""
        self._check_batch(math.isqrt(ux.shape[1]))
        if self.self_mode:
            if uy is not None:
                raise ValueError("self-similarity accumulator takes xs only")
            gram = ux @ ux.T
            self.xy += gram
            self.xx += torch.diagonal(gram)
        else:
            if uy is None:
                raise ValueError("ys is required")
            self.xy += ux @ uy.T
            self.xx += (ux * ux).sum(1)
            self.yy += (uy * uy).sum(1)
        self.batches += 1

    def compute(self) -> np.ndarray:
        """The CKA matrix ``[Lx, Ly]`` (float64 NumPy)."""
        if self.batches == 0:
            raise RuntimeError("no batch was accumulated")
        yy = self.xx if self.self_mode else self.yy
        den = torch.sqrt(self.xx[:, None] * yy[None, :])
        return (self.xy / den).cpu().numpy()


@dataclass
class CKAResult:
    """A CKA matrix between layers of two models (rows: ``x_layers``, columns: ``y_layers``)."""

    matrix: np.ndarray
    x_layers: list[str]
    y_layers: list[str]
    n: int  # examples used (batches × batch_size)
    batch_size: int
    n_batches: int
    pooling: str
    estimator: str = "minibatch_debiased_linear"
    n_dropped: int = 0  # examples of a ragged remainder that were not used
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher_layers(self) -> list[str]:
        """Alias of ``x_layers`` for ``cka_matrix(teacher, student, ...)``."""
        return self.x_layers

    @property
    def student_layers(self) -> list[str]:
        """Alias of ``y_layers`` for ``cka_matrix(teacher, student, ...)``."""
        return self.y_layers


def _check_device(model: nn.Module, device: torch.device | str) -> None:
    p = next(iter(model.parameters()), None)
    want = torch.device(device)
    if p is not None and (
        p.device.type != want.type or (want.index is not None and p.device.index != want.index)
    ):
        raise ValueError(f"model parameters are on {p.device}, but device={device!r}; move the model first")


@torch.no_grad()
def _run_minibatch(
    models: Sequence[nn.Module],
    layer_lists: Sequence[Sequence[str]],
    data: torch.Tensor | Iterable[Any],
    batch_size: int,
    pooling: Pooling,
    device: torch.device | str,
    max_batches: int | None,
) -> tuple[MinibatchCKA, int]:
    for m in models:
        _check_device(m, device)
    self_mode = len(models) == 1
    acc = MinibatchCKA(len(layer_lists[0]), None if self_mode else len(layer_lists[1]), device=device)
    # the same module object passed as teacher and student is hooked and run once
    unique: list[nn.Module] = []
    for m in models:
        if not any(m is u for u in unique):
            unique.append(m)
    names: list[list[str]] = [[] for _ in unique]
    for m, ls in zip(models, layer_lists):
        k = next(i for i, u in enumerate(unique) if u is m)
        names[k].extend(l for l in ls if l not in names[k])
    dropped = 0
    with ExitStack() as stack:
        for u in unique:
            stack.enter_context(_ModeGuard(u))
        taps = [stack.enter_context(LayerTap(u, ns)) for u, ns in zip(unique, names)]
        batches = _Rebatcher(data, batch_size)
        for x in batches:
            x = x.to(device)
            # per model: forward, then immediately reduce its maps to U-centered Grams (frees the maps)
            grams = []
            for u, tap, ns in zip(unique, taps, names):
                u(x)
                grams.append(acc.centered_grams(tap.pop(), pooling))
            side = []
            for m, ls in zip(models, layer_lists):
                k = next(i for i, u in enumerate(unique) if u is m)
                side.append(grams[k][[names[k].index(n) for n in ls]])
            acc.update_centered(side[0], None if self_mode else side[1])
            if max_batches is not None and acc.batches >= max_batches:
                break
        else:
            dropped = batches.dropped
    if acc.batches == 0:
        raise ValueError(f"data holds fewer than batch_size={batch_size} examples")
    if dropped:
        warnings.warn(f"minibatch CKA dropped a ragged remainder of {dropped} examples", stacklevel=3)
    return acc, dropped


def cka_matrix(
    teacher: nn.Module,
    student: nn.Module,
    data: torch.Tensor | Iterable[Any],
    teacher_layers: Sequence[str] | None = None,
    student_layers: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    pooling: Pooling = "flatten",
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> CKAResult:
    """Minibatch debiased linear CKA between every teacher layer and every student layer, in one pass.

    ``data``: an input tensor ``[N, ...]`` or an iterable of input batches (tensors or ``(inputs, ...)``
    tuples, e.g. a DataLoader with ``shuffle=False``); it is re-chunked into batches of exactly
    ``batch_size`` and the ragged remainder is dropped (equal sizes keep the estimator's weights equal).
    Both models are hooked once, run in ``eval()`` under ``no_grad`` on ``device`` (they must already be
    there), and their training flags are restored. Layer lists default to ``feature_layers(model)``.
    Result rows are teacher layers, columns student layers.
    """
    tl = list(teacher_layers) if teacher_layers is not None else feature_layers(teacher)
    sl = list(student_layers) if student_layers is not None else feature_layers(student)
    acc, dropped = _run_minibatch(
        [teacher, student], [tl, sl], data, batch_size, pooling, device, max_batches
    )
    return CKAResult(
        matrix=acc.compute(),
        x_layers=tl,
        y_layers=sl,
        n=acc.batches * batch_size,
        batch_size=batch_size,
        n_batches=acc.batches,
        pooling=pooling,
        n_dropped=dropped,
    )


def self_similarity(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    pooling: Pooling = "flatten",
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> CKAResult:
    """Minibatch debiased linear CKA of a model's layers with each other (symmetric, unit diagonal).

    One forward per batch; the layer-by-layer matrix is ``U Uᵀ`` of the stacked U-centered Grams.
    """
    ls = list(layers) if layers is not None else feature_layers(model)
    acc, dropped = _run_minibatch([model], [ls], data, batch_size, pooling, device, max_batches)
    return CKAResult(
        matrix=acc.compute(),
        x_layers=ls,
        y_layers=list(ls),
        n=acc.batches * batch_size,
        batch_size=batch_size,
        n_batches=acc.batches,
        pooling=pooling,
        n_dropped=dropped,
    )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    layers: Sequence[str],
    *,
    batch_size: int = 256,
    pooling: Pooling = "mean",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Pooled features ``{layer: [N, p]}`` (CPU) of all examples of ``data`` (nothing dropped).

    Useful for prototypes (``"fc:input"`` is the embedding) and for the full-data CKA estimators.
    """
    _check_device(model, device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    with _ModeGuard(model), LayerTap(model, layers) as tap:
        for x in _iter_inputs(data):
            for start in range(0, x.shape[0], batch_size):
                model(x[start : start + batch_size].to(device))
                for k, f in zip(layers, tap.pop()):
                    out[k].append(pool_features(f, pooling).to("cpu", dtype))
    return {k: torch.cat(v) for k, v in out.items()}

