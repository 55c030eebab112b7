"""Fuzzing the New-experiment form's validation with hypothesis (issue 9).

The page turns widget state into a config and checks it with ``ui.form_checks.check_form``; an imported YAML
goes through ``ui.form_state.config_to_state`` first. Hundreds of bad form states and configs go through
exactly those functions: each must give an error naming the field that was broken, never raise, and write
nothing (the database and the data folder stay as they were).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_core.data import DATASETS
from kd_core.losses import LOSSES
from kd_core.methods import METHODS
from kd_core.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs" / "mnist5k_kd.yaml").read_text())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------- bad values

words = st.text(min_size=1, max_size=30)
not_numbers = st.one_of(st.none(), words.filter(lambda w: not _is_number(w)), st.lists(st.integers(), max_size=3),
                        st.dictionaries(words, st.integers(), max_size=2))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
too_large = st.integers(min_value=2**53, max_value=2**80)
unicode_junk = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unknown(names) -> st.SearchStrategy[str]:
    return st.one_of(words, unicode_junk).filter(lambda w: w not in names)


def out_of(low: float | None = None, high: float | None = None, whole: bool = False) -> st.SearchStrategy:
    """Numbers outside [low, high], plus values that are not finite numbers at all."""
    num = st.integers if whole else (lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw))
    options = [not_numbers] + ([too_large] if whole or high is not None else [])  # no upper bound: any size is valid
    if low is not None:
        options.append(num(max_value=int(low) - 1 if whole else low, **({} if whole else {"exclude_max": True})))
    if high is not None:
        options.append(num(min_value=int(high) + 1 if whole else high, **({} if whole else {"exclude_min": True})))
    if not whole:
        options.append(not_finite)
    else:
        options.append(st.floats(min_value=0.1, max_value=100).filter(lambda f: not f.is_integer()))
    return st.one_of(*options)


def outside_paths(data_home: Path) -> st.SearchStrategy[str]:
    """Paths that are not in the data folder, written in ways that try to look as if they were."""
    tricks = [
        "/etc/passwd", "/", "../../etc", "~root/.ssh/id_rsa", f"{data_home}/../outside", f"{data_home}/link/passwd",
        f"{data_home}x/file", "//etc//passwd", "./../..", f"{data_home}/\x00/evil", "\x00", f"{data_home}/a\nb",
        "/tmp/ü/☃/file.pt", "C:\\Windows\\system32", "file:///etc/passwd",
    ]
    return st.one_of(st.sampled_from(tricks), unicode_junk.map(lambda t: "/" + t.lstrip("/")).filter(lambda p: not p.startswith(str(data_home))))


# --------------------------------------------------------------------------- form-state mutations: (key, value, field)


def model_mutations(role: str) -> list[st.SearchStrategy]:
    p = f"nx_{role[0]}_"
    return [
        st.tuples(st.just(f"{p}arch"), unknown(MODELS), st.just(f"{role}.arch")),
        st.tuples(st.just(f"{p}epochs"), out_of(0 if role == "teacher" else 1, 10_000, whole=True), st.just(f"{role}.epochs")),
        st.tuples(st.just(f"{p}bs"), out_of(2, 8192, whole=True), st.just(f"{role}.batch_size")),
        st.tuples(st.just(f"{p}opt"), unknown({"sgd", "adamw"}), st.just(f"{role}.optimizer.name")),
        st.tuples(st.just(f"{p}lr"), st.one_of(out_of(None, 10), st.floats(max_value=0), not_finite), st.just(f"{role}.optimizer.lr")),
        st.tuples(st.just(f"{p}mom"), st.one_of(out_of(0, None), st.floats(min_value=1, max_value=1e6)), st.just(f"{role}.optimizer.momentum")),
        st.tuples(st.just(f"{p}wd"), out_of(0, None), st.just(f"{role}.optimizer.weight_decay")),
        st.tuples(st.just(f"{p}sched"), unknown({"cosine", "step", "none"}), st.just(f"{role}.scheduler.name")),
        st.tuples(st.just(f"{p}gamma"), st.one_of(out_of(None, 1), st.floats(max_value=0)), st.just(f"{role}.scheduler.gamma")),
    ]


def state_mutations(data_home: Path) -> st.SearchStrategy[tuple[str, Any, str]]:
    return st.one_of(
        st.tuples(st.just("nx_name"), st.one_of(st.just(""), st.text(min_size=201, max_size=400), not_numbers.filter(lambda v: not isinstance(v, str)),
                                                st.text(max_size=10).map(lambda t: t + "\x00")), st.just("name")),
        st.tuples(st.just("nx_seed"), out_of(0, None, whole=True), st.just("seed")),
        st.tuples(st.just("nx_device"), unknown({"auto", "cpu", "cuda"}), st.just("device")),
        st.tuples(st.just("nx_precision"), unknown({"auto", "fp32", "bf16", "fp16"}), st.just("precision")),
        st.tuples(st.just("nx_ds_name"), unknown(DATASETS), st.just("dataset.name")),
        st.tuples(st.just("nx_ds_root"), outside_paths(data_home), st.just("dataset.root")),
        st.tuples(st.just("nx_ds_val"), out_of(0, 0.5), st.just("dataset.val_fraction")),
        st.tuples(st.just("nx_ds_subset"), out_of(20, None, whole=True).filter(lambda v: v is not None), st.just("dataset.subset")),
        st.tuples(st.just("nx_ds_image_size"), out_of(8, 512, whole=True).filter(lambda v: v is not None), st.just("dataset.image_size")),
        *model_mutations("teacher"), *model_mutations("student"),
        st.tuples(st.just("nx_s_milestones"), words.filter(lambda w: any(c.isalpha() for c in w)), st.just("student.scheduler.milestones")),
        st.tuples(st.just("nx_ckpt_s"), out_of(1, None), st.just("checkpoint_every_s")),
        st.tuples(st.just("nx_an_cka"), out_of(0, 50, whole=True), st.just("analysis.cka_checkpoints")),
        st.tuples(st.just("nx_an_samples"), out_of(20, 10_000, whole=True), st.just("analysis.samples")),
        st.tuples(st.just("nx_an_attr"), out_of(0, 64, whole=True), st.just("analysis.attribution_images")),
        st.tuples(st.just("nx_an_proj"), st.one_of(st.just([]), st.lists(unknown({"pca", "tsne", "umap"}), min_size=1, max_size=3)), st.just("analysis.projections")),
        st.tuples(st.just("source:file"), outside_paths(data_home), st.just("teacher.source")),
        st.tuples(st.just("source:run"), st.sampled_from([None, 1, 999, 2**40]), st.just("teacher.source")),
        st.tuples(st.just("source:upload"), st.just(None), st.just("teacher.source")),
        st.tuples(st.just("term:loss"), unknown(LOSSES), st.just("recipe[1].loss")),
        st.tuples(st.just("term:weight"), st.one_of(st.floats(max_value=-1e-9), not_finite, not_numbers), st.just("recipe[1].weight")),
        st.tuples(st.just("term:warmup_epochs"), out_of(0, None, whole=True), st.just("recipe[1].warmup_epochs")),
        st.tuples(st.just("term:p_temperature"), st.one_of(st.floats(max_value=0), not_finite, not_numbers.filter(lambda v: v is not None)), st.just("recipe[1].params.temperature")),
        st.tuples(st.just("term:extra"), st.sampled_from(["{temprature: 4}", "[[", "5", "{alpha: 1, beta: 2}", "☃: 1"]), st.just("recipe[1].params")),
        st.tuples(st.just("recipe:none"), st.just([]), st.just("recipe")),
        st.tuples(st.just("nx_method"), unknown(set(METHODS) | {"none"}), st.just("method.name")),
        st.tuples(st.just("method:params"), st.sampled_from(["[[", "5", "{nope: 1}", "- a list"]), st.just("method.params")),
        st.tuples(st.just("recipe:zero"), st.just(0.0), st.just("recipe")),
    )


def mutate(state: dict[str, Any], key: str, value: Any) -> None:
    """Set one widget (or a group of them, for the teacher source and the recipe) to a bad value."""
    kind, _, detail = key.partition(":")
    first, kd = state["nx_recipe_ids"]
    if kind == "source":
        state["nx_t_src"] = detail
        state.update({"file": {"nx_t_src_file": value}, "run": {"nx_t_src_run": value}, "upload": {"nx_t_upload_path": value}}[detail])
    elif kind == "term":
        state[f"nx_r{kd}_{detail}"] = value
    elif key == "method:params":
        state["nx_method"], state["nx_method_params"] = "dho", value
    elif key == "recipe:none":
        state["nx_recipe_ids"] = value
    elif key == "recipe:zero":
        state[f"nx_r{first}_weight"] = state[f"nx_r{kd}_weight"] = value
    else:
        state[key] = value
        if key in ("nx_s_milestones", "nx_s_gamma"):
            state["nx_s_sched"] = "step"
            state.setdefault("nx_s_milestones", "3")


def names_field(errors: dict[str, list[str]], field: str) -> bool:
    return any(path == field or path.startswith((field + ".", field + "[")) for path in errors)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder with a symbolic link pointing out of it, and a database holding one failed run."""
    from storage import Store

    home = tmp_path_factory.mktemp("fuzz") / "data"
    home.mkdir()
    (home / "link").symlink_to("/etc")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_HOME", str(home))
    mp.delenv("DISTILLERY_ALLOWED_ROOTS", raising=False)
    store = Store(f"sqlite:///{home.parent / 'fuzz.db'}")
    store.create_run("failed run", BASE, status="failed")
    yield home, store
    store.dispose()
    mp.undo()


