"""The New-experiment form: config dict <-> widget state, presets, checks the schema cannot do, widget helpers.

All form widgets use keys starting with ``nx_``; their values live in ``st.session_state``. Values are put there
*before* the widgets are drawn (presets, imports and clones go through callbacks or the top of the page), never
passed as ``value=``, so Streamlit never warns about a widget with both a default and a Session State value.

``config_to_state`` and ``state_to_config`` are pure functions over plain dicts so they can be tested without
Streamlit; ``state_to_config(config_to_state(c))`` gives back ``c`` (with defaults filled in).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st
import yaml

from kd_core.settings import data_home, path_error, resolve_path
from ui.state import PROJECT_ROOT, uploads_dir

P = "nx_"  # key prefix of every form widget
SOURCES = {
    "train": "Train it here first",
    "run": "Reuse the teacher of an earlier run",
    "upload": "Upload a checkpoint",
    "file": "A checkpoint file on this machine",
    "torchvision": "Torchvision ImageNet weights",
    "random": "Random weights (for testing only)",
}
SOURCE_HELP = (
    "Where the teacher's weights come from. 'Train' trains the teacher first (slowest, always works). "
    "Reusing an earlier run's trained teacher skips that step. A checkpoint is a .safetensors or .pt file with the "
    "model's weights (a state dict) for the same architecture and number of classes."
)
HELP = {
    "name": "A label for the run, shown in the runs table and charts.",
    "seed": "Random seed: the same seed and config give the same run (weights init, data order).",
    "device": "Where to train: auto uses the GPU when there is one, else the CPU.",
    "baseline": "Also train the same student with plain cross-entropy (no teacher), same seed, so you can see "
    "what distillation adds (the 'KD gain').",
    "analysis": "Store what the Analysis page shows: CKA between teacher and student layers at a few epochs, and at the end "
                "class prototypes, 2-D maps of the embeddings and attribution maps. Costs seconds to a minute on a CPU.",
    "projections": "2-D maps of the embeddings. PCA is instant; t-SNE and UMAP show clusters better but take tens of seconds.",
    "cache_teacher": "Compute the teacher's outputs once and reuse them when nothing (like augmentation) changes them. "
    "Faster; off only for debugging.",
    "ckpt": "Besides every epoch, also save a checkpoint this often (seconds), so a cancelled or crashed run can resume "
    "close to where it stopped.",
    "dataset": "The images to train on. Bundled datasets work offline; torchvision ones download into the root "
    "folder when the machine is online.",
    "root": "Folder where dataset files are kept (or, for 'imagefolder', your folder of class sub-folders). Must be "
    "inside the project's distillery-data/ folder or a folder in DISTILLERY_ALLOWED_ROOTS.",
    "val": "Fraction of the training images held out to pick the best epoch (validation). 0 = use the test set.",
    "augment": "Random crops (and flips where they make sense) of training images: less over-fitting, slower.",
    "subset": "Train on at most this many images (a random, class-balanced pick) for a quick try. Empty = all.",
    "image_size": "Resize images to this side length (imagefolder datasets). Empty = the dataset's size.",
    "arch": "The network architecture. The teacher is usually big and accurate, the student small and fast.",
    "epochs": "Passes over the training images.",
    "batch_size": "Images per optimisation step.",
    "optimizer": "SGD with momentum is the classic CNN choice; AdamW is more forgiving of the learning rate.",
    "lr": "Learning rate: the size of each update step. Must be > 0; typical: 0.05 (SGD), 0.001–0.003 (AdamW).",
    "momentum": "SGD momentum (0–1): how much of the previous step is kept. Ignored by AdamW.",
    "weight_decay": "Pulls weights towards zero each step (regularisation). Typical: 5e-4 (SGD), 1e-4 (AdamW).",
    "nesterov": "Nesterov momentum (SGD only).",
    "scheduler": "How the learning rate changes over training: cosine decays smoothly to 0; step multiplies it by "
    "gamma at the milestone epochs; none keeps it constant.",
    "milestones": "Epochs at which the step schedule multiplies the lr by gamma, e.g. 150, 180, 210.",
    "gamma": "Factor applied to the lr at each milestone (step schedule).",
    "weight": "How much this term counts in the total loss. The terms are summed with these weights.",
    "warmup": "Ramp this term's weight up linearly from 0 over this many epochs (0 = full weight from the start).",
    "loss": "The loss term. 'ce' learns from the true labels; the others learn from the teacher.",
    "extra": "Parameters the form has no field for (YAML mapping). Usually from an imported config; unknown names "
    "are refused with the allowed ones listed.",
}
PARAM_HELP = {
    "temperature": "Softens the probabilities before comparing them; higher shows more of the teacher's "
    "'dark knowledge' about similar classes. Typical 4.",
    "alpha": "Weight of the first part of the loss.",
    "beta": "Weight of the second part of the loss.",
    "gamma": "Weight or exponent of an extra part of the loss.",
    "label_smoothing": "Spread this much probability over the wrong classes (0 = plain labels).",
    "stage": "Which stage's feature map to match (empty = the middle one).",
}


# --------------------------------------------------------------------------- registries


def losses() -> dict[str, dict[str, Any]]:
    """name -> describe_loss(name) (or an inspect-based fallback when describe_loss is missing)."""
    from kd_core import losses as kl

    describe = getattr(kl, "describe_loss", None)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(kl.LOSSES):
        if describe is not None:
            out[name] = describe(name)
            continue
        cls = kl.LOSSES[name]
        sig = inspect.signature(cls.__init__)
        params = {p.name: (None if p.default is p.empty else p.default) for p in sig.parameters.values() if p.name != "self"}
        doc = (cls.__doc__ or "").strip().splitlines()
        out[name] = {"name": name, "summary": doc[0] if doc else "", "needs": sorted(cls.needs), "params": params, "paper": ""}
    return out


def loss_line(name: str) -> str:
    info = losses().get(name)
    if info is None:
        return "unknown loss"
    return info.get("summary") or ""


# --------------------------------------------------------------------------- presets

PRESET_FILES = {
    "MNIST-5k KD in one minute": "configs/mnist5k_kd.yaml",
    "Digits in seconds": "configs/digits_kd.yaml",
    "CIFAR-100 resnet32x4→resnet8x4 KD": "configs/cifar100_resnet32x4_resnet8x4_kd.yaml",
}


def presets() -> dict[str, dict[str, Any]]:
    """Label -> config dict: the named files, then every other config in configs/ (DKD ones first).

    When configs/ has no DKD config, a built-in DKD variant of the MNIST-5k preset is offered instead.
    """
    out: dict[str, dict[str, Any]] = {}
    for label, rel in PRESET_FILES.items():
        path = PROJECT_ROOT / rel
        if path.is_file():
            out[label] = yaml.safe_load(path.read_text()) or {}
    named = {PROJECT_ROOT / rel for rel in PRESET_FILES.values()}
    found: list[tuple[bool, str, dict[str, Any]]] = []
    for path in sorted((PROJECT_ROOT / "configs").glob("*.y*ml")) + sorted((PROJECT_ROOT / "configs").glob("*/*.y*ml")):
        if path in named:
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict) or "recipe" not in data:
            continue
        uses_dkd = any(isinstance(t, dict) and t.get("loss") == "dkd" for t in data.get("recipe") or [])
        label = f"{data.get('name') or path.stem} ({path.relative_to(PROJECT_ROOT / 'configs').as_posix()})"
        found.append((not uses_dkd, label, data))  # DKD variants first
    for _, label, data in sorted(found, key=lambda item: item[0]):
        out[label] = data
    if not any("dkd" in label.lower() for label in out) and "MNIST-5k KD in one minute" in out:
        dkd = dict(out["MNIST-5k KD in one minute"])
        dkd["name"] = "mnist5k cnn_small -> cnn_tiny DKD"
        dkd["recipe"] = [
            {"loss": "ce", "weight": 1.0},
            {"loss": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, "warmup_epochs": 1},
        ]
        out["MNIST-5k DKD (decoupled KD) in one minute"] = dkd
    return out


DEFAULT_PRESET = "MNIST-5k KD in one minute"


def default_config() -> dict[str, Any]:
    all_presets = presets()
    if DEFAULT_PRESET in all_presets:
        return all_presets[DEFAULT_PRESET]
    return {"teacher": {"arch": "cnn_small"}, "student": {"arch": "cnn_tiny"}, "recipe": [{"loss": "ce"}, {"loss": "kd"}]}


# --------------------------------------------------------------------------- config <-> state

_ids = itertools.count(1)


def _defaults() -> dict[str, Any]:
    from kd_core.config import AnalysisConfig, DatasetConfig, ExperimentConfig, OptimizerConfig, SchedulerConfig

    top = {k: f.default for k, f in ExperimentConfig.model_fields.items() if k in ("name", "seed", "device", "baseline", "cache_teacher", "checkpoint_every_s")}
    return {
        **top,
        "analysis": AnalysisConfig().model_dump(),
        "dataset": DatasetConfig().model_dump(),
        "optimizer": OptimizerConfig().model_dump(),
        "scheduler": SchedulerConfig().model_dump(),
    }


def _model_state(prefix: str, section: Mapping[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    opt = {**defaults["optimizer"], **(section.get("optimizer") or {})}
    sched_raw = section.get("scheduler") or {}
    sched = {**defaults["scheduler"], **({"name": sched_raw} if isinstance(sched_raw, str) else sched_raw)}
    return {
        f"{prefix}arch": section.get("arch", "cnn_small"),
        f"{prefix}epochs": int(section.get("epochs", 10)),
        f"{prefix}bs": int(section.get("batch_size", 64)),
        f"{prefix}opt": opt["name"],
        f"{prefix}lr": float(opt["lr"]),
        f"{prefix}mom": float(opt["momentum"]),
        f"{prefix}wd": float(opt["weight_decay"]),
        f"{prefix}nesterov": bool(opt["nesterov"]),
        f"{prefix}sched": sched["name"],
        f"{prefix}milestones": ", ".join(str(m) for m in sched.get("milestones") or []),
        f"{prefix}gamma": float(sched["gamma"]),
    }


def _param_value(default: Any, value: Any) -> tuple[bool, Any]:
    """(fits the widget, widget value) for an imported param value."""
    if isinstance(default, bool):
        return (isinstance(value, bool), value)
    if isinstance(default, int):
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (ok, float(value) if ok else value)
    if default is None:
        return (True, "" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip())
    return (isinstance(value, str), value)


def config_to_state(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Widget values for ``config`` (defaults filled in) and a list of fields the form had to ignore."""
    config = dict(config or {})
    d = _defaults()
    known_top = {"name", "seed", "device", "dataset", "teacher", "student", "recipe", "baseline", "cache_teacher", "checkpoint_every_s", "analysis"}
    analysis = {**d["analysis"], **(config.get("analysis") or {})}
    ignored = [k for k in config if k not in known_top]
    ds = {**d["dataset"], **(config.get("dataset") or {})}
    teacher = dict(config.get("teacher") or {})
    student = dict(config.get("student") or {})
    state: dict[str, Any] = {
        f"{P}name": str(config.get("name", d["name"])),
        f"{P}seed": int(config.get("seed", d["seed"])),
        f"{P}device": config.get("device", d["device"]),
        f"{P}baseline": bool(config.get("baseline", d["baseline"])),
        f"{P}cache_teacher": bool(config.get("cache_teacher", d["cache_teacher"])),
        f"{P}ckpt_s": float(config.get("checkpoint_every_s", d["checkpoint_every_s"])),
        f"{P}an_enabled": bool(analysis["enabled"]),
        f"{P}an_cka": int(analysis["cka_checkpoints"]),
        f"{P}an_samples": int(analysis["samples"]),
        f"{P}an_attr": int(analysis["attribution_images"]),
        f"{P}an_proj": list(analysis["projections"]),
        f"{P}ds_name": ds["name"],
        f"{P}ds_root": str(ds["root"]),
        f"{P}ds_val": float(ds["val_fraction"]),
        f"{P}ds_augment": bool(ds["augment"]),
        f"{P}ds_subset": None if ds.get("subset") is None else int(ds["subset"]),
        f"{P}ds_image_size": None if ds.get("image_size") is None else int(ds["image_size"]),
        **_model_state(f"{P}t_", teacher, d),
        **_model_state(f"{P}s_", student, d),
    }
    ignored += [f"dataset.{k}" for k in ds if k not in d["dataset"]]
    for role, section in (("teacher", teacher), ("student", student)):
        allowed = {"arch", "epochs", "batch_size", "optimizer", "scheduler"} | ({"source"} if role == "teacher" else set())
        ignored += [f"{role}.{k}" for k in section if k not in allowed]
    source = str(teacher.get("source", "train"))
    state[f"{P}t_src_run"] = None
    state[f"{P}t_src_file"] = ""
    if source.startswith("run:") and source[4:].isdigit():
        state[f"{P}t_src"] = "run"
        state[f"{P}t_src_run"] = int(source[4:])
    elif source.startswith("file:"):
        state[f"{P}t_src"] = "file"
        state[f"{P}t_src_file"] = source[5:]
    elif source in SOURCES:
        state[f"{P}t_src"] = source
    else:  # keep it visible (validation will say what is wrong)
        state[f"{P}t_src"] = "file"
        state[f"{P}t_src_file"] = source
    catalogue = losses()
    ids = []
    for term in config.get("recipe") or []:
        term = dict(term) if isinstance(term, Mapping) else {"loss": str(term)}
        uid = next(_ids)
        ids.append(uid)
        name = str(term.get("loss", "ce"))
        params = dict(term.get("params") or {})
        state[f"{P}r{uid}_loss"] = name
        state[f"{P}r{uid}_weight"] = float(term.get("weight", 1.0))
        state[f"{P}r{uid}_warmup"] = int(term.get("warmup_epochs", 0))
        extra = {}
        defaults = (catalogue.get(name) or {}).get("params", {})
        for pname, default in defaults.items():
            if pname in params:
                ok, value = _param_value(default, params.pop(pname))
                if ok:
                    state[f"{P}r{uid}_p_{pname}"] = value
                else:
                    extra[pname] = value
            else:
                state[f"{P}r{uid}_p_{pname}"] = _param_value(default, default)[1]
        extra.update(params)  # names the loss does not know: validation names them
        state[f"{P}r{uid}_extra"] = yaml.safe_dump(extra, default_flow_style=True).strip() if extra else ""
        ignored += [f"recipe.{k}" for k in term if k not in ("loss", "weight", "params", "warmup_epochs")]
    state[f"{P}recipe_ids"] = ids
    return state, ignored


