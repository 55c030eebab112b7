"""What the config schema alone cannot see: loss and method names and parameters, layers a term needs,
teacher sources and weights, and combinations that cannot train. Each problem is (field path, message)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_core.data import DATASETS, num_classes_of
from kd_core.losses import LOSSES, describe_loss
from kd_core.losses.params import param_errors
from kd_core.models import TORCHVISION_ARCHS, create_model, feature_spec

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig, TeacherConfig
    from kd_core.teachers import RunTeachers

Errors = list[tuple[str, str]]


def config_errors(config: ExperimentConfig, run_teachers: RunTeachers | None) -> Errors:
    errors = _method_errors(config)
    errors += _recipe_errors(config)
    for i, teacher in enumerate(config.all_teachers):
        errors += _source_errors(config, teacher, "teacher" if i == 0 else f"teachers[{i - 1}]", run_teachers)
    if config.student.epochs == 0:
        errors.append(("student.epochs", "the student needs at least 1 epoch"))
    return errors + _soft_label_errors(config) + _devices_errors(config)


def _soft_label_errors(config: ExperimentConfig) -> Errors:
    top_k, num_classes = config.soft_labels.top_k, num_classes_of(config.dataset.name, config.dataset.classes)
    if top_k is not None and num_classes and top_k >= num_classes:  # 0 classes: imagefolder, known once read
        return [("soft_labels.top_k", f"keep fewer than the dataset's {num_classes} classes (1 to {num_classes - 1}), "
                 "or leave it out for full logits")]
    return []


def run_devices(config: ExperimentConfig) -> int:
    """How many processes (devices) train the run: every phase of a run trains on the same ones."""
    return config.student.devices


def _devices_errors(config: ExperimentConfig) -> Errors:
    import os

    from kd_core.runner.base import visible_gpus

    errors: Errors = []
    n = config.student.devices
    for i, teacher in enumerate(config.all_teachers):
        where = "teacher" if i == 0 else f"teachers[{i - 1}]"
        trains = teacher.source in ("train", "torchvision", "timm") and teacher.epochs > 0
        if trains and teacher.devices != n:
            errors.append((f"{where}.devices", f"a teacher trained in the run uses the student's devices (student.devices: {n}); got {teacher.devices}"))
        elif not trains and teacher.devices != 1:
            errors.append((f"{where}.devices", "only a teacher trained in this run (source: train) trains on several devices; leave it at 1"))
    if n > 1 and config.dataset.loader == "streaming":
        errors.append(("dataset.loader", f"streaming is not supported on several devices yet (student.devices: {n}); "
                                         "use resident, or one device"))
    if config.student.batch_size < n:
        errors.append(("student.batch_size", f"each of the student.devices: {n} processes needs rows of the batch; use at least {n}"))
    gpus = visible_gpus()
    # the Ray cluster, not this host, has the GPUs; it keeps a job pending until N of them are free
    on_cuda = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if on_cuda and n > gpus and os.environ.get("DISTILLERY_EXECUTOR") != "ray":
        errors.append(("student.devices", f"{n} devices on CUDA, but {gpus} CUDA GPU(s) are visible here; lower student.devices "
                                          "or use device: cpu (several CPU processes with gloo)"))
    return errors


def _param_errors(where: str, kind: str, name: str, params: dict[str, Any], allowed: dict[str, Any]) -> Errors:
    errors = [(f"{where}.params.{p}", f"unknown parameter of {kind} {name!r}; allowed: {', '.join(allowed) or 'none'}") for p in params if p not in allowed]
    errors += [(f"{where}.params.{p}", f"{kind} {name!r} needs this parameter") for p, d in allowed.items() if d is inspect.Parameter.empty and p not in params]
    return errors + [(f"{where}.params.{p}", message) for p, message in param_errors(name, params, allowed)]


def _recipe_errors(config: ExperimentConfig) -> Errors:
    errors: Errors = []
    archs = {"teacher": config.teacher.arch, "student": config.student.arch}
    for i, term in enumerate(config.recipe):
        where = f"recipe[{i}]"
        cls = LOSSES.get(term.loss)
        if cls is None:
            errors.append((f"{where}.loss", f"unknown loss {term.loss!r}; allowed: {', '.join(sorted(LOSSES))}"))
            continue
        errors += _param_errors(where, "loss", term.loss, term.params, describe_loss(term.loss)["params"])
        if "stages" in cls.needs:
            errors += [(f"{where}.loss", f"{term.loss!r} needs stage feature maps but the {role} {arch!r} has none; use a convolutional {role} or a logit loss")
                       for role, arch in archs.items() if not has_stages(arch)]
        if config.teachers and cls.needs & {"embedding", "stages", "class_means"}:
            errors.append((f"{where}.loss", f"{term.loss!r} reads one teacher's features, but an ensemble of teachers is given: use a logit loss"))
    errors += _training_signal_errors(config)
    return errors


def _training_signal_errors(config: ExperimentConfig) -> Errors:
    from kd_core.methods import METHODS

    own_loss = config.method is not None and config.method.name in METHODS and METHODS[config.method.name].has_own_loss
    if not config.recipe and not own_loss:
        return [("recipe", "the recipe is empty and no method adds a loss: add a term, e.g. {loss: ce} and {loss: kd}")]
    if config.recipe and not own_loss and all(term.weight == 0 for term in config.recipe):
        return [("recipe", "every term's weight is 0, so the student would not learn; give at least one term a positive weight")]
    if config.baseline and config.method is None and all(term.loss == "ce" for term in config.recipe):
        return [("baseline", "the recipe is CE only, so the baseline would repeat it; set baseline: false or add a distillation term")]
    return []


def _method_errors(config: ExperimentConfig) -> Errors:
    from kd_core.methods import METHODS, create_method, describe_method

    method = config.method
    if method is None:
        return [("teachers", "further teachers need a method that combines them, e.g. method: {name: meal_v2}")] if config.teachers else []
    cls = METHODS.get(method.name)
    if cls is None:
        return [("method.name", f"unknown method {method.name!r}; allowed: {', '.join(sorted(METHODS))}")]
    errors = _param_errors("method", "method", method.name, method.params, describe_method(method.name)["params"])
    if not errors:
        try:
            create_method(method.name, method.params)
        except (TypeError, ValueError) as exc:
            errors.append(("method.params", str(exc)))
    if config.teachers and not cls.takes_teachers:
        errors.append(("teachers", f"method {method.name!r} distils from one teacher; remove teachers or use a method for ensembles"))
    return errors + cls.config_errors(config)


def with_default_params(config: ExperimentConfig) -> ExperimentConfig:
    """Every loss and method parameter written out, defaults included, so a stored config says exactly what ran."""
    from kd_core.methods import describe_method

    for term in config.recipe:
        defaults = describe_loss(term.loss)["params"]
        term.params = {name: term.params.get(name, default) for name, default in defaults.items()}  # required ones were checked
    if config.method is not None:
        defaults = describe_method(config.method.name)["params"]
        config.method.params = {name: _plain(config.method.params.get(name, default)) for name, default in defaults.items()}
    return config


def _plain(value: Any) -> Any:
    """As YAML and JSON give it back (a tuple default becomes a list), so a stored config round-trips."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def missing_teacher(data: dict[str, Any]) -> Errors:
    """A recipe that distils, with no teacher section: say which term needs one."""
    if data.get("teacher") is not None:
        return []
    recipe = data.get("recipe") if isinstance(data.get("recipe"), list) else []
    names = [t.get("loss") for t in recipe if isinstance(t, dict) and t.get("loss") in LOSSES and LOSSES[t["loss"]].needs - {"target", "index"}]
    if not names:
        return []
    return [("teacher", f"the recipe's {names[0]!r} term learns from a teacher, and there is none: add a teacher section (arch, source)")]