def snapshot(home: Path, store) -> tuple:
    runs = [(r.id, r.status, r.config, r.summary, r.progress) for r in store.list_runs(include_hidden=True)]
    return runs, sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.fixture(scope="module")
def valid_state(world):
    from ui.form_checks import check_form
    from ui.form_state import config_to_state

    state, problems = config_to_state(BASE)
    assert problems == [] and check_form(state, world[1]).errors == {}
    return state


# --------------------------------------------------------------------------- the tests


@FUZZ
@given(data=st.data())
def test_bad_form_states_name_their_field(world, valid_state, data):
    from ui.form_checks import check_form

    home, store = world
    key, value, field = data.draw(state_mutations(home), label="mutation")
    state = copy.deepcopy(valid_state)
    mutate(state, key, value)
    before = snapshot(home, store)
    check = check_form(state, store)
    assert check.valid is None and names_field(check.errors, field), (key, value, check.errors)
    assert snapshot(home, store) == before


def config_mutations() -> st.SearchStrategy[tuple[str, str, Any]]:
    """(operation, path as keys and indices, value): drop a required key, add an unknown one, or put a wrong type somewhere."""
    required = ["teacher", "student", "recipe", "teacher.arch", "student.arch", "recipe.0.loss"]
    typed = {"seed": INT_LIKE, "dataset.val_fraction": FLOAT_LIKE, "dataset.subset": INT_LIKE, "teacher.epochs": INT_LIKE,
             "student.batch_size": INT_LIKE, "student.optimizer.lr": FLOAT_LIKE, "dataset": SECTION, "teacher.optimizer": SECTION,
             "recipe": st.one_of(st.just([]), words, st.dictionaries(words, words, max_size=2)), "recipe.1.params": words,
             "recipe.1.weight": FLOAT_LIKE, "baseline": BOOL_LIKE, "analysis.projections": words, "teacher.source": st.one_of(st.integers(), st.lists(words)),
             "name": st.one_of(st.integers(), st.lists(words, min_size=1)), "student.scheduler": st.integers(),
             "method": st.one_of(words, st.integers()), "teachers": st.lists(st.just({"arch": "cnn_small"}), min_size=1, max_size=2),
             "sweep": st.dictionaries(st.just("seed"), st.lists(st.integers(0, 9), min_size=1), min_size=1)}
    sections = [(), ("dataset",), ("teacher",), ("student", "optimizer"), ("analysis",), ("recipe", 0)]
    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(required).map(_parts), st.none()),
        st.tuples(st.just("add"), st.tuples(st.sampled_from(sections), unknown(schema_names())).map(lambda t: (*t[0], t[1])), st.integers()),
        *(st.tuples(st.just("set"), st.just(_parts(path)), values) for path, values in typed.items()),
    )


