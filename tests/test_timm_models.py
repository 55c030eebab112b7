"""timm architectures through create_model: the forward shape and the named feature taps at the two input
sizes the offline datasets use, 28×28×1 (mnist5k) and 32×32×3 (CIFAR-like)."""

from __future__ import annotations

import pytest
import torch

from kd_core.features import FeatureTap
from kd_core.models import MODELS, create_model, feature_spec
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
    model = create_model("timm:vit_tiny_patch16_224", 10, 1, 28).eval()
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
    from kd_core.analysis import cka_matrix_from_features, pool_features

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
