"""Centered kernel alignment (CKA) between layers of a teacher and a student.

Estimators (Kornblith et al., ICML 2019; Nguyen, Raghu, Kornblith, ICLR 2021):

* biased linear / RBF CKA on the full data (``linear_cka``, ``rbf_cka``), matching the google-research
  ``representation_similarity`` demo to float64 precision;
* debiased CKA (Song et al. 2012 unbiased HSIC, computed by U-centering the Gram matrices);
* all-pairs CKA matrix from stored features in one matrix product (``cka_matrix_from_features``);
* streaming minibatch CKA between two models (``cka_matrix``, ``self_similarity``): the unbiased
  HSIC_1 is accumulated per equal-size batch for every layer pair at once, averaged over batches and the
  ratio is taken at the end (average the HSICs, then divide -- not the mean of per-batch CKAs).

Everything numeric is float64. Models are run in ``eval()`` under ``torch.no_grad()`` and their
per-module training flags are restored afterwards.

Layer names are module paths as given by ``model.named_modules()`` (``"layer3"``, ``"layer3.1.conv2"``).
A name with the suffix ``":input"`` taps the *input* of that module through a forward pre-hook, e.g.
``"fc:input"`` is the penultimate embedding of a torchvision ResNet.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

ArrayLike = Union[torch.Tensor, np.ndarray]
Pooling = Literal["flatten", "mean"]

INPUT_SUFFIX = ":input"

__all__ = [
    "CKAResult",
    "FeatureTap",
    "MinibatchCKA",
    "ArrayLike",
    "center_gram",
    "cka_from_grams",
    "cka_matrix",
    "cka_matrix_from_features",
    "extract_features",
    "feature_layers",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "pool_features",
    "rbf_cka",
    "self_similarity",
]


# ----------------------------------------------------------------------------------------------------
# Basic kernels and centering
# ----------------------------------------------------------------------------------------------------


def _as_f64(x: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Return ``x`` as a 2-D float64 tensor ``[n, p]`` (higher-rank inputs are flattened per row)."""
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    t = t.detach()
    if device is not None:
        t = t.to(device)
    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    elif t.ndim > 2:
        t = t.flatten(1)
    return t


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must hold the same examples (rows): {x.shape[0]} != {y.shape[0]}")


