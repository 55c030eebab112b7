"""Tests of kd_core.analysis beyond CKA (tests/test_cka.py): prototypes/projections, attribution, agreement/calibration."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from kd_core.analysis import (
    agreement_buckets,
    align_student_to_teacher,
    attribute,
    calibration,
    class_means,
    compare_maps,
    normalize_maps,
    per_class_accuracy,
    project_2d,
    prototype_report,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def _create(name: str, **kw: int) -> nn.Module:
    models = pytest.importorskip("kd_core.models")
    torch.manual_seed(0)
    return models.create_model(name, num_classes=10, in_channels=kw.get("in_channels", 3), image_size=kw.get("image_size", 32))


# ----------------------------------------------------------------------------------------- prototypes


def test_class_means_equal_loop() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 7, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    y[y == 3] = 2  # class 3 absent
    means, counts = class_means(emb, y, 5, return_counts=True)
    for c in range(5):
        if (y == c).any():
            torch.testing.assert_close(means[c], emb[y == c].double().mean(0))
        else:
            assert torch.isnan(means[c]).all() and counts[c] == 0
    assert counts.sum() == 50


def _clusters(n_per: int = 30, c: int = 4, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((c, d)) * 10
    y = np.repeat(np.arange(c), n_per)
    return centers[y] + rng.standard_normal((c * n_per, d)), y


def test_prototype_report() -> None:
    emb_t, y = _clusters()
    emb_s = 0.3 * (emb_t @ np.random.default_rng(1).standard_normal((16, 8)))  # narrower, smaller norms
    rep = prototype_report(emb_t, emb_s, y, num_classes=4)
    assert rep.ncm_acc_t == 1.0 and rep.ncm_acc_s == 1.0
    assert rep.cos_t.shape == (4, 4) and rep.prototypes_s.shape == (4, 8)
    np.testing.assert_allclose(np.diag(rep.cos_t), 1.0, atol=1e-12)
    np.testing.assert_allclose(rep.cos_diff, rep.cos_s - rep.cos_t)
    assert rep.sample_cos_t.shape == (120,) and (rep.sample_cos_t > 0.9).all()
    assert rep.norm_ratio < 1.0 and rep.mean_norm_s < rep.mean_norm_t
    assert rep.spread_t.shape == (4,) and np.isfinite(rep.rel_spread_t).all()


def test_pca_sign_fixing_and_prototypes() -> None:
    emb, y = _clusters()
    p = project_2d(emb, "pca", prototypes=class_means(emb, y, 4))
    flips = np.where(np.arange(16) % 3 == 0, -1.0, 1.0)
    q = project_2d(emb * flips, "pca")
    np.testing.assert_allclose(p.points, q.points, atol=1e-8)  # same picture, no flipped axes
    q_rot = project_2d(emb @ np.linalg.qr(np.random.default_rng(3).standard_normal((16, 16)))[0], "pca")
    np.testing.assert_allclose(p.points, q_rot.points, atol=1e-8)
    np.testing.assert_allclose(p.prototypes, p.transform(class_means(emb, y, 4)), atol=1e-10)
    # prototypes go through the same transform: projected prototype = mean of projected samples
    np.testing.assert_allclose(p.prototypes[1], p.points[y == 1].mean(0), atol=1e-8)
    # alignment to a reference view whose axes were flipped
    r = project_2d(emb, "pca", reference=p.points * np.array([-1.0, 1.0]))
    np.testing.assert_allclose(r.points, p.points * np.array([-1.0, 1.0]), atol=1e-8)


def test_tsne_seeded_with_prototypes() -> None:
    emb, y = _clusters(n_per=10, c=3, d=8)
    protos = class_means(emb, y, 3)
    a = project_2d(emb, "tsne", seed=0, prototypes=protos, options={"max_iter": 250, "method": "exact"})
    b = project_2d(emb, "tsne", seed=0, prototypes=protos, options={"max_iter": 250, "method": "exact"})
    assert a.points.shape == (30, 2) and a.prototypes is not None and a.prototypes.shape == (3, 2)
    np.testing.assert_allclose(a.points, b.points)


@pytest.mark.skipif(not os.environ.get("DISTILLERY_SLOW_TESTS"), reason="numba JIT takes ~30 s on 2 cores")
def test_umap_seeded() -> None:
    emb, y = _clusters(n_per=15, c=3, d=8)
    a = project_2d(emb, "umap", seed=0, prototypes=class_means(emb, y, 3))
    b = project_2d(emb, "umap", seed=0, prototypes=class_means(emb, y, 3))
    assert a.points.shape == (45, 2) and a.prototypes.shape == (3, 2)
    np.testing.assert_allclose(a.points, b.points)


def test_least_squares_map_recovers_known_map() -> None:
    rng = np.random.default_rng(0)
    emb_s = rng.standard_normal((200, 6))
    w = rng.standard_normal((6, 11))
    b = rng.standard_normal(11)
    emb_t = emb_s @ w + b
    m = align_student_to_teacher(emb_s, emb_t)
    np.testing.assert_allclose(m.weight, w, atol=1e-10)
    np.testing.assert_allclose(m.bias, b, atol=1e-10)
    assert m.r2 == pytest.approx(1.0) and m(emb_s).shape == (200, 11)


# ---------------------------------------------------------------------------------------- attribution


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


@pytest.fixture(scope="module")
def cnn_and_images() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN()
    model.train()
    return model, torch.randn(3, 1, 28, 28)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad", "gradcam", "occlusion"])
def test_attribution_shapes_and_model_untouched(cnn_and_images: tuple[nn.Module, torch.Tensor], method: str) -> None:
    model, images = cnn_and_images
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # must work even when the caller disabled grad
        maps = attribute(
            model, images, torch.tensor([1, 2, 3]), method, layer="features.4", n_steps=8, nt_samples=4,
            internal_batch_size=16,
        )  # fmt: skip
    assert maps.shape == (3, 28, 28) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    assert model.training and model.features[2].inplace and model.features[5].inplace
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_gradcam_default_layer_from_feature_spec() -> None:
    model = _create("cnn_small", in_channels=1, image_size=28)
    maps = attribute(model, torch.randn(2, 1, 28, 28), 0, "gradcam")
    assert maps.shape == (2, 28, 28) and (maps >= 0).all()  # ReLU'd Grad-CAM


def test_smoothgrad_seeded(cnn_and_images: tuple[nn.Module, torch.Tensor]) -> None:
    model, images = cnn_and_images
    state = torch.random.get_rng_state()
    a = attribute(model, images, 0, "smoothgrad", seed=3, nt_samples=4)
    b = attribute(model, images, 0, "smoothgrad", seed=3, nt_samples=4)
    c = attribute(model, images, 0, "smoothgrad", seed=4, nt_samples=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_compare_maps() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 16, 16, generator=g)
    same = compare_maps(a, a, k=0.1)
    np.testing.assert_allclose(same["spearman"], 1.0)
    np.testing.assert_allclose(same["iou"], 1.0)
    assert same["iou_random"] == pytest.approx(same["k"] / (2 - same["k"]))
    inv = compare_maps(a, -a, k=0.1, absolute=False)
    np.testing.assert_allclose(inv["spearman"], -1.0)
    assert (inv["iou"] == 0).all()
    # monotone transforms keep ranks; a coarser grid is resized
    assert compare_maps(a, a**3)["spearman_mean"] == pytest.approx(1.0)
    assert compare_maps(a, a[:, ::2, ::2])["spearman"].shape == (4,)
    # independent random maps: mean top-10% IoU near k/(2-k) ≈ 0.053
    r = compare_maps(torch.rand(200, 32, 32, generator=g), torch.rand(200, 32, 32, generator=g), k=0.1)
    assert r["iou_mean"] == pytest.approx(r["iou_random"], abs=0.01)


def test_normalize_maps() -> None:
    t = torch.ones(2, 4, 4)
    s = 0.5 * torch.ones(2, 4, 4)
    jt, js = normalize_maps([t, s], mode="joint", outlier_perc=0)
    assert torch.allclose(jt, torch.ones_like(t)) and torch.allclose(js, 0.5 * torch.ones_like(s))
    pt, ps = normalize_maps([t, s], mode="per_map", outlier_perc=0)
    assert torch.allclose(ps, torch.ones_like(s))
    single = normalize_maps(torch.tensor([[[0.0, 2.0], [-4.0, 1.0]]]), mode="per_map", outlier_perc=0)
    assert isinstance(single, torch.Tensor) and single.min() == -1.0


# ------------------------------------------------------------------------------------------ agreement


def test_agreement_buckets_and_per_class() -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([0, 1, 2, 1, 1, 0])  # right: 1 1 1 0 1 0
    s = torch.tensor([0, 0, 2, 0, 2, 1])  # right: 1 0 1 1 0 0
    out = agreement_buckets(t, s, y)
    assert out["both_right"] == 2  # idx 0, 2
    assert out["teacher_right_student_wrong"] == 2  # idx 1, 4
    assert out["teacher_wrong_student_right"] == 1  # idx 3
    assert out["both_wrong"] == 1  # idx 5
    assert out["masks"]["teacher_wrong_student_right"].tolist() == [False, False, False, True, False, False]
    assert out["agree"] == 2 and out["n"] == 6
    logits = torch.nn.functional.one_hot(t, 3).float()
    assert agreement_buckets(logits, s, y)["both_right"] == 2
    acc = per_class_accuracy(t, y, 4)
    np.testing.assert_allclose(acc[:3], [0.5, 1.0, 0.5])
    assert np.isnan(acc[3])


def test_calibration_hand_computed() -> None:
    probs = np.array(
        [
            [0.95, 0.05],  # conf 0.95, pred 0, y 0  -> right
            [0.05, 0.95],  # conf 0.95, pred 1, y 0  -> wrong
            [0.6, 0.4],  # conf 0.60, pred 0, y 0 -> right
            [0.3, 0.7],  # conf 0.70, pred 1, y 1 -> right
        ]
    )
    y = np.array([0, 0, 0, 1])
    conf, acc, counts, ece = calibration(probs, y, n_bins=5)  # bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    assert counts.tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(conf[2:], [0.6, 0.7, 0.95])
    np.testing.assert_allclose(acc[2:], [1.0, 1.0, 0.5])
    assert np.isnan(conf[0]) and np.isnan(acc[1])
    # ECE = (1/4)|1-.6| + (1/4)|1-.7| + (2/4)|.5-.95| = 0.1 + 0.075 + 0.225
    assert ece == pytest.approx(0.4)
    with pytest.raises(ValueError):
        calibration(np.array([[2.0, -1.0]]), np.array([0]))
