"""Training augmentations, seeded explicitly (never by the global RNG) so a resumed run replays them.

Resident data: random crop with padding and flip on the device, per batch (:func:`augment_batch`).
Streamed image files: random resized crop and flip per image, in the loader's workers
(:func:`random_resized_crop_box`), as in torchvision's ImageNet recipe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augmentation_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of one training batch's crops and flips."""
    return torch.Generator().manual_seed((seed * 7919 + epoch) * 100_003 + batch)


def image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one streamed image's crop and flip in one epoch, whichever worker decodes it."""
    return torch.Generator().manual_seed(((seed * 7919 + epoch) * 1_000_003 + index) % 2**63)


def augment_batch(x: torch.Tensor, *, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding of size/8 and, where valid, horizontal flip, on the tensor batch."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # NHWC, so one gather picks whole pixels
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0][:, None, None] + torch.arange(h, device=x.device)[None, :, None]
    cols = offsets[1][:, None, None] + torch.arange(w, device=x.device)[None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def random_resized_crop_box(height: int, width: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect ``ratio``: torchvision's
    ``RandomResizedCrop.get_params`` (Szegedy et al., 2015), drawn from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    # fallback: the largest centred crop within the ratio bounds
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
