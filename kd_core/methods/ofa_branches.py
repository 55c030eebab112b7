"""OFA-KD's projector branches: one per student stage, each turning that stage's features into class logits.

Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023 (arXiv 2310.19444); the structure per architecture family follows the
authors' released code (github.com/Hao840/OFAKD, ``distillers/ofa.py`` and ``distillers/utils.py``):

* a convolutional student (stage maps ``[B, C, H, W]``): depthwise-separable stride-2 blocks, one per stage
  still to come (channels doubling, the last one to ``max(D_s, D_t)``, the two models' embedding widths),
  or a 1×1 convolution for the last stage; then global average pooling and a linear classifier;
* a token student (ViT, MLP-Mixer; stage maps are token grids): patch merging down to a grid of about 7×7,
  a few transformer blocks (4 heads; ``max(S − i, 1)`` of them for stage i of S), global average pooling of
  the tokens and a linear classifier.

Weights are initialised as the released code does (Kaiming-normal convolutions, truncated-normal σ=0.02
linear layers, batch norm at identity).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SepConv(nn.Module):
    """Two depthwise-separable convolutions, the first with stride 2: halves the resolution, ``cin`` → ``cout``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cin, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cin, 3, stride=1, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """Swin-style merging of 2×2 neighbouring tokens (LayerNorm, then a linear map of the 4 concatenated tokens).

    Works on maps ``[B, D, H, W]``; an odd side is padded with zeros first.
    """

    def __init__(self, dim: int, out_dim: int, activation: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        y = self.act(self.reduction(self.norm(x.permute(0, 2, 3, 1))))
        return y.permute(0, 3, 1, 2)


class ConvBranch(nn.Module):
    """Stage map ``[B, C, H, W]`` of a convolutional student → class logits."""

    def __init__(self, channels: int, blocks_to_go: int, width: int, num_classes: int) -> None:
        super().__init__()
        if blocks_to_go == 0:
            down: list[nn.Module] = [nn.Conv2d(channels, width, 1)]
        else:
            down, cin = [], channels
            for i in range(blocks_to_go):
                cout = width if i == blocks_to_go - 1 else cin * 2
                down.append(SepConv(cin, cout))
                cin *= 2
        self.down = nn.Sequential(*down)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(x).mean((2, 3)))


class TokenBranch(nn.Module):
    """Stage map ``[B, D, H, W]`` of a token student (its tokens on their grid) → class logits."""

    FINAL_GRID = 7  # the released code merges patches until about 7×7 remain
    HEADS = 4

    def __init__(self, dim: int, grid: int, width: int, num_blocks: int, num_classes: int) -> None:
        from timm.models.vision_transformer import Block

        super().__init__()
        merges = max(int(math.log2(grid / self.FINAL_GRID)), 0) if grid > 0 else 0
        layers: list[nn.Module] = []
        for i in range(merges):  # the first merge projects to the student's embedding width; GELU after all but the last
            layers.append(PatchMerging(dim if i == 0 else width, width, activation=i == 0 or i != merges - 1))
        if not merges and dim != width:  # (not in the released code, where the stage width is the embedding width)
            layers.append(nn.Conv2d(dim, width, 1))
        self.merge = nn.Sequential(*layers)
        if width % self.HEADS:
            raise ValueError(f"OFA's token branches use {self.HEADS} attention heads; the student's width {width} is not divisible by {self.HEADS}")
        self.blocks = nn.Sequential(*[Block(dim=width, num_heads=self.HEADS) for _ in range(num_blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.merge(x).flatten(2).transpose(1, 2)  # [B, H*W, D]
        return self.head(self.blocks(tokens).mean(1))


def init_branch_weights(module: nn.Module) -> None:
    """The released code's initialisation of the projectors."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def make_branch(stage: int, num_stages: int, shape: tuple[int, int, int], tokens: bool, student_dim: int, teacher_dim: int,
                num_classes: int) -> nn.Module:
    """The branch of 1-based ``stage`` (of ``num_stages``) with stage output ``shape`` = (C, H, W)."""
    channels, height, width = shape
    if tokens:
        return TokenBranch(channels, max(height, width), student_dim, max(num_stages - stage, 1), num_classes)
    return ConvBranch(channels, num_stages - stage, max(student_dim, teacher_dim), num_classes)