def gram_linear(x: ArrayLike) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X Xᵀ`` (float64) of an ``[n, p]`` matrix."""
    t = _as_f64(x)
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
    t = _as_f64(x)
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


# ----------------------------------------------------------------------------------------------------
# Full-data CKA between two matrices, and the all-pairs matrix from stored features
# ----------------------------------------------------------------------------------------------------


def _debiased_helper(
    xty: torch.Tensor,
    r_dot: torch.Tensor,
    sq_x: torch.Tensor,
    sq_y: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """google ``_debiased_dot_product_similarity_helper`` (vectorized over layer pairs)."""
    return xty - n / (n - 2.0) * r_dot + sq_x * sq_y / ((n - 1) * (n - 2))


def _feature_space_matrix(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], debiased: bool
) -> torch.Tensor:
    """All-pairs linear CKA in feature space: one GEMM of the concatenated centered features.

    ``‖Y_jᵀ X_i‖_F²`` for all (i, j) are block sums of the squared ``[ΣP_x, ΣP_y]`` cross product.
    Cost O(n · ΣP_x · ΣP_y) time, O(ΣP_x · ΣP_y) memory -- the route for pooled vectors and large n.
    """
    n = xs[0].shape[0]
    xc = [x - x.mean(0, keepdim=True) for x in xs]
    yc = [y - y.mean(0, keepdim=True) for y in ys]
    xcat = torch.cat(xc, dim=1)
    ycat = torch.cat(yc, dim=1)
    seg_x = torch.repeat_interleave(
        torch.arange(len(xs), device=xcat.device), torch.tensor([x.shape[1] for x in xs], device=xcat.device)
    )
    seg_y = torch.repeat_interleave(
        torch.arange(len(ys), device=ycat.device), torch.tensor([y.shape[1] for y in ys], device=ycat.device)
    )
    cross = (xcat.T @ ycat).square_()  # [ΣPx, ΣPy]
    rows = torch.zeros(len(xs), cross.shape[1], dtype=torch.float64, device=cross.device)
    rows.index_add_(0, seg_x, cross)
    xy = torch.zeros(len(xs), len(ys), dtype=torch.float64, device=cross.device)
    xy.index_add_(1, seg_y, rows)  # [Lx, Ly] = ‖YᵀX‖_F²
    xx = torch.stack([torch.linalg.matrix_norm(x.T @ x) ** 2 for x in xc])  # ‖XᵀX‖_F²
    yy = torch.stack([torch.linalg.matrix_norm(y.T @ y) ** 2 for y in yc])
    if debiased:
        rx = torch.stack([(x * x).sum(1) for x in xc], dim=1)  # [n, Lx] squared row norms
        ry = torch.stack([(y * y).sum(1) for y in yc], dim=1)
        sx, sy = rx.sum(0), ry.sum(0)  # ‖X‖_F²
        xy = _debiased_helper(xy, rx.T @ ry, sx[:, None], sy[None, :], n)
        xx = _debiased_helper(xx, (rx * rx).sum(0), sx, sx, n)
        yy = _debiased_helper(yy, (ry * ry).sum(0), sy, sy, n)
    return xy / torch.sqrt(xx[:, None] * yy[None, :])


def _stacked_centered_grams(feats: Sequence[torch.Tensor], debiased: bool) -> torch.Tensor:
    """Centered linear Grams of each layer, flattened to rows ``[L, n²]``."""
    n = feats[0].shape[0]
    out = torch.empty(len(feats), n * n, dtype=torch.float64, device=feats[0].device)
    for i, f in enumerate(feats):  # one layer at a time: peak memory ~ 2 Grams besides the output
        out[i] = center_gram(f @ f.T, unbiased=debiased).reshape(-1)
    return out


def _gram_space_matrix(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], debiased: bool
) -> torch.Tensor:
    gx = _stacked_centered_grams(xs, debiased)
    gy = _stacked_centered_grams(ys, debiased)
    num = gx @ gy.T
    return num / (torch.linalg.vector_norm(gx, dim=1)[:, None] * torch.linalg.vector_norm(gy, dim=1)[None, :])


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of two representations ``[n, p1]``, ``[n, p2]`` of the same n examples.

    Biased (Kornblith 2019) or debiased (unbiased HSIC_1). Uses the feature-space form when both widths
    are below n, else the Gram form; the two agree to ~1e-12. Inputs with more than 2 dims are flattened.
    """
    xt, yt = _as_f64(x), _as_f64(y)
    _check_pair(xt, yt)
    n = xt.shape[0]
    if max(xt.shape[1], yt.shape[1]) < n:
        return float(_feature_space_matrix([xt], [yt], debiased)[0, 0])
    return float(_gram_space_matrix([xt], [yt], debiased)[0, 0])


def rbf_cka(x: ArrayLike, y: ArrayLike, threshold: float = 0.5, debiased: bool = False) -> float:
    """RBF-kernel CKA with the median bandwidth heuristic (``σ² = threshold² · median(D²)``).

    ``threshold=0.5`` is the value used in Kornblith et al. 2019 and the demo notebook.
    """
    xt, yt = _as_f64(x), _as_f64(y)
    _check_pair(xt, yt)
    return cka_from_grams(gram_rbf(xt, threshold), gram_rbf(yt, threshold), debiased=debiased)


def cka_matrix_from_features(
    xs: Sequence[ArrayLike],
    ys: Sequence[ArrayLike],
    debiased: bool = True,
    method: Literal["auto", "gram", "feature"] = "auto",
) -> np.ndarray:
    """Full-data linear CKA for every pair of layers: ``out[i, j] = CKA(xs[i], ys[j])``.

    ``xs``/``ys`` are per-layer ``[n, d]`` matrices of the same n examples (4-D maps are flattened).
    ``method="gram"``: every layer's Gram is centered once (U-centered if ``debiased``), flattened to a row
    and the whole matrix is ``G_x @ G_yᵀ`` normalized by the row norms (memory ``(Lx+Ly)·n²`` floats).
    ``method="feature"``: one GEMM of the concatenated centered features (memory ``ΣPx·ΣPy``).
    ``"auto"`` picks the smaller of the two. Returns float64 ``[len(xs), len(ys)]``.
    """
    if not xs or not ys:
        raise ValueError("xs and ys must each hold at least one layer")
    xt = [_as_f64(x) for x in xs]
    yt = [_as_f64(y, device=xt[0].device) for y in ys]
    n = xt[0].shape[0]
    for t in (*xt, *yt):
        _check_pair(xt[0], t)
    if method == "auto":
        px, py = sum(t.shape[1] for t in xt), sum(t.shape[1] for t in yt)
        method = "feature" if px * py + px * px < (len(xt) + len(yt)) * n * n else "gram"
    if method == "feature":
        out = _feature_space_matrix(xt, yt, debiased)
    elif method == "gram":
        out = _gram_space_matrix(xt, yt, debiased)
    else:
        raise ValueError(f"unknown method {method!r}")
    return out.cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------


