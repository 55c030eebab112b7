"""Experiment configuration: one YAML schema for the CLI, the dashboard form and stored runs.

Validation happens before anything trains. Every problem is reported with its field path and what is
allowed, e.g. ``recipe[1].params.temprature: unknown parameter of loss 'kd'; allowed: temperature``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kd_core.config_checks import config_errors, missing_teacher, with_default_params
from kd_core.data import DATASETS, ClassSelection
from kd_core.models import MODELS
from kd_core.settings import default_dataset_root

if TYPE_CHECKING:
    from kd_core.teachers import RunTeachers

TEACHER_SOURCE = re.compile(r"^(train|random|torchvision|timm|run:\d+|file:.+)$")
PRETRAINED_SOURCES = ("torchvision", "timm")  # ImageNet weights, adapted to the dataset, then fine-tuned for teacher.epochs


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
    loader: Literal["auto", "resident", "streaming"] = Field(
        "auto", description="resident: uint8 images on the training device; streaming: image files decoded by worker processes "
        "(imagefolder only); auto: resident when they fit the memory budget",
    )
    workers: int | None = Field(None, ge=0, le=64, description="streaming loader processes (default: one per core, up to 8)")
    classes: ClassSelection | None = Field(
        None, description="keep only these classes, relabelled 0, 1, ... in this order; a list merges classes into one, "
        "e.g. [3, 5] or [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]",
    )

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

    @field_validator("classes")
    @classmethod
    def _selectable(cls, value: ClassSelection | None, info: ValidationInfo) -> ClassSelection | None:
        if value is None:
            return value
        groups = [[c] if isinstance(c, int) else c for c in value]
        members = [c for group in groups for c in group]
        name = info.data.get("name")
        available = DATASETS[name].num_classes if name in DATASETS else 0  # 0: imagefolder, checked when the folder is read
        if len(groups) < 2:
            raise ValueError("keep at least 2 classes (or leave the key out for all of them)")
        if any(not group for group in groups):
            raise ValueError("an empty list merges no class; give at least one class per entry")
        if any(c < 0 or (available and c >= available) for c in members):
            raise ValueError(f"{name} has classes 0 to {available - 1}; got {sorted(set(members))}" if available
                             else f"class numbers are >= 0; got {sorted(set(members))}")
        if len(set(members)) < len(members):
            raise ValueError("each class may appear once")
        return value

    @field_validator("loader")
    @classmethod
    def _streamable(cls, value: str, info: ValidationInfo) -> str:
        name = info.data.get("name")
        if value == "streaming" and name in DATASETS and not DATASETS[name].streamable:
            raise ValueError(f"{name} is not read from image files, so it cannot be streamed; use resident or auto "
                             f"(streamable: {', '.join(n for n, d in DATASETS.items() if d.streamable)})")
        return value


class TrainingConfig(_Strict):
    """How one model is trained: architecture, epochs, batch size, optimizer and schedule."""

    arch: str
    epochs: int = Field(10, ge=0, le=10_000)
    batch_size: int = Field(64, ge=2, le=8192)
    devices: int = Field(1, ge=1, le=64, description="processes (GPUs on CUDA) training this phase with DDP; batch_size stays the global batch")
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
    source: str = Field("train", description="train | run:<id> | file:<path> | torchvision | timm (timm: archs, local files only) | random")

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        _printable(value)
        if not TEACHER_SOURCE.match(value):
            raise ValueError(f"{value!r} is not a teacher source; allowed: train, random, torchvision, timm, run:<id>, file:<path>")
        return value


class StudentConfig(TrainingConfig):
    pass


class LossTerm(_Strict):
    loss: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up of the weight over this many epochs")


class MethodConfig(_Strict):
    """A method that changes the training loop (``kd_core.methods``), with its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class AnalysisConfig(_Strict):
    """What the run computes for the Analysis page (stored as artifacts, so pages load instantly)."""

    enabled: bool = True
    cka_checkpoints: int = Field(4, ge=0, le=50, description="epochs with teacher-vs-student CKA (evenly spaced, last included)")
    samples: int = Field(500, ge=20, le=10_000, description="held-out images used for CKA, prototypes and projections")
    attribution_images: int = Field(12, ge=0, le=64)
    # t-SNE and UMAP take tens of seconds on a CPU: opt in per config
    projections: list[Literal["pca", "tsne", "umap"]] = Field(default_factory=lambda: ["pca"], min_length=1)