def _parts(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def schema_names() -> set[str]:
    """Every field name of the schema, at any depth: an "unknown" key must not be one of them."""
    from ui.form_fields import TERM_KEYS
    from ui.form_state import default_values

    def names(d: Any) -> set[str]:
        return set(d) | set().union(*(names(v) for v in d.values() if isinstance(v, dict))) if isinstance(d, dict) else set()

    return names(default_values()) | set(TERM_KEYS) | {"arch", "source"}


INT_LIKE = st.one_of(words.filter(lambda w: not _is_number(w)), st.lists(st.integers(), max_size=2), too_large, st.floats(min_value=0.1, max_value=9.9).filter(lambda f: not f.is_integer()))
FLOAT_LIKE = st.one_of(words.filter(lambda w: not _is_number(w)), st.lists(st.floats(), max_size=2), not_finite, st.dictionaries(words, st.integers(), max_size=1))
BOOL_LIKE = st.one_of(words, st.integers(min_value=2), st.lists(st.booleans(), max_size=1))
SECTION = st.one_of(words, st.integers(), st.lists(st.integers(), max_size=2))


def apply(config: dict[str, Any], op: str, parts: tuple[str | int, ...], value: Any) -> str:
    """Apply the mutation at ``parts`` (keys and list indices); returns the field path an error must name."""
    *parents, last = parts
    target: Any = config
    for part in parents:
        target = target[part] if isinstance(part, int) else target.setdefault(part, {})
    if op == "drop":
        del target[last]
    else:
        target[last] = value
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


@FUZZ
@given(mutation=config_mutations())
def test_bad_configs_name_their_field(world, mutation):
    """An imported config: refused with the field named, or loaded and then refused by the form's checks."""
    from ui.form_checks import check_form
    from ui.form_state import config_to_state

    home, store = world
    op, parts, value = mutation
    config = copy.deepcopy(BASE)
    field = apply(config, op, parts, value)
    before = snapshot(home, store)
    state, problems = config_to_state(config)
    found = dict.fromkeys(p for p, _ in problems) if problems else check_form(state, store).errors
    assert found and names_field(found, field), (mutation, problems or found)
    assert snapshot(home, store) == before
