"""Attribution maps (captum) for teacher/student comparison, and map-similarity measures.

Every map is computed on a deep copy of the model in ``eval()`` with in-place activations switched off
(in-place ReLUs break captum's backward hooks), with gradients forced on (works even
when the caller is under ``torch.no_grad()`` / ``inference_mode``). The caller's model is never touched.
Maps are reduced to ``[N, H, W]`` on the input grid so teacher and student maps are directly comparable.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.features import tokens_to_map

AttrMethod = Literal["saliency", "integrated_gradients", "smoothgrad", "gradcam", "occlusion"]
Reduce = Literal["abs_sum", "sum", "l2"]
Target = Union[int, Sequence[int], torch.Tensor]

METHODS: tuple[str, ...] = ("saliency", "integrated_gradients", "smoothgrad", "gradcam", "occlusion")

__all__ = [
    "METHODS",
    "attribute",
    "compare_maps",
    "default_gradcam_layer",
    "normalize_maps",
    "prepare_model",
    "random_topk_iou",
    "reduce_channels",
]


def prepare_model(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` in eval mode with every ``inplace`` flag (ReLU, ReLU6, Dropout…) False."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False  # type: ignore[assignment]
    return m.eval()


def default_gradcam_layer(model: nn.Module) -> str:
    """The last spatial stage: ``model.feature_spec.stages[-1]`` (the last convolutional stage, as in Grad-CAM, Selvaraju et al. ICCV 2017)."""
    spec = getattr(model, "feature_spec", None)
    if spec is None or not spec.stages:
        raise ValueError("gradcam needs layer= (a module name) for models without feature_spec")
    return str(spec.stages[-1])


def token_gradcam(
    net: nn.Module, layer: nn.Module, tokens: tuple[int, int, int], x: torch.Tensor, target: torch.Tensor, relu: bool
) -> torch.Tensor:
    """Grad-CAM ``[N, 1, h, w]`` of a token layer (ViT, MLP-Mixer): its ``[N, prefix + h·w, D]`` output and
    gradient are laid out as ``[N, D, h, w]`` maps first (the reshape of Chefer et al.'s and pytorch-grad-cam's
    ViT recipes), then channel weights = the spatial mean of the gradient, as for a conv map. Captum's
    LayerGradCam would average over D and sum over the tokens instead."""
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    try:  # the input carries the graph: the network's own parameters may all be frozen
        logits = net(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), captured["out"])
    fmap, gmap = tokens_to_map(captured["out"].detach(), *tokens), tokens_to_map(grad, *tokens)
    cam = (gmap.mean(dim=(2, 3), keepdim=True) * fmap).sum(1, keepdim=True)
    return F.relu(cam) if relu else cam


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    if isinstance(layer, str):
        return layer
    for name, mod in model.named_modules():
        if mod is layer:
            return name
    raise ValueError("layer module is not a submodule of model")


def reduce_channels(attr: torch.Tensor, reduce: Reduce = "abs_sum") -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, H, W]``: sum of |a| (default), signed sum, or L2 norm over channels."""
    if attr.ndim == 3:
        return attr
    if reduce == "abs_sum":
        return attr.abs().sum(1)
    if reduce == "sum":
        return attr.sum(1)
    if reduce == "l2":
        return torch.linalg.vector_norm(attr, dim=1)
    raise ValueError(f"unknown reduce {reduce!r}")


