"""Tests of kd_core.analysis CKA: reference values, invariances, the all-pairs paths and their cost model, minibatch CKA on models."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from kd_core.analysis import (
    MinibatchCKA,
    center_gram,
    cka_matrix,
    cka_matrix_from_features,
    gram_linear,
    linear_cka,
    rbf_cka,
    self_similarity,
)
from kd_core.analysis import cka_linear

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def demo_xy() -> tuple[np.ndarray, np.ndarray]:
    """The vectors of google-research's representation_similarity Demo.ipynb."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def _create(name: str, **kw: int) -> nn.Module:
    models = pytest.importorskip("kd_core.models")
    torch.manual_seed(0)
    return models.create_model(name, num_classes=10, in_channels=kw.get("in_channels", 3), image_size=kw.get("image_size", 32))


# ---------------------------------------------------------------------------------------------- CKA


def test_reference_vectors(demo_xy: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = demo_xy
    assert linear_cka(x, y) == pytest.approx(0.5576132566117586, abs=1e-6)
    assert rbf_cka(x, y, threshold=0.5) == pytest.approx(0.6548311822614981, abs=1e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.513456489505526, abs=1e-6)
    # torch input, and the Gram form (forced by making p > n) agrees with the feature form
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(0.5576132566, abs=1e-6)
    for debiased in (False, True):
        g = cka_matrix_from_features([x], [y], debiased=debiased, method="gram")[0, 0]
        f = cka_matrix_from_features([x], [y], debiased=debiased, method="feature")[0, 0]
        assert g == pytest.approx(f, abs=1e-12)


def test_ucentering_equals_unbiased_hsic(demo_xy: tuple[np.ndarray, np.ndarray]) -> None:
    """<Ũ_K, Ũ_L> = n(n-3)·HSIC_1 with HSIC_1 written out as in Nguyen et al. 2021 Eq. 3."""
    x, y = demo_xy
    k, l = gram_linear(x), gram_linear(y)
    n = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    hsic1 = (
        torch.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))
    uk, ul = center_gram(k, unbiased=True), center_gram(l, unbiased=True)
    assert float((uk * ul).sum()) == pytest.approx(float(n * (n - 3) * hsic1), rel=1e-10)


