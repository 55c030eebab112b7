"""Modern architectures from timm (Wightman, "PyTorch Image Models", github.com/huggingface/pytorch-image-models),
adapted to small images and given the same named feature layers as the rest of the zoo.

Names are ``timm:<timm model name>``. Transformers and MLP-Mixers get a patch size that keeps a grid of
about 7×7 to 8×8 tokens at the input size (4 at 28 and 32 pixels); ConvNeXt gets a stem stride that
keeps its four stages above 1×1. Stage outputs of token models (``[B, N, D]``) are exposed as maps
``[B, D, H, W]`` (prefix tokens such as the class token dropped), so feature losses and CKA treat them
like a CNN's. timm is imported only when such a model is built.

Given ``pretrained_file`` (a local .safetensors of timm's ImageNet weights, see kd_core.timm_pretrained), the
same builders ask timm to load it: timm itself resamples position and patch embeddings, sums the input conv
to one channel and drops the 1000-class head, so the adapted model is the one built without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

# config name -> (kind, description); the kind picks how the model is built and tapped
TIMM_ARCHS: dict[str, tuple[str, str]] = {
    "timm:vit_tiny_patch16_224": ("vit", "ViT-Ti (Dosovitskiy et al. 2021): 12 blocks, width 192"),
    "timm:vit_small_patch16_224": ("vit", "ViT-S: 12 blocks, width 384"),
    "timm:deit_tiny_patch16_224": ("vit", "DeiT-Ti (Touvron et al. 2021): 12 blocks, width 192"),
    "timm:deit_small_patch16_224": ("vit", "DeiT-S: 12 blocks, width 384"),
    "timm:mixer_s16_224": ("mixer", "MLP-Mixer S (Tolstikhin et al. 2021): 8 blocks, width 512"),
    "timm:convnext_atto": ("convnext", "ConvNeXt-Atto (Liu et al. 2022; timm's smallest): widths 40-320"),
    "timm:convnext_femto": ("convnext", "ConvNeXt-Femto: widths 48-384"),
    "timm:resnet18": ("cnn", "timm ResNet-18 (He et al. 2016)"),
    "timm:mobilenetv3_small_100": ("cnn", "timm MobileNetV3-Small 1.0 (Howard et al. 2019)"),
}
TOKEN_STAGES = 4  # transformer/mixer blocks exposed as stages, evenly spaced, the last one included


def token_patch(image_size: int) -> int:
    """The largest patch size that divides the image and leaves at least 7 tokens a side (1 for tiny inputs)."""
    return max([p for p in range(1, image_size + 1) if image_size % p == 0 and image_size // p >= 7], default=1)


def convnext_stem(image_size: int) -> int:
    """The ConvNeXt stem's patch: ImageNet's 4 from 64 pixels up, 1 below (see _convnext)."""
    return 4 if image_size >= 64 else 1


def _classifier_name(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def _create(timm_name: str, pretrained_file: Path | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with timm's pretrained weights read from ``pretrained_file`` when given."""
    import timm

    if pretrained_file is None:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    # source "timm" makes timm read the overlaid file even where the config names a hub repo (no network)
    overlay = {"file": str(pretrained_file), "source": "timm"}
    return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _evenly(names: list[str], count: int) -> list[str]:
    step = len(names) / count
    return [names[min(len(names) - 1, round((i + 1) * step) - 1)] for i in range(count)] if len(names) > count else names


def _vit(timm_name: str, num_classes: int, in_channels: int, image_size: int,
         pretrained_file: Path | None) -> tuple[nn.Module, list[str], Any]:
    model = _create(timm_name, pretrained_file, num_classes=num_classes, in_chans=in_channels,
                    img_size=image_size, patch_size=token_patch(image_size))
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    return model, _evenly(blocks, TOKEN_STAGES), (model.num_prefix_tokens, *model.patch_embed.grid_size)


def _mixer(timm_name: str, num_classes: int, in_channels: int, image_size: int,
           pretrained_file: Path | None) -> tuple[nn.Module, list[str], Any]:
    from timm.models.mlp_mixer import MlpMixer

    if pretrained_file is not None:  # refused at validation (timm ships no mixer_s16_224 weights); never load partially
        raise ValueError(f"timm has no pretrained weights for {timm_name}")
    # mixer_s16_224's depth and width, with a patch size for small images (timm fixes its patch size per name)
    patch = token_patch(image_size)
    model = MlpMixer(num_classes=num_classes, img_size=image_size, in_chans=in_channels, patch_size=patch, num_blocks=8, embed_dim=512)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    return model, _evenly(blocks, TOKEN_STAGES), (0, image_size // patch, image_size // patch)


def _convnext(timm_name: str, num_classes: int, in_channels: int, image_size: int,
              pretrained_file: Path | None) -> tuple[nn.Module, list[str], Any]:
    # timm's ConvNeXt reduces 4× before the first stage (stem and stage 0 together) unless the stem's patch is 1;
    # below 64 pixels that would leave the last stage at zero size, so the first stage keeps the full resolution
    stem = convnext_stem(image_size)
    model = _create(timm_name, pretrained_file, num_classes=num_classes, in_chans=in_channels, patch_size=stem)
    return model, [f"stages.{i}" for i in range(len(model.stages))], None


def _cnn(timm_name: str, num_classes: int, in_channels: int, image_size: int,
         pretrained_file: Path | None) -> tuple[nn.Module, list[str], Any]:
    model = _create(timm_name, pretrained_file, num_classes=num_classes, in_chans=in_channels)
    return model, [info["module"] for info in model.feature_info][-4:], None


BUILDERS: dict[str, Callable[[str, int, int, int, Path | None], tuple[nn.Module, list[str], Any]]] = {
    "vit": _vit, "mixer": _mixer, "convnext": _convnext, "cnn": _cnn,
}


def build(name: str, num_classes: int, in_channels: int, image_size: int,
          pretrained_file: Path | None = None) -> tuple[nn.Module, list[str], str, Any]:
    """``(model, stage module names, classifier name, token layout or None)`` for ``timm:<name>``."""
    kind, _ = TIMM_ARCHS[name]
    model, stages, tokens = BUILDERS[kind](name.removeprefix("timm:"), num_classes, in_channels, image_size, pretrained_file)
    return model, stages, _classifier_name(model), tokens