def _target(target: Target, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(target, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for {n} images")
    return t.contiguous()


def _occlusion_window(shape: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Window and stride sized to the image: 4×4 / stride 2 up to 64 px (32×32 CIFAR),
    about H/15 with half-window stride above (15×15 / 8 on 224 px)."""
    c, h, w = shape
    side_h = 4 if h <= 64 else max(4, round(h / 15))
    side_w = 4 if w <= 64 else max(4, round(w / 15))
    side_h, side_w = min(side_h, h), min(side_w, w)
    return (c, side_h, side_w), (c, max(1, (side_h + 1) // 2), max(1, (side_w + 1) // 2))


def attribute(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    method: AttrMethod,
    *,
    layer: str | nn.Module | None = None,
    seed: int = 0,
    internal_batch_size: int = 64,
    baselines: torch.Tensor | float | None = None,
    reduce: Reduce | None = None,
    n_steps: int = 50,
    nt_samples: int = 20,
    noise_level: float = 0.15,
    relu_gradcam: bool = True,
    sliding_window: tuple[int, int, int] | None = None,
    strides: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Attribution map ``[N, H, W]`` (float32, detached, on the images' device) for one method.

    - ``"saliency"``: ``|∂y_c/∂x|``.
    - ``"integrated_gradients"``: captum IG, ``n_steps`` Gauss-Legendre steps, ``baselines`` (default 0 =
      the normalization mean), chunked by ``internal_batch_size``.
    - ``"smoothgrad"``: ``NoiseTunnel(Saliency)`` with ``nt_samples`` draws of Gaussian noise of std
      ``noise_level · (max − min)`` of the batch (SmoothGrad's 10–20 % of the input range), seeded by
      ``seed`` inside ``torch.random.fork_rng`` (global RNG state untouched).
    - ``"gradcam"``: ``LayerGradCam`` on ``layer`` (module name or module; default
      ``feature_spec.stages[-1]``), ReLU'd when ``relu_gradcam`` (the paper's form), upsampled bilinearly
      to the input size with ``LayerAttribution.interpolate``.
    - ``"occlusion"``: ``Occlusion`` with a window sized to the image (``_occlusion_window``) unless
      ``sliding_window``/``strides`` are given; baseline ``baselines`` (default 0).

    ``reduce``: channel reduction, default ``"abs_sum"`` for input-gradient methods and the signed map for
    Grad-CAM (already 1 channel). ``target``: an int or one class per image -- pass the same targets for
    teacher and student. The model must live on the images' device; it is deep-copied, not modified.
    """
    from captum.attr import (
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Occlusion,
        Saliency,
    )

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    with torch.inference_mode(False), torch.enable_grad():
        net = prepare_model(model)
        x = images.detach().clone().requires_grad_(method == "saliency")
        tgt = _target(target, n, x.device)
        if isinstance(baselines, torch.Tensor):
            baselines = baselines.detach().clone().to(x.device)
        attr: torch.Tensor
        if method == "saliency":
            attr = Saliency(net).attribute(x, target=tgt, abs=True)
        elif method == "integrated_gradients":
            attr = IntegratedGradients(net).attribute(
                x, baselines=baselines, target=tgt, n_steps=n_steps, internal_batch_size=internal_batch_size
            )
        elif method == "smoothgrad":
            stdev = float(noise_level * (x.max() - x.min()))
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                attr = NoiseTunnel(Saliency(net)).attribute(
                    x,
                    nt_type="smoothgrad",
                    nt_samples=nt_samples,
                    nt_samples_batch_size=max(1, internal_batch_size // max(1, n)),
                    stdevs=stdev,
                    target=tgt,
                )
        elif method == "gradcam":
            name = _layer_name(model, layer) if layer is not None else default_gradcam_layer(model)
            tokens = getattr(getattr(net, "feature_spec", None), "tokens", None)
            if tokens is not None:
                cam = token_gradcam(net, net.get_submodule(name), tokens, x, tgt, relu_gradcam)
            else:
                cam = LayerGradCam(net, net.get_submodule(name)).attribute(
                    x, target=tgt, relu_attributions=relu_gradcam
                )
            attr = LayerAttribution.interpolate(cam, (h, w), interpolate_mode="bilinear")
            if reduce is None:
                reduce = "sum"
        else:  # occlusion
            win, stride = _occlusion_window(x.shape[1:])
            win = tuple(sliding_window) if sliding_window is not None else win  # type: ignore[assignment]
            stride = tuple(strides) if strides is not None else stride  # type: ignore[assignment]
            attr = Occlusion(net).attribute(
                x,
                sliding_window_shapes=win,
                strides=stride,
                baselines=baselines,
                target=tgt,
                perturbations_per_eval=max(1, internal_batch_size // max(1, n)),
            )
    return reduce_channels(attr.detach(), reduce or "abs_sum").float()


# ----------------------------------------------------------------------------------------------------
# Comparing maps
# ----------------------------------------------------------------------------------------------------


def _as_maps(m: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(m) if isinstance(m, np.ndarray) else m.detach()
    t = t.to("cpu", torch.float64)
    if t.ndim == 2:
        t = t[None]
    if t.ndim == 4:  # [N, C, H, W] → sum of |·| over channels
        t = t.abs().sum(1)
    if t.ndim != 3:
        raise ValueError(f"maps must be [H, W], [N, H, W] or [N, C, H, W], got {tuple(t.shape)}")
    return t


def _rank_avg(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks with ties averaged (scipy ``rankdata(method='average')``), vectorized."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(x.numpy(), axis=1, method="average"))


def random_topk_iou(k: float) -> float:
    """Expected top-k IoU of two independent random maps for the top fraction ``k``: ``k / (2 − k)``."""
    return k / (2 - k)


def compare_maps(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    k: float = 0.1,
    absolute: bool = True,
) -> dict[str, Any]:
    """Per-image similarity of two sets of attribution maps (e.g. teacher vs student, same images/targets).

    Maps ``[N, H, W]`` (or ``[H, W]``); if the grids differ, both are resized bilinearly to the larger one.
    ``absolute``: compare ``|map|`` (gradient signs are unstable).
    Returns ``spearman`` ``[N]`` (rank correlation, average ranks for ties, Adebayo et al. 2018),
    ``iou`` ``[N]`` (IoU of the top ``k`` fraction of pixels of each map), their means, ``k`` and
    ``iou_random`` (= k/(2−k), the expectation for independent random maps, as a reference line).
    Constant maps give NaN Spearman.
    """
    if not 0 < k <= 1:
        raise ValueError("k is a fraction in (0, 1]")
    ta, tb = _as_maps(a), _as_maps(b)
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(f"different numbers of maps: {ta.shape[0]} vs {tb.shape[0]}")
    if ta.shape[1:] != tb.shape[1:]:
        size = (max(ta.shape[1], tb.shape[1]), max(ta.shape[2], tb.shape[2]))
        ta = F.interpolate(ta[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        tb = F.interpolate(tb[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if absolute:
        ta, tb = ta.abs(), tb.abs()
    fa, fb = ta.flatten(1), tb.flatten(1)
    n, p = fa.shape
    ra, rb = _rank_avg(fa), _rank_avg(fb)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.linalg.vector_norm(ra, dim=1) * torch.linalg.vector_norm(rb, dim=1)
    spearman = (ra * rb).sum(1) / den
    spearman[den == 0] = float("nan")
    m = max(1, int(round(k * p)))
    ma = torch.zeros(n, p, dtype=torch.bool).scatter_(1, fa.topk(m, dim=1).indices, True)
    mb = torch.zeros(n, p, dtype=torch.bool).scatter_(1, fb.topk(m, dim=1).indices, True)
    iou = (ma & mb).sum(1).double() / (ma | mb).sum(1).double()
    frac = m / p
    return {
        "spearman": spearman.numpy(),
        "iou": iou.numpy(),
        "spearman_mean": float(np.nanmean(spearman.numpy())) if n else float("nan"),
        "iou_mean": float(iou.mean()) if n else float("nan"),
        "k": frac,
        "iou_random": random_topk_iou(frac),
    }


def normalize_maps(
    maps: torch.Tensor | Sequence[torch.Tensor],
    mode: Literal["joint", "per_map"] = "joint",
    outlier_perc: float = 2.0,
) -> torch.Tensor | list[torch.Tensor]:
    """Scale maps to [−1, 1] for display: divide by the ``(100 − outlier_perc)``-th percentile of |values|
    and clip.

    ``maps``: ``[N, H, W]`` or a sequence of such tensors (e.g. ``[teacher_maps, student_maps]``).
    ``"joint"``: one scale over everything given, so magnitudes stay comparable between teacher and
    student (captum's visualizer scales each map separately -- fine for looks, wrong for magnitudes).
    ``"per_map"``: one scale per ``[H, W]`` map. Returns the same structure as given.
    """
    single = isinstance(maps, torch.Tensor)
    seq = [maps] if single else list(maps)  # type: ignore[list-item]
    q = 1.0 - outlier_perc / 100.0

    def scale_of(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().abs().flatten().double()
        if flat.numel() > 16_000_000:  # torch.quantile limit
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]]
        s = torch.quantile(flat, q) if q < 1 else flat.max()
        return s if s > 0 else torch.ones((), dtype=torch.float64)

    out: list[torch.Tensor] = []
    if mode == "joint":
        s = scale_of(torch.cat([t.reshape(-1) for t in seq]))
        out = [(t / s.to(t)).clamp(-1, 1) for t in seq]
    elif mode == "per_map":
        for t in seq:
            tt = t if t.ndim == 3 else t[None]
            scales = torch.stack([scale_of(m) for m in tt]).to(tt)
            r = (tt / scales[:, None, None]).clamp(-1, 1)
            out.append(r if t.ndim == 3 else r[0])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out[0] if single else out
