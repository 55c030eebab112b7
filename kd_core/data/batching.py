"""The order of training batches (seeded per epoch) and sequential batches for evaluation."""

from __future__ import annotations

from typing import Iterator

import torch

# BatchNorm in training mode and every relation or contrastive term need at least two samples a batch
MIN_BATCH = 2


def num_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`batch_indices` makes of ``n`` samples."""
    full, rest = divmod(n, batch_size)
    return full + int(rest >= MIN_BATCH or full == 0)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's batches of indices. Seeded by (seed, epoch), so a resumed epoch replays the same order.

    A last batch smaller than :data:`MIN_BATCH` joins the one before it, so no sample is dropped.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < MIN_BATCH:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def iterate(x, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential batches of ``x`` (a tensor or an :class:`~kd_core.data.images.ImageSet`) and ``y``, for evaluation."""
    from kd_core.data.images import ImageSet

    if isinstance(x, ImageSet):
        start = 0
        for xb in x.batches(batch_size):
            yield xb, y[start : start + len(xb)]
            start += len(xb)
        return
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def image_batches(x, batch_size: int) -> Iterator[torch.Tensor]:
    """Sequential batches of images alone (a tensor or an :class:`~kd_core.data.images.ImageSet`), for inference."""
    from kd_core.data.images import ImageSet

    if isinstance(x, ImageSet):
        yield from x.batches(batch_size)
        return
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]