@functools.lru_cache(maxsize=None)
def has_stages(arch: str) -> bool:
    return bool(feature_spec(create_model(arch, 10, 3, 32)).stages)


def _source_errors(config: ExperimentConfig, teacher: TeacherConfig, where: str, run_teachers: RunTeachers | None) -> Errors:
    source = teacher.source
    errors: Errors = []
    if source == "torchvision" and teacher.arch not in TORCHVISION_ARCHS:
        errors.append((f"{where}.source", f"torchvision weights exist only for {', '.join(sorted(TORCHVISION_ARCHS))}; pick one of them or source: train"))
    if source == "timm":
        errors += _timm_source_errors(config, teacher, where)
    if source.startswith("file:") and not Path(source[5:]).expanduser().is_file():
        errors.append((f"{where}.source", f"no file at {source[5:]!r}; give the path of a .safetensors or .pt state dict"))
    elif source.startswith("file:") or (source.startswith("run:") and run_teachers is not None):
        errors += _teacher_weight_errors(config, teacher, where, run_teachers)
    if source == "train" and teacher.epochs == 0:
        errors.append((f"{where}.epochs", "a teacher trained from scratch needs at least 1 epoch (or use source: random)"))
    return errors


def _timm_source_errors(config: ExperimentConfig, teacher: TeacherConfig, where: str) -> Errors:
    """``source: timm`` needs a timm: arch with weights timm can adapt, and their file on this machine (checked now, before any work)."""
    from kd_core.teachers import TeacherUnavailable
    from kd_core.timm_pretrained import checked_weights, source_problem

    info = DATASETS[config.dataset.name]
    size = config.dataset.image_size or info.image_size
    problem = source_problem(teacher.arch, size)
    if problem:
        return [(f"{where}.source", problem)]
    try:
        # the classifier is left out of the check, so any class count builds a model to check against
        model = create_model(teacher.arch, num_classes_of(config.dataset.name, config.dataset.classes) or 2, info.in_channels, size)
        checked_weights(model, teacher.arch, size)
    except TeacherUnavailable as exc:
        return [(f"{where}.source", str(exc).removeprefix("teacher.source: "))]
    return []


def _teacher_weight_errors(config: ExperimentConfig, teacher: TeacherConfig, where: str, run_teachers: RunTeachers | None) -> Errors:
    """Weights named by ``file:`` or ``run:`` must fit the teacher's arch and the dataset's class count."""
    from kd_core.teachers import TeacherUnavailable, check_fits, read_state_dict

    info = DATASETS[config.dataset.name]
    num_classes = num_classes_of(config.dataset.name, config.dataset.classes)
    if not num_classes:  # imagefolder: classes are known only once the folder is read
        return []
    source = teacher.source
    size = config.dataset.image_size or info.image_size
    try:
        path = Path(source[5:]).expanduser() if source.startswith("file:") else run_teachers(int(source[4:]))  # type: ignore[misc]
        state = read_state_dict(path)
        model = create_model(teacher.arch, num_classes, info.in_channels, size)
        check_fits(model, state, teacher.arch, num_classes, path.name if source.startswith("file:") else f"run {source[4:]}'s teacher")
    except TeacherUnavailable as exc:
        return [(f"{where}.source", str(exc).removeprefix("teacher.source: "))]
    return []
