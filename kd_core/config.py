"""Experiment configuration: one YAML schema for the CLI, the dashboard form and stored runs.

Validation happens before anything trains. Every problem is reported with its field path and what is
allowed, e.g. ``recipe[1].params.temprature: unknown parameter of loss 'kd'; allowed: temperature``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_core.data import DATASETS
from kd_core.losses import LOSSES, describe_loss
from kd_core.losses.params import param_errors
from kd_core.models import MODELS, TORCHVISION_ARCHS, create_model, feature_spec
from kd_core.settings import default_dataset_root

if TYPE_CHECKING:
    from kd_core.teachers import RunTeachers

TEACHER_SOURCE = re.compile(r"^(train|random|torchvision|run:\d+|file:.+)$")


class ConfigError(ValueError):
    """A config that cannot run; ``errors`` holds (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {path}: {msg}" for path, msg in errors)
        super().__init__(f"invalid config:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _printable(value: str) -> str:
    """Text that ends up in paths and databases: no NUL or other control characters (PostgreSQL refuses NUL)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters (such as NUL or a line break)")
    return value


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False


class SchedulerConfig(_Strict):
    name: Literal["cosine", "step", "none"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs at which step decays the lr")
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _step_needs_milestones(self) -> "SchedulerConfig":
        if self.name == "step" and not self.milestones:
            raise ValueError("a step scheduler needs milestones, e.g. [150, 180, 210]")
        return self


def _scheduler_from_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class DatasetConfig(_Strict):
    name: str = "mnist5k"
    root: str = Field(default_factory=default_dataset_root, description="where datasets are downloaded or looked for")
    val_fraction: float = Field(0.1, ge=0, le=0.5)
    augment: bool = False
    subset: int | None = Field(None, ge=20, le=100_000_000, description="cap on training images, for quick runs")
    image_size: int | None = Field(None, ge=8, le=512, description="resize for imagefolder datasets")

    @field_validator("root")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a folder (or leave the key out for the default)")
        return _printable(value)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; allowed: {', '.join(sorted(DATASETS))}")
        return value


class TrainingConfig(_Strict):
    """How one model is trained: architecture, epochs, batch size, optimizer and schedule."""

    arch: str
    epochs: int = Field(10, ge=0, le=10_000)
    batch_size: int = Field(64, ge=2, le=8192)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    _scheduler = field_validator("scheduler", mode="before")(_scheduler_from_name)

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown architecture {value!r}; allowed: {', '.join(MODELS)}")
        return value


class TeacherConfig(TrainingConfig):
    source: str = Field("train", description="train | run:<id> | file:<path> | torchvision | random")

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        _printable(value)
        if not TEACHER_SOURCE.match(value):
            raise ValueError(f"{value!r} is not a teacher source; allowed: train, random, torchvision, run:<id>, file:<path>")
        return value


class StudentConfig(TrainingConfig):
    pass


class LossTerm(_Strict):
    loss: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up of the weight over this many epochs")


class AnalysisConfig(_Strict):
    """What the run computes for the Analysis page (stored as artifacts, so pages load instantly)."""

    enabled: bool = True
    cka_checkpoints: int = Field(4, ge=0, le=50, description="epochs with teacher-vs-student CKA (evenly spaced, last included)")
    samples: int = Field(500, ge=20, le=10_000, description="held-out images used for CKA, prototypes and projections")
    attribution_images: int = Field(12, ge=0, le=64)
    # t-SNE and UMAP take tens of seconds on a CPU: opt in per config
    projections: list[Literal["pca", "tsne", "umap"]] = Field(default_factory=lambda: ["pca"], min_length=1)


class ExperimentConfig(_Strict):
    name: str = Field("experiment", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="forward passes: auto = bf16 on GPUs that support it, fp32 on CPU; loss terms are always fp32"
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig
    student: StudentConfig
    recipe: list[LossTerm] = Field(min_length=1)
    baseline: bool = Field(True, description="also train the student with CE only, same seed")
    cache_teacher: bool = Field(True, description="compute teacher outputs once when nothing makes them vary")
    checkpoint_every_s: float = Field(60.0, ge=1, description="also checkpoint mid-epoch this often")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    _name = field_validator("name")(_printable)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Fields that do not change what is trained: renaming a run must not make its checkpoint foreign.
_NOT_FINGERPRINTED = ("name",)


def config_fingerprint(config: ExperimentConfig) -> str:
    """SHA-256 of everything in ``config`` that affects training (all but the name), canonically encoded."""
    data = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("recipe", 1, "params", "t")`` -> ``recipe[1].params.t``; a key that is not plain text is shown quoted."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith("function-"):
            text = str(part) if str(part).isprintable() and not any(c in str(part) for c in " .[]:") else repr(str(part))
            path += f".{text}" if path else text
    return path


def _recipe_errors(config: ExperimentConfig) -> list[tuple[str, str]]:
    """What the schema alone cannot see: loss names and params, and layers a loss needs."""
    errors: list[tuple[str, str]] = []
    archs = {"teacher": config.teacher.arch, "student": config.student.arch}
    for i, term in enumerate(config.recipe):
        where = f"recipe[{i}]"
        cls = LOSSES.get(term.loss)
        if cls is None:
            errors.append((f"{where}.loss", f"unknown loss {term.loss!r}; allowed: {', '.join(sorted(LOSSES))}"))
            continue
        allowed = describe_loss(term.loss)["params"]
        for param in term.params:
            if param not in allowed:
                errors.append((f"{where}.params.{param}", f"unknown parameter of loss {term.loss!r}; allowed: {', '.join(allowed) or 'none'}"))
        for name, default in allowed.items():
            if default is inspect.Parameter.empty and name not in term.params:
                errors.append((f"{where}.params.{name}", f"loss {term.loss!r} needs this parameter"))
        errors += [(f"{where}.params.{name}", message) for name, message in param_errors(term.loss, term.params, allowed)]
        if "stages" in cls.needs:
            for role, arch in archs.items():
                if not _has_stages(arch):
                    errors.append((f"{where}.loss", f"{term.loss!r} needs stage feature maps but the {role} {arch!r} has none; use a convolutional {role} or a logit loss"))
    if all(term.weight == 0 for term in config.recipe):
        errors.append(("recipe", "every term's weight is 0, so the student would not learn; give at least one term a positive weight"))
    if config.baseline and all(term.loss == "ce" for term in config.recipe):
        errors.append(("baseline", "the recipe is CE only, so the baseline would repeat it; set baseline: false or add a distillation term"))
    return errors


def _with_default_params(config: ExperimentConfig) -> ExperimentConfig:
    """Every loss parameter written out, defaults included, so a stored config says exactly what ran."""
    for term in config.recipe:
        defaults = describe_loss(term.loss)["params"]
        term.params = {name: term.params.get(name, default) for name, default in defaults.items()}  # required ones were checked
    return config


def _missing_teacher(data: dict[str, Any]) -> list[tuple[str, str]]:
    """A recipe that distils, with no teacher section: say which term needs one."""
    if data.get("teacher") is not None:
        return []
    recipe = data.get("recipe") if isinstance(data.get("recipe"), list) else []
    names = [t.get("loss") for t in recipe if isinstance(t, dict) and t.get("loss") in LOSSES and LOSSES[t["loss"]].needs - {"target", "index"}]
    if not names:
        return []
    return [("teacher", f"the recipe's {names[0]!r} term learns from a teacher, and there is none: add a teacher section (arch, source)")]


@functools.lru_cache(maxsize=None)
def _has_stages(arch: str) -> bool:
    return bool(feature_spec(create_model(arch, 10, 3, 32)).stages)


def _source_errors(config: ExperimentConfig, run_teachers: RunTeachers | None) -> list[tuple[str, str]]:
    source = config.teacher.source
    errors: list[tuple[str, str]] = []
    if source == "torchvision" and config.teacher.arch not in TORCHVISION_ARCHS:
        errors.append(("teacher.source", f"torchvision weights exist only for {', '.join(sorted(TORCHVISION_ARCHS))}; pick one of them or source: train"))
    if source.startswith("file:") and not Path(source[5:]).expanduser().is_file():
        errors.append(("teacher.source", f"no file at {source[5:]!r}; give the path of a .safetensors or .pt state dict"))
    elif source.startswith("file:") or (source.startswith("run:") and run_teachers is not None):
        errors += _teacher_weight_errors(config, run_teachers)
    if source == "train" and config.teacher.epochs == 0:
        errors.append(("teacher.epochs", "a teacher trained from scratch needs at least 1 epoch (or use source: random)"))
    if config.student.epochs == 0:
        errors.append(("student.epochs", "the student needs at least 1 epoch"))
    return errors


def _teacher_weight_errors(config: ExperimentConfig, run_teachers: RunTeachers | None) -> list[tuple[str, str]]:
    """Weights named by ``file:`` or ``run:`` must fit teacher.arch and the dataset's class count."""
    from kd_core.teachers import TeacherUnavailable, check_fits, read_state_dict

    info = DATASETS[config.dataset.name]
    if not info.num_classes:  # imagefolder: classes are known only once the folder is read
        return []
    source = config.teacher.source
    size = config.dataset.image_size or info.image_size
    try:
        path = Path(source[5:]).expanduser() if source.startswith("file:") else run_teachers(int(source[4:]))
        state = read_state_dict(path)
        model = create_model(config.teacher.arch, info.num_classes, info.in_channels, size)
        check_fits(model, state, config.teacher.arch, info.num_classes, path.name if source.startswith("file:") else f"run {source[4:]}'s teacher")
    except TeacherUnavailable as exc:
        return [("teacher.source", str(exc).removeprefix("teacher.source: "))]
    return []


def validate_config(data: dict[str, Any] | ExperimentConfig, *, run_teachers: RunTeachers | None = None) -> ExperimentConfig:
    """Parse and check a config dict; raise :class:`ConfigError` listing every problem found.

    ``run_teachers`` resolves ``teacher.source: run:<id>`` (see :func:`kd_core.teachers.run_teachers_in`);
    without it such a source is checked when the run starts.
    """
    if isinstance(data, ExperimentConfig):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise ConfigError([("(top level)", "a config is a mapping of fields, e.g. name:, teacher:, student:, recipe:")])
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors = [(field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        teacher = _missing_teacher(data)
        raise ConfigError(teacher + [e for e in errors if not (teacher and e[0] == "teacher")]) from None
    errors = _recipe_errors(config) + _source_errors(config, run_teachers)
    if errors:
        raise ConfigError(errors)
    return _with_default_params(config)


def load_config(path: str | Path, *, run_teachers: RunTeachers | None = None) -> ExperimentConfig:
    """Read and validate a YAML config file (``run_teachers`` as in :func:`validate_config`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([("(file)", f"no config file at {str(path)!r}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("(file)", f"{path} is not valid YAML: {exc}")]) from None
    return validate_config(data, run_teachers=run_teachers)