def pool_features(t: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduce a layer output ``[B, C, *spatial]`` to a matrix ``[B, p]``.

    ``"flatten"``: ``C·H·W`` columns. ``"mean"``: average over every dim after the channel dim (global
    average pooling); 2-D outputs are returned as they are.
    """
    if pooling == "flatten":
        return t.flatten(1)
    if pooling == "mean":
        return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
    raise ValueError(f"unknown pooling {pooling!r} (use 'flatten' or 'mean')")


def _first_tensor(obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"cannot take a feature tensor from a {type(obj).__name__}")


class FeatureTap:
    """Context manager that hooks named modules of a model and collects their outputs per forward.

    ``FeatureTap(model, ["layer1", "layer4", "fc:input"])``; after each forward call ``pop()`` returns the
    tensors in the requested order (and clears them). A module that fires more than once in one forward
    (a re-used ``nn.ReLU``) is an error rather than a silent overwrite (the torch_cka misalignment bug).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], detach: bool = True) -> None:
        self.model = model
        self.layers = list(layers)
        self.detach = detach
        self._store: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layer names in {self.layers}")
        names = dict(model.named_modules())
        for layer in self.layers:
            base = layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer
            if base not in names:
                close = [k for k in names if k and (base in k or k in base)][:8]
                raise KeyError(f"model has no module {base!r}" + (f"; similar: {close}" if close else ""))

    def _record(self, key: str, value: Any) -> None:
        if key in self._store:
            raise RuntimeError(
                f"module for layer {key!r} ran more than once in one forward pass; tap a module that is "
                "called exactly once (e.g. a block, not a shared ReLU)"
            )
        t = _first_tensor(value)
        self._store[key] = t.detach() if self.detach else t

    def __enter__(self) -> FeatureTap:
        for layer in self.layers:
            if layer.endswith(INPUT_SUFFIX):
                module = self.model.get_submodule(layer[: -len(INPUT_SUFFIX)])

                def pre_hook(_m: nn.Module, args: tuple[Any, ...], key: str = layer) -> None:
                    self._record(key, args)

                self._handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                module = self.model.get_submodule(layer)

                def hook(_m: nn.Module, _args: Any, output: Any, key: str = layer) -> None:
                    self._record(key, output)

                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    def pop(self) -> list[torch.Tensor]:
        """Tensors of the last forward in the order of ``layers``; raises if a layer did not fire."""
        missing = [k for k in self.layers if k not in self._store]
        if missing:
            self._store.clear()
            raise RuntimeError(f"layers did not run in the forward pass: {missing}")
        out = [self._store[k] for k in self.layers]
        self._store.clear()
        return out


def feature_layers(model: nn.Module, embedding: bool = True, logits: bool = False) -> list[str]:
    """Default CKA layers from ``model.feature_spec``: the stages, then the penultimate embedding
    (``"<classifier>:input"``) and optionally the logits (``"<classifier>"``)."""
    spec = getattr(model, "feature_spec", None)
    if spec is None:
        raise ValueError("model has no feature_spec; pass layer names explicitly")
    layers = list(spec.stages)
    if embedding:
        layers.append(spec.classifier + INPUT_SUFFIX)
    if logits:
        layers.append(spec.classifier)
    return layers


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
        yield _first_tensor(item)


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
        return _stacked_centered_grams(mats, debiased=True)

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
        taps = [stack.enter_context(FeatureTap(u, ns)) for u, ns in zip(unique, names)]
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
    with _ModeGuard(model), FeatureTap(model, layers) as tap:
        for x in _iter_inputs(data):
            for start in range(0, x.shape[0], batch_size):
                model(x[start : start + batch_size].to(device))
                for k, f in zip(layers, tap.pop()):
                    out[k].append(pool_features(f, pooling).to("cpu", dtype))
    return {k: torch.cat(v) for k, v in out.items()}

