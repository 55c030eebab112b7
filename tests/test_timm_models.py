"""timm architectures through create_model: the forward shape and the named feature taps at the two input
sizes the offline datasets use, 28×28×1 (mnist5k) and 32×32×3 (CIFAR-like)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_core.features import FeatureTap
from kd_core.models import MODELS, FeatureSpec, create_model, feature_spec
from kd_core.timm_models import TIMM_ARCHS, token_patch

TIMM = sorted(name for name, info in MODELS.items() if info.family == "timm")


def test_every_timm_arch_is_registered() -> None:
    assert TIMM == sorted(TIMM_ARCHS) and len(TIMM) >= 9


@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", TIMM)
def test_forward_and_feature_taps(name: str, shape: tuple[int, int]) -> None:
    channels, size = shape
    model = create_model(name, 10, channels, size).eval()
    spec = feature_spec(model)
    assert len(spec.stages) >= 3 and isinstance(model.get_submodule(spec.classifier), torch.nn.Linear)
    x = torch.randn(2, channels, size, size)
    with FeatureTap(model, stages=True, embedding=True) as tap, torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert tap.embedding is not None and tap.embedding.shape == (2, model.get_submodule(spec.classifier).in_features)
    assert len(tap.stages) == len(spec.stages) and all(s.dim() == 4 and s.shape[0] == 2 and min(s.shape[2:]) >= 1 for s in tap.stages)
    # the head really reads the tapped embedding: applying it by hand gives the logits
    assert torch.allclose(model.get_submodule(spec.classifier)(tap.embedding), logits, atol=1e-5)


def test_token_stages_are_the_patch_tokens_laid_out_as_a_map() -> None:
    model = create_model("timm:vit_tiny_patch16_224", 10, 1, 28).eval().requires_grad_(False)
    prefix, height, width = feature_spec(model).tokens
    assert (prefix, height, width) == (1, 7, 7) and token_patch(28) == 4 and token_patch(32) == 4
    raw: list[torch.Tensor] = []
    handle = model.get_submodule(feature_spec(model).stages[-1]).register_forward_hook(lambda m, a, out: raw.append(out))
    with FeatureTap(model, stages=True) as tap, torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    handle.remove()
    tokens, grid = raw[0], tap.stages[-1]
    assert grid.shape == (2, 192, 7, 7)
    assert torch.equal(grid[:, :, 2, 5], tokens[:, prefix + 2 * 7 + 5])  # row-major patches, class token dropped


def test_cka_mean_pools_token_stages_over_tokens_not_channels() -> None:
    """A ViT stage is ``[B, tokens, D]``: mean pooling must keep one D-vector per image, as for a conv map, so
    the CKA of a stage with a channel-rotated copy of itself is 1 (averaging over D instead would not be)."""
    from kd_core.analysis import cka_matrix_from_features
    from kd_core.features import pool_features

    model = create_model("timm:vit_tiny_patch16_224", 10, 3, 32).eval()
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(feature_spec(model).stages[-1]).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    handle.remove()
    stage = captured[0]
    assert stage.ndim == 3
    rotation, _ = torch.linalg.qr(torch.randn(stage.shape[2], stage.shape[2], generator=torch.Generator().manual_seed(1)))
    pooled, rotated = pool_features(stage, "mean"), pool_features(stage @ rotation, "mean")
    assert pooled.shape == (64, stage.shape[2])
    cka = cka_matrix_from_features([pooled], [rotated])
    assert float(cka[0, 0]) == pytest.approx(1.0, abs=1e-6)


class _Stage(nn.Module):
    """A conv stage whose output is either its map or that map as tokens behind one (zero) class token."""

    def __init__(self, conv: nn.Conv2d, tokens: bool) -> None:
        super().__init__()
        self.conv, self.tokens = conv, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = torch.relu(self.conv(x))
        if not self.tokens:
            return fmap
        seq = fmap.flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(seq[:, :1]), seq], 1)


class _Net(nn.Module):
    def __init__(self, conv: nn.Conv2d, fc: nn.Linear, tokens: bool) -> None:
        super().__init__()
        self.stage, self.fc, self.tokens = _Stage(conv, tokens), fc, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage(x)
        return self.fc(h[:, 1:].mean(1) if self.tokens else h.mean((2, 3)))


def test_gradcam_of_a_token_stage_equals_captum_on_the_same_stage_as_a_map() -> None:
    """The same network twice: its stage returns a conv map, or the map as tokens (as a ViT block does).
    Grad-CAM on the token version must equal captum's LayerGradCam on the map version."""
    from captum.attr import LayerGradCam

    from kd_core.analysis.attribution import attribute

    torch.manual_seed(0)
    conv, fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 4)
    as_map, as_tokens = _Net(conv, fc, tokens=False), _Net(conv, fc, tokens=True)
    as_tokens.feature_spec = FeatureSpec(("stage",), "fc", tokens=(1, 8, 8))
    as_tokens.requires_grad_(False)  # as a finished run's frozen model
    x, target = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    expected = LayerGradCam(as_map, as_map.stage).attribute(x, target=target, relu_attributions=True)[:, 0]
    got = attribute(as_tokens, x, target, "gradcam")
    assert got.shape == (5, 8, 8) and expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_attribution_maps_of_a_vit_cover_the_image() -> None:
    from kd_core.analysis.attribution import attribute

    model = create_model("timm:vit_tiny_patch16_224", 10, 1, 28).eval().requires_grad_(False)
    maps = attribute(model, torch.randn(3, 1, 28, 28), 0, "gradcam")
    assert maps.shape == (3, 28, 28) and torch.isfinite(maps).all()