class SoftLabelsConfig(_Strict):
    """The teacher's per-epoch outputs on augmented batches, stored once and read by later runs (kd_core.engine.soft_labels)."""

    store: bool = Field(True, description="write the teacher's logits of each augmented epoch once; later runs with the same "
                        "teacher, data and augmentation read them instead of running the teacher")
    top_k: int | None = Field(None, ge=1, description="for more than 100 classes: keep only the k largest teacher probabilities "
                              "per image (lossy; see the README); none = full float32 logits")


class ExperimentConfig(_Strict):
    name: str = Field("experiment", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="forward passes: auto = bf16 on GPUs that support it, fp32 on CPU; loss terms are always fp32"
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig
    teachers: list[TeacherConfig] = Field(default_factory=list, description="further teachers of an ensemble (methods such as meal_v2)")
    student: StudentConfig
    recipe: list[LossTerm] = Field(default_factory=list, description="weighted loss terms; may be empty when the method has its own loss")
    method: MethodConfig | None = Field(None, description="a method that changes the training loop; none = the plain recipe")
    baseline: bool = Field(True, description="also train the student with CE only, same seed")
    cache_teacher: bool = Field(True, description="compute teacher outputs once when nothing makes them vary")
    channels_last: bool | Literal["auto"] = Field("auto", description="channels-last memory layout of the models; auto = on CUDA only")
    compile: bool = Field(False, description="torch.compile the student (and a teacher trained here); the first steps pay the compilation")
    soft_labels: SoftLabelsConfig = Field(default_factory=SoftLabelsConfig)
    checkpoint_every_s: float = Field(60.0, ge=1, description="also checkpoint mid-epoch this often")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    _name = field_validator("name")(_printable)

    @property
    def all_teachers(self) -> list[TeacherConfig]:
        """The teacher, then any further teachers of an ensemble."""
        return [self.teacher, *self.teachers]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Fields that do not change what is trained: renaming a run, giving its loader more workers or training it on
# another number of devices must not make its checkpoint foreign.
_NOT_FINGERPRINTED = (("name",), ("dataset", "workers"), ("teacher", "devices"), ("student", "devices"))
# Fields added after runs were stored, with their defaults: a config that leaves one at its default keeps the
# fingerprint it had before the field existed, so its checkpoint still resumes.
_ADDED_LATER = {("dataset", "classes"): None, ("dataset", "loader"): "auto", ("channels_last",): "auto", ("compile",): False}


def config_fingerprint(config: ExperimentConfig) -> str:
    """SHA-256 of everything in ``config`` that affects training (all but the name), canonically encoded."""
    data = config.model_dump(mode="json")
    dropped = [path for path in _NOT_FINGERPRINTED] + [path for path, default in _ADDED_LATER.items() if lookup_path(data, path) == default]
    for *parents, key in dropped:
        section = data
        for part in parents:
            section = section[part]
        section.pop(key, None)
    for teacher in data["teachers"]:
        teacher.pop("devices", None)
    # only a top-k store changes what the student learns from (full logits read back are bit-equal to live ones);
    # added later, so a config without top-k keeps its fingerprint
    soft_labels = data.pop("soft_labels", None) or {}
    if soft_labels.get("store") and soft_labels.get("top_k") is not None:
        data["soft_labels_top_k"] = soft_labels["top_k"]
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lookup_path(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


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


def validate_config(data: dict[str, Any] | ExperimentConfig, *, run_teachers: RunTeachers | None = None) -> ExperimentConfig:
    """Parse and check a config dict; raise :class:`ConfigError` listing every problem found.

    ``run_teachers`` resolves ``teacher.source: run:<id>`` (see :func:`kd_core.teachers.run_teachers_in`);
    without it such a source is checked when the run starts.
    """
    if isinstance(data, ExperimentConfig):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise ConfigError([("(top level)", "a config is a mapping of fields, e.g. name:, teacher:, student:, recipe:")])
    if "sweep" in data:
        raise ConfigError([("sweep", "this config is a sweep (several runs): launch it with `python -m kd_core sweep FILE` or the form's sweep")])
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors = [(field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        teacher = missing_teacher(data)
        raise ConfigError(teacher + [e for e in errors if not (teacher and e[0] == "teacher")]) from None
    errors = config_errors(config, run_teachers)
    if errors:
        raise ConfigError(errors)
    return with_default_params(config)


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
