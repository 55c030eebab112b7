"""Label-free representations, scored with labels: a k-NN classifier and a linear probe on frozen embeddings.

The protocol of "Random Teachers are Good Teachers" (Sarnthein, Bachmann, Anagnostidis, Hofmann, ICML 2023;
code safelix/dinopl, ``dinopl/probing.py``): embeddings of the training split (eval mode, no augmentation)
fit the probe, embeddings of a held-out split score it.

* Standardisation (dinopl's ``normalize_probe``, on by default there): every feature is shifted by the
  training split's mean and divided by its standard deviation (N−1), a standard deviation below
  10·machine-epsilon counting as 1, as scikit-learn's ``StandardScaler`` does.
* k-NN: Euclidean distance (dinopl uses a flat faiss L2 index), k = 20, majority vote of the neighbours'
  labels; a tied vote goes to the smallest label (as scikit-learn's ``KNeighborsClassifier``).
* Linear probe: ``nn.Linear`` with PyTorch's default uniform initialisation, AdamW with PyTorch's defaults
  (lr 1e-3, weight decay 0.01), 10 epochs of shuffled batches of 256, cross-entropy.

Everything is seeded by the caller, so a probe fitted twice on the same embeddings is the same probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROBE_BATCH = 256  # dinopl's bs_eval
PROBE_LR = 1e-3  # torch.optim.AdamW's defaults, which dinopl's LinearAnalysis uses
PROBE_WEIGHT_DECAY = 0.01
KNN_QUERY_CHUNK = 1024  # query rows per distance matrix, so 50,000 training embeddings fit in memory


@dataclass
class Standardizer:
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        """Mean and standard deviation (N−1) of each column of ``x``; near-constant columns get std 1."""
        x = x.float()
        mean = x.mean(0)
        std = x.std(0, unbiased=True) if len(x) > 1 else torch.ones_like(mean)
        std = torch.where(std < 10 * torch.finfo(std.dtype).eps, torch.ones_like(std), std)
        return cls(mean, std)

    @classmethod
    def identity(cls, dim: int, device: torch.device | str = "cpu") -> Standardizer:
        return cls(torch.zeros(dim, device=device), torch.ones(dim, device=device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Labels of ``query`` by a majority vote of its ``k`` nearest training points (Euclidean, float64)."""
    k = min(k, len(train_x))
    train64 = train_x.double()
    preds = []
    for start in range(0, len(query), KNN_QUERY_CHUNK):
        dist = torch.cdist(query[start:start + KNN_QUERY_CHUNK].double(), train64)
        neighbours = dist.topk(k, dim=1, largest=False).indices
        votes = F.one_hot(train_y[neighbours], num_classes).sum(1)
        preds.append(votes.argmax(1))  # the first maximum: ties go to the smallest label
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=query.device)


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, epochs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [C, D] and bias [C] of a linear classifier trained with AdamW on ``(train_x, train_y)``.

    ``generator`` (a CPU generator) draws the initial weights and the order of the batches.
    """
    device = train_x.device
    x = train_x.float().detach()
    dim = x.shape[1]
    bound = 1 / math.sqrt(dim)
    weight = (torch.rand(num_classes, dim, generator=generator) * 2 - 1).mul_(bound).to(device).requires_grad_(True)
    bias = (torch.rand(num_classes, generator=generator) * 2 - 1).mul_(bound).to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([weight, bias], lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for start in range(0, len(x), PROBE_BATCH):
                idx = order[start:start + PROBE_BATCH]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(F.linear(x[idx], weight, bias), train_y[idx]).backward()
                optimizer.step()
    return weight.detach(), bias.detach()


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in %."""
    return 100.0 * float((pred == target).float().mean()) if len(target) else 0.0
