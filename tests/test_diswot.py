"""DisWOT's training-free "which student?" ranking (kd_core.diswot) and ``python -m kd_core rank-students``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from kd_core.config import validate_config
from kd_core.diswot import (
    gaussian_init_,
    rank_students,
    relation_distance,
    score_pair,
    semantic_distance,
)
from kd_core.models import MLP, MODELS, ModelInfo, _with_spec, create_model

CANDIDATES = ["cnn_tiny", "lenet5", "mlp"]


def config(**overrides: Any) -> dict[str, Any]:
    return {"name": "rank", "seed": 0, "device": "cpu", "dataset": {"name": "digits", "val_fraction": 0.1},
            "teacher": {"arch": "cnn_small"}, "student": {"arch": "cnn_tiny"}, "recipe": [{"loss": "kd"}], **overrides}


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


@pytest.fixture
def no_optimizers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any optimizer built while the fixture is active fails the test."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("an optimizer was created: DisWOT must not train")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)


@pytest.fixture
def tiny_mlp(monkeypatch: pytest.MonkeyPatch) -> str:
    """A far too small student: an MLP whose hidden layer has 2 units."""
    name = "test:mlp_2"
    monkeypatch.setitem(MODELS, name, ModelInfo(name, "small", lambda nc, ic, s: _with_spec(MLP(ic * s * s, [2], nc), [], "fc"), "2 hidden units"))
    return name


def test_scoring_takes_no_training_step_and_leaves_every_weight_and_buffer_as_it_was(no_optimizers: None) -> None:
    teacher = gaussian_init_(create_model("cnn_small", 10, 1, 8))
    student = gaussian_init_(create_model("cnn_tiny", 10, 1, 8)).eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}  # parameters and BN running statistics
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = batch()
    pair = score_pair(teacher, student, x, y)
    assert pair.relation < 0 and pair.semantic < 0 and pair.score == pair.relation + pair.semantic
    for model, saved in ((student, before), (teacher, teacher_before)):
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())  # not even a gradient left behind
    assert not student.training  # its mode comes back too


def test_rank_students_builds_no_optimizer(no_optimizers: None) -> None:
    ranking = rank_students(config(), CANDIDATES, repeats=1, batch_size=16)
    assert [c.rank for c in ranking.candidates] == [1, 2, 3] and {c.arch for c in ranking.candidates} == set(CANDIDATES)


def test_the_similarities_are_the_released_gram_distances() -> None:
    f = torch.randn(8, 5, 3, 3)
    assert relation_distance(f, f) == 0 and relation_distance(f, 2.0 * f) < 1e-12  # scale-free, like SP's normalized Grams
    assert relation_distance(f, torch.randn(8, 7)) > 0  # any widths: B x B Grams
    g_t, g_s = torch.randn(10, 128), torch.randn(10, 16)  # classifier-weight gradients of different widths
    manual = (torch.nn.functional.normalize(g_t @ g_t.T, dim=1) - torch.nn.functional.normalize(g_s @ g_s.T, dim=1)).pow(2).sum() / 10
    assert semantic_distance(g_t, g_s).item() == pytest.approx(manual.item(), rel=1e-6)
    # the teacher scored against itself is the best possible student: both distances are 0
    teacher = gaussian_init_(create_model("cnn_small", 10, 1, 8))
    assert score_pair(teacher, teacher, *batch()).score == 0


def test_the_ranking_is_deterministic_for_a_seed() -> None:
    a = rank_students(config(), CANDIDATES, repeats=2, batch_size=16, seed=3)
    b = rank_students(config(), list(reversed(CANDIDATES)), repeats=2, batch_size=16, seed=3)
    assert a.records() == b.records()  # nor does the order the candidates are given in matter
    c = rank_students(config(), CANDIDATES, repeats=2, batch_size=16, seed=4)
    assert [r["score"] for r in c.records()] != [r["score"] for r in a.records()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_far_too_small_student_ranks_below_good_ones(tiny_mlp: str, seed: int) -> None:
    # the relation part separates them by orders of magnitude at every seed
    ranking = rank_students(config(), ["cnn_small", "cnn_tiny", tiny_mlp], repeats=3, batch_size=32, seed=seed, by="relation")
    assert ranking.candidates[-1].arch == tiny_mlp and ranking.ranked_by == "relation"
    bad = ranking.candidates[-1].relation
    assert all(c.relation > 10 * bad for c in ranking.candidates[:-1])


def test_trained_teachers_are_used_only_when_asked_and_only_when_they_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Gaussian-initialised teacher anyway"):
        rank_students(config(), CANDIDATES, repeats=1, teacher_init="trained")
    path = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_file(create_model("cnn_small", 10, 1, 8).state_dict(), str(path))
    cfg = config(teacher={"arch": "cnn_small", "source": f"file:{path}"})
    trained = rank_students(cfg, CANDIDATES, repeats=1, batch_size=16, teacher_init="trained")
    gaussian = rank_students(cfg, CANDIDATES, repeats=1, batch_size=16)
    assert trained.teacher_init == "trained" and "trained weights" in trained.describe()
    assert [r["score"] for r in trained.records()] != [r["score"] for r in gaussian.records()]
    assert "Gaussian-initialised" in gaussian.describe()


def test_the_cli_prints_the_numbers_of_the_library_function(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kd_core.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config()))
    assert main(["rank-students", str(path), "--candidates", ",".join(CANDIDATES), "--repeats", "2", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    ranking = rank_students(validate_config(config()), CANDIDATES, repeats=2, batch_size=16)
    assert printed == f"{ranking.describe()}\n{ranking.table()}\n"
    rows = [line.split() for line in printed.splitlines() if re.match(r"^\d+ ", line)]
    assert [(r[1], float(r[3]), float(r[4]), float(r[5])) for r in rows] == [
        (c["arch"], round(c["relation"], 6), round(c["semantic"], 6), round(c["score"], 6)) for c in ranking.records()]
    assert main(["rank-students", str(path), "--candidates", "cnn_tiny,nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
