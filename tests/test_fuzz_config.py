"""Bad configs from hypothesis, through ``validate_config`` and the CLI: every one is refused with an error
that names the field, never a traceback, and nothing reaches the database."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_core.cli import main as cli_main
from kd_core.config import ConfigError, field_path, validate_config

BASE: dict[str, Any] = {
    "name": "fuzz",
    "seed": 0,
    "device": "cpu",
    "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 100},
    "teacher": {"arch": "cnn_small", "source": "train", "epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
    "student": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 32},
    "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}],
    "analysis": {"enabled": False},
}

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters=".[]:"), min_size=1, max_size=12)
not_a_number = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1), st.none())
huge = st.sampled_from([10**12, -(10**12), 2**63, math.inf, -math.inf])

# (field path, values that field must refuse)
BAD_VALUES: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("seed", st.one_of(st.integers(max_value=-1), not_a_number, st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer() if math.isfinite(v) else True))),
    ("device", st.one_of(text.filter(lambda v: v not in ("auto", "cpu", "cuda")), not_a_number)),
    ("precision", text.filter(lambda v: v not in ("auto", "fp32", "bf16", "fp16"))),
    ("dataset.name", text.filter(lambda v: v not in ("digits", "mnist5k", "synthetic", "mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "imagefolder"))),
    ("dataset.val_fraction", st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=0.5000001), huge)),
    ("dataset.subset", st.one_of(st.integers(max_value=19), huge)),
    ("dataset.image_size", st.one_of(st.integers(max_value=7), st.integers(min_value=513))),
    ("dataset.root", st.sampled_from(["", "a\x00b", "\x00"])),
    ("teacher.arch", text.filter(lambda v: v not in ("mlp", "lenet5", "cnn_tiny", "cnn_small"))),
    ("teacher.source", st.one_of(text.filter(lambda v: not re.match(r"^(train|random|torchvision|timm|run:\d+|file:.+)$", v)),
                                 st.sampled_from(["file:/no/such/teacher.pt", "file:../../../../etc/passwd", "file:~/\u00e9\u00e8/t.safetensors", "torchvision"]))),
    ("teacher.epochs", st.one_of(st.integers(max_value=-1), st.integers(min_value=10_001), not_a_number)),
    ("teacher.batch_size", st.one_of(st.integers(max_value=1), st.integers(min_value=8193))),
    ("teacher.optimizer.lr", st.one_of(st.floats(max_value=0.0), st.floats(min_value=10.0001), huge)),
    ("teacher.optimizer.name", text.filter(lambda v: v not in ("sgd", "adamw"))),
    ("student.arch", not_a_number),
    ("student.epochs", st.one_of(st.just(0), st.integers(max_value=-1))),
    ("student.batch_size", st.one_of(st.integers(max_value=1), not_a_number)),
    ("student.optimizer.momentum", st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0))),
    ("student.scheduler", st.sampled_from(["exponential", {"name": "step"}, {"name": "step", "milestones": "soon"}])),
    ("recipe", st.one_of(st.just([]), st.just([{"loss": "ce", "weight": 0}, {"loss": "kd", "weight": 0}]), text)),
    ("recipe[1].loss", text.filter(lambda v: v not in ("ce", "kd", "dkd", "dist", "logit_std", "nkd", "pld", "taid", "ofa", "fitnet", "at", "nd", "sp", "rkd", "pkt", "crd"))),
    ("recipe[1].weight", st.one_of(st.floats(max_value=-1e-9), not_a_number)),
    ("recipe[1].params.temperature", st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan), st.just(math.inf), st.text(min_size=1, max_size=5))),
    ("recipe[1].warmup_epochs", st.integers(max_value=-1)),
    ("analysis.samples", st.one_of(st.integers(max_value=19), st.integers(min_value=10_001))),
    ("checkpoint_every_s", st.one_of(st.floats(max_value=0.999), not_a_number)),
]

MISSING = ["teacher", "student", "recipe", "teacher.arch", "student.arch", "recipe[0].loss"]
EXTRA = ["", "dataset", "teacher", "teacher.optimizer", "recipe[1]", "analysis"]


def _parts(path: str) -> list[str | int]:
    """``recipe[1].params.x`` -> ["recipe", 1, "params", "x"] (keys may hold any character but . [ ])."""
    return [int(p) if p.isdigit() and f"[{p}]" in path else p for p in re.findall(r"[^.\[\]]+", path)]


def _set(data: dict[str, Any], path: str, value: Any, *, delete: bool = False) -> None:
    *parents, leaf = _parts(path)
    node: Any = data
    for part in parents:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    if delete:
        del node[leaf]
    else:
        node[leaf] = value


@st.composite
def bad_configs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A config with one thing wrong, and the field path the error must name."""
    data = copy.deepcopy(BASE)
    kind = draw(st.sampled_from(["value", "value", "value", "missing", "extra"]))
    if kind == "missing":
        path = draw(st.sampled_from(MISSING))
        _set(data, path, None, delete=True)
        return data, path
    if kind == "extra":
        parent, key = draw(st.sampled_from(EXTRA)), "x" + draw(text)
        path = f"{parent}.{key}" if parent else key
        _set(data, path, draw(st.integers()))
        return data, path
    path, values = draw(st.sampled_from(BAD_VALUES))
    _set(data, path, draw(values))
    return data, path


def names_field(errors: list[tuple[str, str]], path: str) -> bool:
    """The error is about ``path``: that field, something inside it, or the section that contains it."""
    path = field_path(_parts(path))
    return any(p == path or p.startswith(path + ".") or p.startswith(path + "[") or path.startswith(p + ".") or path.startswith(p + "[")
               for p, _ in errors)


# derandomized: CI runs the same 300 cases every time (a failure there is reproducible here)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_the_base_config_is_valid() -> None:
    assert validate_config(copy.deepcopy(BASE))


@FUZZ
@given(bad_configs())
def test_validate_config_names_the_field_of_every_bad_config(case: tuple[dict[str, Any], str]) -> None:
    data, path = case
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert names_field(info.value.errors, path), (path, info.value.errors)
    assert all(message and "Traceback" not in message for _, message in info.value.errors)


@FUZZ
@given(case=bad_configs())
def test_the_cli_refuses_every_bad_config_without_a_traceback_or_a_row(case: tuple[dict[str, Any], str], tmp_path_factory: pytest.TempPathFactory,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data, path = case
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "bad.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True))
    db = f"sqlite:///{folder / 'runs.db'}"
    for command in (["submit", str(config)], ["run", str(config)]):
        assert cli_main([*command, "--db", db]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: invalid config") and "Traceback" not in err, err
        shown = [line[4:].split(": ", 1)[0] for line in err.splitlines() if line.startswith("  - ")]
        assert names_field([(p, "") for p in shown], path), (path, err)
    from storage import Store

    store = Store(db)
    assert store.list_runs(include_hidden=True) == []
    store.dispose()
