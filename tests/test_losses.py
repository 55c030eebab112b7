"""Tests of kd_core.losses: hand-computed values, paper invariants, gradient isolation, registry.

Expected numbers are computed here from the formulas with plain Python loops and ``math`` (never by
calling the code under test), on tiny float64 tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kd_core.losses as L
from kd_core.losses.base import ALL_NEEDS, BuildContext, LossInputs, ModelShapes
from kd_core.losses.contrastive import sample_contrast_indices
from kd_core.losses.feature import ConvReg
from kd_core.losses.logit import dkd_parts

TOL = dict(rel=1e-9, abs=1e-12)

# ---------------------------------------------------------------------------------------------------
# Reference helpers (pure Python)


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def scaled(v: list[float], a: float) -> list[float]:
    return [x * a for x in v]


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


S = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 0.0]]
T = [[2.0, 0.5, 1.0, -0.5], [-1.0, 0.4, 2.5, 0.2]]
Y = [1, 2]


# ---------------------------------------------------------------------------------------------------
# KD


def test_kd_value():
    temp = 4.0
    expected = sum(
        temp**2 * kl(softmax(scaled(t, 1 / temp)), softmax(scaled(s, 1 / temp))) for s, t in zip(S, T)
    ) / len(S)
    assert L.kd_loss(t64(S), t64(T), temp).item() == pytest.approx(expected, **TOL)


def test_kd_zero_at_equal_logits_and_shift_invariant():
    s = t64(S)
    assert L.kd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    shift = t64([[3.0], [-7.0]])
    base = L.kd_loss(s, t64(T)).item()
    assert L.kd_loss(s + shift, t64(T)).item() == pytest.approx(base, **TOL)
    assert L.kd_loss(s, t64(T) - shift).item() == pytest.approx(base, **TOL)


# ---------------------------------------------------------------------------------------------------
# DKD


def _dkd_reference(s: list[float], t: list[float], y: int, temp: float) -> tuple[float, float]:
    p_s, p_t = softmax(scaled(s, 1 / temp)), softmax(scaled(t, 1 / temp))
    tckd = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    drop = lambda v: [x for i, x in enumerate(v) if i != y]  # noqa: E731
    nckd = kl(softmax(scaled(drop(t), 1 / temp)), softmax(scaled(drop(s), 1 / temp)))
    return tckd, nckd


def test_dkd_value():
    alpha, beta, temp = 1.0, 8.0, 4.0
    terms = [_dkd_reference(s, t, y, temp) for s, t, y in zip(S, T, Y)]
    expected = sum(temp**2 * (alpha * a + beta * b) for a, b in terms) / len(terms)
    got = L.dkd_loss(t64(S), t64(T), torch.tensor(Y), alpha, beta, temp)
    assert got.item() == pytest.approx(expected, **TOL)


def test_dkd_identity_tckd_nckd_equals_kl():
    temp = 2.0
    tckd, nckd = dkd_parts(t64(S), t64(T), torch.tensor(Y), temp)
    for b, (s, t, y) in enumerate(zip(S, T, Y)):
        p_s, p_t = softmax(scaled(s, 1 / temp)), softmax(scaled(t, 1 / temp))
        assert tckd[b].item() + (1 - p_t[y]) * nckd[b].item() == pytest.approx(kl(p_t, p_s), **TOL)


# ---------------------------------------------------------------------------------------------------
# DIST


def _pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    a, b = [x - ma for x in a], [x - mb for x in b]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + eps)


def test_dist_value():
    beta, gamma, temp = 1.0, 2.0, 4.0
    y_s = [softmax(scaled(s, 1 / temp)) for s in S]
    y_t = [softmax(scaled(t, 1 / temp)) for t in T]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(y_s, y_t)) / len(S)
    cols = range(len(S[0]))
    intra = 1 - sum(_pearson([r[c] for r in y_s], [r[c] for r in y_t]) for c in cols) / len(cols)
    expected = temp**2 * (beta * inter + gamma * intra)
    assert L.dist_loss(t64(S), t64(T), beta, gamma, temp).item() == pytest.approx(expected, **TOL)


def test_dist_zero_for_positive_affine_probabilities():
    temp, a = 4.0, 0.5
    # columns well spread: the code's eps=1e-8 is only negligible against non-tiny column variances
    teacher = t64([[8.0, 0.0, 4.0, -8.0], [-4.0, 8.0, 0.0, 4.0], [0.0, 4.0, 12.0, -4.0]])
    y_t = F.softmax(teacher / temp, dim=1)
    y_s = a * y_t + (1 - a) / y_t.shape[1]  # rows still sum to 1
    student_logits = temp * torch.log(y_s)
    # zero up to the O(eps / column variance) term of the reference code's eps
    assert L.dist_loss(student_logits, teacher, temperature=temp).item() == pytest.approx(0.0, abs=1e-4)
    assert L.dist_loss(student_logits.flip(1), teacher, temperature=temp).item() > 1.0


# ---------------------------------------------------------------------------------------------------
# Logit standardization


def _zscore(v: list[float], eps: float = 1e-7) -> list[float]:
    m = sum(v) / len(v)
    std = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))  # unbiased, like torch.std
    return [(x - m) / (eps + std) for x in v]


def test_logit_std_value():
    temp = 2.0
    expected = sum(
        temp**2 * kl(softmax(scaled(_zscore(t), 1 / temp)), softmax(scaled(_zscore(s), 1 / temp)))
        for s, t in zip(S, T)
    ) / len(S)
    assert L.logit_std_kd_loss(t64(S), t64(T), temp).item() == pytest.approx(expected, **TOL)


def test_logit_std_invariant_to_positive_affine_rows():
    s, t = t64(S), t64(T)
    base = L.logit_std_kd_loss(s, t).item()
    scale, shift = t64([[3.0], [0.5]]), t64([[-2.0], [10.0]])
    assert L.logit_std_kd_loss(scale * s + shift, t).item() == pytest.approx(base, rel=1e-6)
    assert L.logit_std_kd_loss(s, scale * t + shift).item() == pytest.approx(base, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# NKD


def test_nkd_value():
    temp, gamma = 3.0, 3.5
    total = 0.0
    for s, t, y in zip(S, T, Y):
        p_s, p_t = softmax(s), softmax(t)
        target_term = -p_t[y] * math.log(p_s[y])
        drop = lambda v: [x for i, x in enumerate(v) if i != y]  # noqa: E731,B023
        q_t, q_s = softmax(scaled(drop(t), 1 / temp)), softmax(scaled(drop(s), 1 / temp))
        non_target = -sum(a * math.log(b) for a, b in zip(q_t, q_s))
        total += target_term + gamma * temp**2 * non_target
    expected = total / len(S)
    got = L.nkd_loss(t64(S), t64(T), torch.tensor(Y), temp, gamma)
    assert got.item() == pytest.approx(expected, **TOL)


# ---------------------------------------------------------------------------------------------------
# PLD


def _pld_reference(s: list[float], t: list[float], y: int, temp: float) -> float:
    others = sorted((c for c in range(len(t)) if c != y), key=lambda c: -t[c])
    order = [y, *others]
    weights = softmax([t[c] / temp for c in order])
    loss = 0.0
    for k, c in enumerate(order):
        suffix = math.log(sum(math.exp(s[d]) for d in order[k:]))
        loss += weights[k] * (suffix - s[c])
    return loss


def test_pld_value():
    temp = 1.5
    expected = sum(_pld_reference(s, t, y, temp) for s, t, y in zip(S, T, Y)) / len(S)
    got = L.pld_loss(t64(S), t64(T), torch.tensor(Y), temp)
    assert got.item() == pytest.approx(expected, **TOL)


def test_pld_equals_ce_for_one_hot_teacher():
    teacher = t64([[0.0, 1000.0, 0.0, 0.0], [0.0, 0.0, 1000.0, 0.0]])  # t_y ≫ others
    got = L.pld_loss(t64(S), teacher, torch.tensor(Y))
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(S, Y)) / len(S)
    assert got.item() == pytest.approx(ce, **TOL)


def test_pld_invariant_to_constants():
    base = L.pld_loss(t64(S), t64(T), torch.tensor(Y)).item()
    shift = t64([[5.0], [-3.0]])
    assert L.pld_loss(t64(S) + shift, t64(T), torch.tensor(Y)).item() == pytest.approx(base, **TOL)
    assert L.pld_loss(t64(S), t64(T) + shift, torch.tensor(Y)).item() == pytest.approx(base, **TOL)


# ---------------------------------------------------------------------------------------------------
# TAID


def test_taid_value():
    t = 0.4
    total = 0.0
    for s, z in zip(S, T):
        target = softmax([(1 - t) * a + t * b for a, b in zip(s, z)])
        log_p = [math.log(p) for p in softmax(s)]
        total += -sum(p * q for p, q in zip(target, log_p))
    assert L.taid_loss(t64(S), t64(T), t).item() == pytest.approx(total / len(S), **TOL)


def test_taid_schedule_updates_and_survives_state_dict():
    sched = L.TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.1, beta=0.99)
    sched.update(torch.tensor(2.0), step=0, total_steps=100)
    assert float(sched.t) == pytest.approx(0.4)  # first call stores ℓ only
    # second call by hand: rel = (2−1)/2, m = 0.01·rel, t = max(t_lin, t + α·σ(m)·(1−t))
    m = 0.01 * 0.5
    t_adaptive = 0.4 + 0.1 * (1 / (1 + math.exp(-m))) * 0.6
    t_lin = 0.4 + 0.6 * 1 / 100
    sched.update(torch.tensor(1.0), step=1, total_steps=100)
    assert float(sched.t) == pytest.approx(max(t_lin, t_adaptive), rel=1e-6)
    # the linear floor wins when the adaptive step is small
    t_now = float(sched.t)
    sched.update(torch.tensor(1.0), step=90, total_steps=100)
    assert float(sched.t) == pytest.approx(0.4 + 0.6 * 0.9, rel=1e-6)
    assert t_now < float(sched.t)
    resumed = L.TAIDSchedule(t_start=0.4, alpha=0.1)
    resumed.load_state_dict(sched.state_dict())
    assert float(resumed.t) == float(sched.t)
    assert float(resumed.momentum) == float(sched.momentum)
    assert float(resumed.prev_loss) == 1.0


def test_taid_module_logs_t_and_steps_schedule():
    module = L.create_loss("taid", {"alpha": 0.1})
    inputs = LossInputs(t64(S), teacher_logits=t64(T), step=50, total_steps=100)
    module(inputs)
    module.after_step(torch.tensor(2.0))
    module.after_step(torch.tensor(1.0))
    assert float(module.logged_values()["taid_t"]) >= 0.4 + 0.6 * 0.5 - 1e-6
    assert "schedule.t" in module.state_dict()


# ---------------------------------------------------------------------------------------------------
# OFA


@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_ofa_value(gamma):
    temp = 2.0
    total = 0.0
    for s, t, y in zip(S, T, Y):
        p_t, p_s = softmax(scaled(t, 1 / temp)), softmax(scaled(s, 1 / temp))
        for c in range(len(s)):
            m = 1.0 if c == y else 0.0
            total += -((p_t[c] + m) ** gamma - m) * math.log(p_s[c])
    got = L.ofa_loss(t64(S), t64(T), torch.tensor(Y), temp, gamma)
    assert got.item() == pytest.approx(total / len(S), **TOL)


# ---------------------------------------------------------------------------------------------------
# ND


def test_nd_value_and_loop_form():
    s_emb = [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]
    t_emb = [[2.0, 2.0], [0.1, 0.1], [1.0, 1.0]]
    means = [[1.0, 0.0], [0.0, 2.0]]
    labels = [1, 0, 1]
    expected = 0.0
    for s, t, y in zip(s_emb, t_emb, labels):
        c = means[y]
        cn = math.hypot(*c)
        max_norm = max(math.hypot(*s), math.hypot(*t))
        expected += 1 - (s[0] * c[0] / cn + s[1] * c[1] / cn) / max_norm
    got = L.nd_loss(t64(s_emb), t64(t_emb), t64(means), torch.tensor(labels))
    assert got.item() == pytest.approx(expected / 3, **TOL)

    # the official per-sample loop, on random data
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    cm = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 1, 2, 0])
    loop = sum(
        1 - torch.dot(si, cm[yi] / cm[yi].norm()) / max(si.norm(), ti.norm()) for si, ti, yi in zip(s, t, y)
    ) / len(y)
    assert L.nd_loss(s, t, cm, y).item() == pytest.approx(loop.item(), **TOL)


# ---------------------------------------------------------------------------------------------------
# FitNet, AT


def test_fitnet_value():
    s = t64([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = t64([[[[0.0, 2.0], [5.0, 3.0]]]])
    assert L.fitnet_loss(s, t).item() == pytest.approx((1 + 0 + 4 + 1) / 4, **TOL)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((4, 8, 8), (6, 4, 4)), ((4, 4, 4), (6, 8, 8)), ((4, 6, 6), (6, 4, 4)), ((4, 4, 4), (6, 4, 4))],
)
def test_convreg_output_matches_teacher_shape(s_shape, t_shape):
    out = ConvReg(s_shape, t_shape)(torch.randn(2, *s_shape))
    assert tuple(out.shape[1:]) == t_shape


def _attention(maps: list[list[list[float]]]) -> list[float]:
    """mean_c f² per position, flattened row-major, L2-normalized."""
    h, w = len(maps[0]), len(maps[0][0])
    a = [sum(m[i][j] ** 2 for m in maps) / len(maps) for i in range(h) for j in range(w)]
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


def test_at_value_with_pooling():
    # stage 1: student 2×4 map pooled (2×2 blocks) to the teacher's 1×2; stage 2: equal sizes
    s1 = [[[1.0, 3.0, 0.0, 2.0], [1.0, -1.0, 4.0, 2.0]]]  # C=1
    pooled = [[[(1 + 3 + 1 - 1) / 4, (0 + 2 + 4 + 2) / 4]]]
    t1 = [[[1.0, 2.0]], [[0.5, -1.0]]]  # C=2, 1×2
    s2 = [[[2.0, 1.0]]]
    t2 = [[[1.0, 1.0]], [[3.0, 0.0]], [[0.0, 1.0]]]
    expected = 0.0
    for a_s, a_t in ((_attention(pooled), _attention(t1)), (_attention(s2), _attention(t2))):
        expected += sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / len(a_s)
    got = L.at_loss([t64([s1]), t64([s2])], [t64([t1]), t64([t2])])
    assert got.item() == pytest.approx(expected, **TOL)


def test_at_invariant_to_positive_scaling():
    gen = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 2, 2, generator=gen)]
    t = [torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 6, 2, 2, generator=gen)]
    base = L.at_loss(s, t).item()
    assert L.at_loss([3.0 * x for x in s], [0.2 * x for x in t]).item() == pytest.approx(base, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# SP, RKD, PKT


def _sp_gram(rows: list[list[float]]) -> list[list[float]]:
    g = [[sum(a * b for a, b in zip(r1, r2)) for r2 in rows] for r1 in rows]
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in g]


def test_sp_value():
    s = [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]]
    t = [[1.0, 1.0], [2.0, -0.5]]
    gs, gt = _sp_gram(s), _sp_gram(t)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    got = L.sp_loss(t64(s).view(2, 3, 1, 1), t64(t).view(2, 1, 2, 1))
    assert got.item() == pytest.approx(expected, **TOL)


def test_sp_invariant_to_positive_scaling():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 5, 2, 2, generator=gen)
    assert L.sp_loss(7.0 * s, 0.1 * t).item() == pytest.approx(L.sp_loss(s, t).item(), rel=1e-5)


def _smooth_l1(a: list[float], b: list[float]) -> float:
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(0.5 * x * x if x < 1 else x - 0.5 for x in d) / len(d)


def _rkd_psi(e: list[list[float]]) -> tuple[list[float], list[float]]:
    n = len(e)
    dist = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
    mu = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    psi_d = [dist[i][j] / mu for i in range(n) for j in range(n)]

    def unit(i: int, j: int) -> list[float]:
        v = [b - a for a, b in zip(e[i], e[j])]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm > 0 else [0.0] * len(v)

    psi_a = [
        sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for i in range(n) for j in range(n) for k in range(n)
    ]
    return psi_d, psi_a


def test_rkd_value():
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]
    t = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 1.0]]
    (sd, sa), (td, ta) = _rkd_psi(s), _rkd_psi(t)
    expected = 25.0 * _smooth_l1(sd, td) + 50.0 * _smooth_l1(sa, ta)
    assert L.rkd_loss(t64(s), t64(t)).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _pkt_probs(e: list[list[float]], eps: float) -> list[list[float]]:
    unit = [[x / (math.sqrt(sum(y * y for y in r)) + eps) for x in r] for r in e]
    sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
    return [[x / sum(r) for x in r] for r in sim]


def test_pkt_value():
    eps = 1e-7
    s = [[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]
    t = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
    ps, pt = _pkt_probs(s, eps), _pkt_probs(t, eps)
    expected = sum(
        pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3)
    ) / 9
    assert L.pkt_loss(t64(s), t64(t), eps).item() == pytest.approx(expected, **TOL)


def test_relation_losses_zero_for_identical_embeddings():
    e = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert L.rkd_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert L.pkt_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# CRD


def test_nce_loss_value():
    scores = t64([[0.5, 0.1, 0.3], [0.2, 0.05, 0.4]])
    n, eps = 10, 1e-7
    noise = 2 / n
    expected = 0.0
    for row in scores.tolist():
        expected += math.log(row[0] / (row[0] + noise + eps))
        expected += sum(math.log(noise / (x + noise + eps)) for x in row[1:])
    assert L.nce_loss(scores, n).item() == pytest.approx(-expected / 2, **TOL)


def test_crd_negatives_exclude_anchor():
    index = torch.tensor([0, 4, 9])
    rows = sample_contrast_indices(index, 200, 10, torch.Generator().manual_seed(0))
    assert torch.equal(rows[:, 0], index)
    assert not (rows[:, 1:] == index.unsqueeze(1)).any()
    assert rows.min() >= 0 and rows.max() <= 9


def test_crd_banks_and_constants():
    torch.manual_seed(0)
    crd = L.create_loss("crd")
    crd.build(_context())
    assert crd.num_negatives == 19  # left empty: min(16384, num_train − 1)
    with pytest.raises(ValueError, match="num_negatives is 20 but the training set has only 20 samples"):
        L.create_loss("crd", {"num_negatives": 20}).build(_context())
    index = torch.tensor([3, 7, 11, 0])
    before = crd.memory_student.clone()
    inputs = LossInputs(
        torch.randn(4, 5), student_embedding=torch.randn(4, 16), teacher_embedding=torch.randn(4, 24), index=index
    )
    crd(inputs)
    z = crd.z_constants.clone()
    assert (z > 0).all()
    changed = (crd.memory_student != before).any(1)
    assert changed[index].all() and changed.sum() == 4
    assert torch.allclose(crd.memory_student[index].norm(dim=1), torch.ones(4))
    crd(inputs)
    assert torch.equal(crd.z_constants, z)  # Z frozen after the first call
    keys = set(crd.state_dict())
    assert {"memory_student", "memory_teacher", "z_constants"} <= keys


# ---------------------------------------------------------------------------------------------------
# Registry and gradients

EXPECTED = {"ce", "kd", "dkd", "dist", "logit_std", "nkd", "pld", "taid", "ofa", "nd", "fitnet", "at", "sp",
            "rkd", "pkt", "crd"}  # fmt: skip


def _context() -> BuildContext:
    student = ModelShapes(5, 16, [(4, 8, 8), (8, 4, 4), (16, 2, 2)])
    teacher = ModelShapes(5, 24, [(6, 8, 8), (12, 4, 4), (24, 2, 2)])
    return BuildContext(student, teacher, num_train=20, class_means=torch.randn(5, 24))


def _inputs(shapes: BuildContext, batch: int = 4) -> tuple[LossInputs, list[torch.Tensor], list[torch.Tensor]]:
    """Inputs where every tensor requires grad; returns (inputs, student tensors, teacher tensors)."""
    gen = torch.Generator().manual_seed(4)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    s, t = shapes.student, shapes.teacher
    student = [leaf(batch, s.num_classes), leaf(batch, s.embedding_dim)]
    student += [leaf(batch, *shape) for shape in s.stage_shapes]
    teacher = [leaf(batch, t.num_classes), leaf(batch, t.embedding_dim)]
    teacher += [leaf(batch, *shape) for shape in t.stage_shapes]
    inputs = LossInputs(
        student_logits=student[0],
        teacher_logits=teacher[0],
        target=torch.tensor([0, 1, 4, 1]),
        student_embedding=student[1],
        teacher_embedding=teacher[1],
        student_stages=student[2:],
        teacher_stages=teacher[2:],
        index=torch.tensor([2, 5, 6, 19]),
        step=3,
        total_steps=10,
    )
    return inputs, student, teacher


def test_every_name_registered_with_docstring_and_valid_needs():
    assert set(L.loss_names()) == EXPECTED
    for name in EXPECTED:
        cls = L.LOSSES[name]
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20, name
        assert set(cls.needs) <= ALL_NEEDS, name
        info = L.describe_loss(name)
        assert set(info) == {"name", "summary", "needs", "params", "paper"}
        assert info["summary"], name
        if name != "ce":
            assert info["paper"] and info["paper"].split(",")[0] in cls.__doc__, name
    assert L.describe_loss("dkd")["params"] == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_param_raises_type_error_naming_it(name):
    with pytest.raises(TypeError, match="not_a_param"):
        L.create_loss(name, {"not_a_param": 1})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gradients_reach_only_student_and_adapters(name):
    context = _context()
    loss = L.create_loss(name)
    loss.build(context)
    loss.train()
    inputs, student, teacher = _inputs(context)
    value = loss(inputs)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    for tensor in teacher:
        assert tensor.grad is None or not tensor.grad.any(), name
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in student), name
    for pname, param in loss.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), (name, pname)
    adapters = {"fitnet": "regressor.", "nd": "projector.", "crd": "embed_student."}
    if name in adapters:
        assert any(n.startswith(adapters[name]) for n, _ in loss.named_parameters()), name


def test_nd_projector_only_when_dims_differ():
    context = _context()
    same = BuildContext(context.student, ModelShapes(5, 16, context.teacher.stage_shapes), 20,
                        class_means=torch.randn(5, 16))  # fmt: skip
    nd = L.create_loss("nd")
    nd.build(same)
    assert nd.projector is None and "class_means" in nd.state_dict()
    nd_proj = L.create_loss("nd")
    nd_proj.build(context)
    assert nd_proj.projector is not None


def test_fitnet_default_stage_is_middle():
    fitnet = L.create_loss("fitnet")
    fitnet.build(_context())
    assert fitnet.stage_index == 1