def test_invariances(demo_xy: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = demo_xy
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    for debiased in (False, True):
        base = linear_cka(x, y, debiased=debiased)
        assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
        assert linear_cka(x, x @ q, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
        assert linear_cka(x, y @ q, debiased=debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(x, -3.7 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(x + 5.0, y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(y, x, debiased=debiased) == pytest.approx(base, abs=1e-12)
    # not invariant to general invertible linear maps (the Demo notebook gives 0.29609)
    assert linear_cka(x, x * np.r_[np.ones(9), 50.0]) == pytest.approx(0.29609, abs=1e-5)
    assert rbf_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert rbf_cka(x, 4.0 * y) == pytest.approx(rbf_cka(x, y), abs=1e-10)


def test_matrix_from_features_equals_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 60
    base = rng.standard_normal((n, 8))
    xs = [base, np.maximum(base @ rng.standard_normal((8, 40)), 0), rng.standard_normal((n, 3, 4, 4))]
    ys = [base @ rng.standard_normal((8, 5)) + rng.standard_normal((n, 5)), rng.standard_normal((n, 90))]
    for debiased in (False, True):
        pairs = np.array([[linear_cka(x, y, debiased=debiased) for y in ys] for x in xs])
        for method in ("gram", "feature", "auto"):
            m = cka_matrix_from_features(xs, ys, debiased=debiased, method=method)
            assert m.shape == (3, 2) and m.dtype == np.float64
            np.testing.assert_allclose(m, pairs, atol=1e-10)


def _reference_cka_matrix(xs: list[np.ndarray], ys: list[np.ndarray], debiased: bool) -> np.ndarray:
    """All-pairs linear CKA in the Gram form, written plainly in NumPy float64 (independent of kd_core).

    Biased: HSIC_0 ∝ <HKH, HLH> (Kornblith et al. 2019, arXiv 1905.00414). Debiased: HSIC_1 of Song et
    al. 2012 as written in Nguyen et al. 2021 (arXiv 2010.15327, Eq. 3), with K̃ the Gram with a zeroed
    diagonal: tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1. The 1/(n(n-3)) factor cancels.
    """
    n = xs[0].shape[0]

    def gram(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64).reshape(n, -1)
        k = f @ f.T
        if debiased:
            return k - np.diag(np.diag(k))
        return k - k.mean(0)[None, :] - k.mean(1)[:, None] + k.mean()

    def hsic(k: np.ndarray, l: np.ndarray) -> float:
        if not debiased:
            return float(np.sum(k * l))
        ks, ls = k.sum(1), l.sum(1)
        return float(np.sum(k * l) + ks.sum() * ls.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (ks @ ls))

    gx, gy = [gram(x) for x in xs], [gram(y) for y in ys]
    return np.array([[hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)) for l in gy] for k in gx])


def _pooled_features(n: int, widths: tuple[int, ...], latent: np.ndarray, seed: int) -> list[torch.Tensor]:
    """float32 post-ReLU features of the given widths over a latent code, the odd layers mean-pooled from
    2×2 maps and the even ones the first w columns of the flattened maps (as ``extract_features`` pools)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, w in enumerate(widths):
        maps = np.maximum(latent @ rng.standard_normal((latent.shape[1], 4 * w)) + rng.standard_normal((n, 4 * w)), 0)
        t = torch.from_numpy(maps.astype(np.float32)).view(n, w, 2, 2)
        out.append(t.mean(dim=(2, 3)) if i % 2 else t.flatten(1)[:, :w])
    return out


def _teacher_student(n: int, wx: tuple[int, ...], wy: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng(n)
    z = rng.standard_normal((n, 16))
    shared = np.hstack([z[:, :8], rng.standard_normal((n, 8))])
    return _pooled_features(n, wx, z, 1), _pooled_features(n, wy, shared, 2)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request: pytest.FixtureRequest):
    """Products in OpenBLAS (torch on one thread) and in torch.mm (several threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# widths 10..2048 on the two sides; n = 60 runs the gram path in float64, n = 300 in float32 (2 panels)
@pytest.mark.parametrize("n", [60, 300])
def test_all_pairs_paths_match_reference(n: int, torch_threads: int) -> None:
    xs, ys = _teacher_student(n, (10, 128, 2048, 512), (32, 64, 1024, 256))
    gram_tol = 1e-6 if n >= cka_linear.F32_MIN_N else 1e-10  # float32 Grams: the promised 1e-6
    for debiased in (False, True):
        ref = _reference_cka_matrix([x.numpy() for x in xs], [y.numpy() for y in ys], debiased)
        assert 0.05 < ref.min() and ref.max() < 0.95  # a spread of values, none clamped by construction
        feature = cka_matrix_from_features(xs, ys, debiased=debiased, method="feature")
        np.testing.assert_allclose(feature, ref, rtol=0, atol=1e-10)
        for x_in in (xs, [x.double() for x in xs]):  # float32 as extract_features returns, and float64
            gram = cka_matrix_from_features(x_in, ys, debiased=debiased, method="gram")
            np.testing.assert_allclose(gram, ref, rtol=0, atol=gram_tol)


@pytest.mark.parametrize("n", [200, 300])  # one Gram panel (each layer centred just before its Gram), two
def test_gram_path_centres_features_with_a_large_offset(n: int, torch_threads: int) -> None:
    """Activations far from zero (no normalisation before the tap) lose no precision in float32: with one
    centring pass instead of two, an offset of 3·10⁴ (10⁴ standard deviations) left errors of 2.5e-6..6e-6."""
    xs, ys = _teacher_student(n, (10, 512, 2048), (32, 1024))
    xs = [x + 3e4 for x in xs]
    # Song's estimator is exactly invariant to shifting a feature, but its literal formula on the raw Grams
    # cancels terms ~10¹²-sized (far off even in float64); the reference centres the float32 values in float64
    centred = [x.double() - x.double().mean(0) for x in xs]
    ref = _reference_cka_matrix([x.numpy() for x in centred], [y.numpy() for y in ys], debiased=True)
    got = cka_matrix_from_features(xs, ys, debiased=True, method="gram")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def _crossover(wx: tuple[int, ...], wy: tuple[int, ...], hi: int = 1 << 16) -> int:
    """Smallest n from ``F32_MIN_N`` on at which ``choose_method`` picks the feature path (bisection)."""
    lo = cka_linear.F32_MIN_N
    assert cka_linear.choose_method(lo, wx, wy) == "gram" and cka_linear.choose_method(hi, wx, wy) == "feature"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cka_linear.choose_method(mid, wx, wy) == "gram" else (lo, mid)
    return hi


@pytest.mark.parametrize(
    "wx, wy", [((10, 64, 256), (32, 128)), ((10, 32, 64, 128, 256, 512, 1024, 2048),) * 2]
)
def test_cost_model_flips_once(wx: tuple[int, ...], wy: tuple[int, ...]) -> None:
    """Gram path below one n, feature path above it: the n² term of the gram path eventually dominates."""
    cross = _crossover(wx, wy)
    grid = sorted({cka_linear.F32_MIN_N, cross - 1, cross, *range(cka_linear.F32_MIN_N, 1 << 16, 997)})
    picks = [cka_linear.choose_method(n, wx, wy) for n in grid]
    assert picks == ["gram" if n < cross else "feature" for n in grid]


@pytest.mark.parametrize("side", [-1, 0])
def test_auto_runs_the_chosen_path_at_the_crossover(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    wx, wy = (10, 64, 256), (32, 128)
    n = _crossover(wx, wy) + side  # the last n of the gram path, then the first of the feature path
    xs, ys = _teacher_student(n, wx, wy)
    calls: list[int] = []
    gram_path = cka_linear._gram_path
    monkeypatch.setattr(cka_linear, "_gram_path", lambda *args: calls.append(1) or gram_path(*args))
    got = cka_matrix_from_features(xs, ys, debiased=True)
    assert len(calls) == (1 if side < 0 else 0)
    ref = _reference_cka_matrix([x.numpy() for x in xs], [y.numpy() for y in ys], debiased=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 if calls else 1e-10)


def test_debiased_needs_four_examples() -> None:
    x = np.random.default_rng(0).standard_normal((3, 5))
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix_from_features([x], [x], debiased=True)
    assert linear_cka(x, x) == pytest.approx(1.0)  # the biased estimator is defined


class _Select(nn.Module):
    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.start : self.stop]


def _synthetic_models() -> tuple[np.ndarray, np.ndarray, torch.Tensor, nn.Module, nn.Module]:
    """Data z = [x | e]; the teacher's layer "a" outputs x, the student's layer "b" tanh(x A / 8) + e."""
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.standard_normal((n, 64))
    e = rng.standard_normal((n, 96))
    a = rng.standard_normal((64, 96))
    y = np.tanh(x @ a / 8) + e
    teacher = nn.Sequential(OrderedDict(a=_Select(0, 64)))

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", torch.from_numpy(a))
            self.b = nn.Identity()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(z[:, :64] @ self.a / 8) + z[:, 64:])

    return x, y, torch.from_numpy(np.hstack([x, e])), teacher, Student()


def test_minibatch_matches_full_debiased() -> None:
    """Minibatch debiased CKA (10 batches of 100) vs the full-data debiased estimate on n=1000.

    Tolerance 0.02: over 30 random batch assignments of this data the minibatch estimate had std 0.004
    (max deviation 0.007), so 0.02 is ~5σ. The estimator averaging *biased* HSIC_0 per batch instead gives
    0.595 against 0.299 here, so the test does distinguish the estimators. With one batch holding all n
    rows the two estimators are the same number.
    """
    x, y, z, teacher, student = _synthetic_models()
    full = linear_cka(x, y, debiased=True)
    res = cka_matrix(teacher, student, z, ["a"], ["b"], batch_size=100)
    assert res.n == 1000 and res.n_batches == 10 and res.estimator == "minibatch_debiased_linear"
    assert res.matrix[0, 0] == pytest.approx(full, abs=0.02)
    # the same average-then-ratio with biased HSIC_0 per batch is far off (batch-size dependent bias)
    num = dx = dy = 0.0
    for i in range(10):
        gx = center_gram(gram_linear(x[i * 100 : (i + 1) * 100]))
        gy = center_gram(gram_linear(y[i * 100 : (i + 1) * 100]))
        num, dx, dy = num + float((gx * gy).sum()), dx + float((gx * gx).sum()), dy + float((gy * gy).sum())
    assert num / np.sqrt(dx * dy) - full > 0.1
    one = cka_matrix(teacher, student, [z[:500], z[500:]], ["a"], ["b"], batch_size=1000)
    assert one.matrix[0, 0] == pytest.approx(full, abs=1e-10)
    # ragged remainder is dropped with a warning; iterables of (x, y) tuples are accepted
    with pytest.warns(UserWarning, match="dropped"):
        r = cka_matrix(teacher, student, [(z[:450], None), (z[450:],)], ["a"], ["b"], batch_size=300)
    assert r.n == 900 and r.n_dropped == 100


def test_minibatch_accumulator_rejects_unequal_batches() -> None:
    acc = MinibatchCKA(1, 1)
    acc.update([torch.randn(8, 3)], [torch.randn(8, 2)])
    with pytest.raises(ValueError):
        acc.update([torch.randn(7, 3)], [torch.randn(7, 2)])


def test_self_similarity_and_model_state() -> None:
    model = _create("resnet8")
    model.train()
    before = copy.deepcopy(model.state_dict())
    layers = ["layer1", "layer2", "layer3", "fc:input", "fc"]
    data = torch.randn(32, 3, 16, 16)
    res = self_similarity(model, data, layers, batch_size=16)
    m = res.matrix
    assert m.shape == (5, 5)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-10)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    # cka_matrix of a model with itself (two hooked copies) gives the same matrix
    twin = cka_matrix(model, model, data, layers, layers, batch_size=16, pooling="flatten")
    np.testing.assert_allclose(twin.matrix, m, atol=1e-10)
    # training flags restored, BN statistics untouched (eval mode inside), no hooks left behind
    assert model.training and all(mod.training for mod in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


def test_cka_teacher_student_default_layers_and_pooling() -> None:
    teacher, student = _create("resnet8"), _create("cnn_small")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 3, 16, 16)), batch_size=15)
    res = cka_matrix(teacher, student, data, batch_size=10, pooling="mean")
    assert res.teacher_layers == ["layer1", "layer2", "layer3", "fc:input"]
    assert res.student_layers == ["stage1", "stage2", "stage3", "fc:input"]
    assert res.matrix.shape == (4, 4) and np.isfinite(res.matrix).all()
    # mean pooling of the last stage is exactly the pooled embedding
    assert res.matrix[2, 3] == pytest.approx(res.matrix[3, 3], abs=1e-10)
    with pytest.raises(KeyError):
        cka_matrix(teacher, student, data, ["layer9"], ["stage1"], batch_size=16)


def test_reused_module_is_an_error() -> None:
    relu = nn.ReLU()
    model = nn.Sequential(OrderedDict(l1=nn.Linear(4, 4), r=relu, l2=nn.Linear(4, 4), r2=relu))
    with pytest.raises(RuntimeError, match="more than once"):
        self_similarity(model, torch.randn(16, 4), ["r"], batch_size=8)