def _milestones(text: str) -> list[int] | str:
    text = (text or "").strip().strip("[]")
    if not text:
        return []
    try:
        return [int(x) for x in text.replace(";", ",").replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        return text


def _model_section(s: Mapping[str, Any], prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    g = lambda k, default: s.get(prefix + k, default)  # noqa: E731
    return {
        "arch": g("arch", "cnn_small"),
        "epochs": g("epochs", 10),
        "batch_size": g("bs", 64),
        "optimizer": {
            "name": g("opt", d["optimizer"]["name"]),
            "lr": g("lr", d["optimizer"]["lr"]),
            "momentum": g("mom", d["optimizer"]["momentum"]),
            "weight_decay": g("wd", d["optimizer"]["weight_decay"]),
            "nesterov": g("nesterov", d["optimizer"]["nesterov"]),
        },
        "scheduler": {
            "name": g("sched", d["scheduler"]["name"]),
            "milestones": _milestones(g("milestones", "")),
            "gamma": g("gamma", d["scheduler"]["gamma"]),
        },
    }


def teacher_source(s: Mapping[str, Any]) -> str:
    kind = s.get(f"{P}t_src", "train")
    if kind == "run":
        rid = s.get(f"{P}t_src_run")
        return f"run:{rid}" if rid is not None else "run:"
    if kind == "upload":
        path = s.get(f"{P}t_upload_path")
        return f"file:{path}" if path else "file:"
    if kind == "file":
        return f"file:{s.get(f'{P}t_src_file', '')}"
    return kind


def _parse_param(default: Any, value: Any) -> Any:
    if default is None and isinstance(value, str):
        if not value.strip():
            return None
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def state_to_config(s: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The config dict the widgets describe, plus form-level problems (unparsable text fields)."""
    d = _defaults()
    problems: list[tuple[str, str]] = []
    g = lambda k, default=None: s.get(P + k, default)  # noqa: E731
    ds = {
        "name": g("ds_name", d["dataset"]["name"]),
        "root": g("ds_root", d["dataset"]["root"]),
        "val_fraction": g("ds_val", d["dataset"]["val_fraction"]),
        "augment": g("ds_augment", d["dataset"]["augment"]),
        "subset": g("ds_subset"),
        "image_size": g("ds_image_size"),
    }
    teacher = {**_model_section(s, f"{P}t_", d), "source": teacher_source(s)}
    # keep key order as in the schema: arch, source, ...
    teacher = {"arch": teacher.pop("arch"), "source": teacher.pop("source"), **teacher}
    student = _model_section(s, f"{P}s_", d)
    for role, section in (("teacher", teacher), ("student", student)):
        if isinstance(section["scheduler"]["milestones"], str):
            problems.append((f"{role}.scheduler.milestones", "write whole epoch numbers separated by commas, e.g. 150, 180, 210"))
            section["scheduler"]["milestones"] = []
    catalogue = losses()
    recipe = []
    for i, uid in enumerate(g("recipe_ids", []) or []):
        name = s.get(f"{P}r{uid}_loss", "ce")
        params: dict[str, Any] = {}
        for pname, default in (catalogue.get(name) or {}).get("params", {}).items():
            key = f"{P}r{uid}_p_{pname}"
            value = _parse_param(default, s[key]) if key in s else default
            # defaults stay implicit (cleaner YAML), except the temperature, which readers look for
            if value is not None and (value != default or type(value) is not type(default) or pname == "temperature"):
                params[pname] = value
        extra_text = (s.get(f"{P}r{uid}_extra") or "").strip()
        if extra_text:
            try:
                extra = yaml.safe_load(extra_text)
            except yaml.YAMLError:
                extra = None
            if isinstance(extra, dict):
                params.update({str(k): v for k, v in extra.items()})
            else:
                problems.append((f"recipe[{i}].params", "extra parameters must be a YAML mapping, e.g. {temperature: 4}"))
        term: dict[str, Any] = {"loss": name, "weight": s.get(f"{P}r{uid}_weight", 1.0)}
        if params:
            term["params"] = params
        warm = s.get(f"{P}r{uid}_warmup", 0)
        if warm:
            term["warmup_epochs"] = warm
        recipe.append(term)
    config = {
        "name": g("name", d["name"]),
        "seed": g("seed", d["seed"]),
        "device": g("device", d["device"]),
        "dataset": ds,
        "teacher": teacher,
        "student": student,
        "recipe": recipe,
        "baseline": g("baseline", d["baseline"]),
        "cache_teacher": g("cache_teacher", d["cache_teacher"]),
        "checkpoint_every_s": g("ckpt_s", d["checkpoint_every_s"]),
        "analysis": {
            "enabled": g("an_enabled", d["analysis"]["enabled"]),
            "cka_checkpoints": g("an_cka", d["analysis"]["cka_checkpoints"]),
            "samples": g("an_samples", d["analysis"]["samples"]),
            "attribution_images": g("an_attr", d["analysis"]["attribution_images"]),
            "projections": g("an_proj", d["analysis"]["projections"]),
        },
    }
    return config, problems


def apply_config(config: Mapping[str, Any]) -> list[str]:
    """Put ``config`` into the form's Session State (call before the widgets are drawn); returns ignored fields."""
    state, ignored = config_to_state(config)
    for key in [k for k in st.session_state if isinstance(k, str) and k.startswith(f"{P}r")]:
        del st.session_state[key]
    for key, value in state.items():
        st.session_state[key] = value
    st.session_state.pop(f"{P}t_upload_path", None)
    return ignored


def new_term_state(loss: str = "kd") -> int:
    """Add a recipe term with ``loss``'s default parameters; returns its id."""
    uid = next(_ids)
    info = losses().get(loss) or {"params": {}}
    st.session_state[f"{P}r{uid}_loss"] = loss
    st.session_state[f"{P}r{uid}_weight"] = 1.0
    st.session_state[f"{P}r{uid}_warmup"] = 0
    st.session_state[f"{P}r{uid}_extra"] = ""
    for pname, default in info["params"].items():
        st.session_state[f"{P}r{uid}_p_{pname}"] = _param_value(default, default)[1]
    st.session_state[f"{P}recipe_ids"] = [*st.session_state.get(f"{P}recipe_ids", []), uid]
    return uid


# --------------------------------------------------------------------------- checks beyond the schema


def path_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Typed paths (dataset.root, file: teacher sources) must lie under the allowed folders."""
    problems = []
    root = str((config.get("dataset") or {}).get("root") or "")
    err = path_error("dataset.root", root)
    if err:
        problems.append(("dataset.root", err))
    source = str((config.get("teacher") or {}).get("source") or "")
    if source.startswith("file:"):
        if not source[5:].strip():
            problems.append(("teacher.source", "teacher.source: choose a checkpoint file"))
        else:
            err = path_error("teacher.source", source[5:])
            if err:
                problems.append(("teacher.source", err))
    return problems


def dataset_shape(name: str, image_size: int | None) -> tuple[int, int, int]:
    """(num_classes, in_channels, image_size) for building models of this dataset."""
    from kd_core.data import DATASETS

    info = DATASETS.get(name)
    if info is None:
        return 10, 3, 32
    return (info.num_classes or 10), info.in_channels, int(image_size or info.image_size)


@st.cache_data(show_spinner=False, max_entries=256)
def param_count(arch: str, num_classes: int, in_channels: int, image_size: int) -> int | None:
    from kd_core.models import MODELS, count_parameters, create_model

    if arch not in MODELS:
        return None
    try:
        return count_parameters(create_model(arch, num_classes, in_channels, image_size))
    except Exception:  # noqa: BLE001 - e.g. an input too small for the net: the config check reports it at launch
        return None


@st.cache_data(show_spinner=False, max_entries=32)
def checkpoint_problem(path: str, mtime: float, arch: str, num_classes: int, in_channels: int, image_size: int) -> str | None:
    """None when the checkpoint at ``path`` loads and fits ``arch`` for this dataset, else why not."""
    from kd_core.models import MODELS, create_model
    from kd_core.teachers import TeacherUnavailable, check_fits, read_state_dict

    if arch not in MODELS:
        return None  # the schema check reports the architecture
    try:
        state = read_state_dict(path)
        model = create_model(arch, num_classes, in_channels, image_size)
        check_fits(model, state, arch, num_classes, Path(path).name)
    except TeacherUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else: refuse with the reason
        return f"teacher.source: {Path(path).name} cannot be used ({exc.__class__.__name__}: {exc})"
    return None


def teacher_problems(config: Mapping[str, Any], store) -> list[tuple[str, str]]:
    """Checkpoint files must load and fit; an earlier run's teacher must exist and match arch and dataset."""
    teacher = config.get("teacher") or {}
    ds = config.get("dataset") or {}
    source = str(teacher.get("source") or "")
    arch = str(teacher.get("arch"))
    shape = dataset_shape(str(ds.get("name")), ds.get("image_size"))
    if source.startswith("file:") and source[5:].strip() and not path_error("teacher.source", source[5:]):
        path = resolve_path(source[5:])
        if path.is_file():
            err = checkpoint_problem(str(path), path.stat().st_mtime, arch, *shape)
            if err:
                return [("teacher.source", err)]
    if source.startswith("run:"):
        if not source[4:].isdigit():
            return [("teacher.source", "teacher.source: choose the run whose teacher to reuse")]
        rid = int(source[4:])
        try:
            run = store.get_run(rid)
        except KeyError:
            return [("teacher.source", f"teacher.source: run {rid} does not exist (any more)")]
        rt = (run.config or {}).get("teacher") or {}
        rd = (run.config or {}).get("dataset") or {}
        out = []
        if run.status != "completed":
            out.append(("teacher.source", f"teacher.source: run {rid} is {run.status}, not completed"))
        if rt.get("source", "train") != "train":
            out.append(("teacher.source", f"teacher.source: run {rid} did not train its teacher (its source was {rt.get('source')!r})"))
        if rt.get("arch") and rt.get("arch") != arch:
            out.append(("teacher.arch", f"teacher.arch: run {rid}'s teacher is a {rt.get('arch')}; set the teacher architecture to {rt.get('arch')}"))
        if rd.get("name") and rd.get("name") != ds.get("name"):
            out.append(("teacher.source", f"teacher.source: run {rid}'s teacher was trained on {rd.get('name')}, not {ds.get('name')}"))
        return out
    return []


def trained_teacher_runs(store) -> list[Any]:
    """Completed runs whose teacher was trained (candidates for ``run:<id>``), newest first."""
    return [
        r for r in store.list_runs(status=["completed"], include_hidden=True)
        if ((r.config or {}).get("teacher") or {}).get("source", "train") == "train"
    ]


def save_upload(name: str, data: bytes) -> Path:
    """Store an uploaded checkpoint as ``distillery-data/uploads/<sha256>.<ext>`` (same file -> same path).

    Raises ``ValueError`` for another extension and ``TeacherUnavailable`` for a file that is not a state dict.
    """
    ext = Path(name).suffix.lower()
    if ext not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{name}: only .safetensors, .pt or .pth checkpoints can be used")
    digest = hashlib.sha256(data).hexdigest()
    folder = uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}{ext}"
    if not path.exists():
        from kd_core.teachers import read_state_dict

        tmp = folder / f".{digest}.part{ext}"  # keeps the extension: read_state_dict picks the format by it
        tmp.write_bytes(data)
        try:
            read_state_dict(tmp)  # refuse (and drop) a file that is not a state dict of tensors
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise type(exc)(str(exc).replace(tmp.name, Path(name).name)) from None
        tmp.replace(path)
    return path


def display_path(path: Path | str) -> str:
    """A path relative to the project folder when it is inside it."""
    p = Path(path)
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def data_home_text() -> str:
    return display_path(data_home())


# --------------------------------------------------------------------------- widget helpers


_PATH_PREFIX = re.compile(r"^[A-Za-z_]+(\[\d+\])?(\.[A-Za-z_]+(\[\d+\])?)*: ")


def show_errors(errors: Mapping[str, list[str]], *paths: str, prefix: bool = False) -> None:
    """Draw the validation messages of ``paths`` (and, with ``prefix``, of their sub-fields) right here."""
    shown = st.session_state.setdefault("_nx_shown_errors", set())
    for path, messages in errors.items():
        hit = path in paths or (prefix and any(path.startswith(p + ".") or path.startswith(p + "[") for p in paths))
        if hit:
            for msg in messages:
                text = msg if _PATH_PREFIX.match(msg) else f"{path}: {msg}"
                st.error(text, icon="⚠️")
            shown.add(path)


def options_with(options: list[str], current: Any) -> list[Any]:
    """Selectbox options that include ``current`` even when it is not valid (so validation can name it)."""
    return options if current in options or current is None else [*options, current]
