"""The New-experiment form's vocabulary and widget helpers: help texts, the loss and model registries,
model sizes, uploaded checkpoints, and how errors are drawn next to their fields.

The fields are in ``ui.form_fields``, the state <-> config conversion in ``ui.form_state`` (recipe and method:
``ui.form_recipe``), the checks in ``ui.form_checks``, the presets in
``ui.presets``.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import streamlit as st

from kd_core.settings import data_home
from ui import param_counts
from ui.form_fields import P, term_ids
from ui.form_recipe import param_widget_value
from ui.form_state import config_to_state, remember_loaded_name
from ui.state import PROJECT_ROOT, uploads_dir

SOURCE_HELP = (
    "Where the teacher's weights come from. 'Train' trains the teacher first (slowest, always works). "
    "Reusing an earlier run's trained teacher skips that step. A checkpoint is a .safetensors or .pt file with the "
    "model's weights (a state dict) for the same architecture and number of classes."
)
HELP = {
    "name": "A label for the run, shown in the runs table and charts.",
    "seed": "Random seed: the same seed and config give the same run (weights init, data order).",
    "device": "Where to train: auto uses the GPU when there is one, else the CPU.",
    "precision": "auto = bf16 forward passes on GPUs that support it, fp32 on CPU; loss terms always run in fp32.",
    "baseline": "Also train the same student with plain cross-entropy (no teacher), same seed, so you can see "
    "what distillation adds (the 'KD gain').",
    "analysis": "Store what the Analysis page shows: CKA between teacher and student layers at a few epochs, and at the end "
                "class prototypes, 2-D maps of the embeddings and attribution maps. Costs seconds to a minute on a CPU.",
    "projections": "2-D maps of the embeddings. PCA is instant; t-SNE and UMAP show clusters better but take tens of seconds.",
    "cache_teacher": "Compute the teacher's outputs once and reuse them when nothing (like augmentation) changes them. "
    "Faster; off only for debugging.",
    "channels_last": "Memory layout of the models' feature maps. Channels-last is faster for convolutions on recent GPUs "
    "(tensor cores), usually slower on a CPU. auto = on for CUDA, off on CPU.",
    "compile": "torch.compile the model being trained: faster steps on a GPU once compiled, but the first steps (and each "
    "new batch shape, e.g. evaluation) pay the compilation, tens of seconds. Off by default.",
    "soft_labels": "With augmentation on, write the teacher's logits of each finished epoch to a shared store "
    "(DISTILLERY_HOME/soft_labels); later runs with the same teacher, data, seed and batch size read them instead of "
    "running the teacher.",
    "top_k": "More than 100 classes only: store each image's k largest teacher probabilities instead of all logits "
    "(smaller, lossy: the remaining probability is spread evenly). Empty = full logits.",
    "ckpt": "Besides every epoch, also save a checkpoint this often (seconds), so a cancelled or crashed run can resume "
    "close to where it stopped.",
    "dataset": "The images to train on. Bundled datasets work offline; torchvision ones download into the root "
    "folder when the machine is online.",
    "root": "Folder where dataset files are kept (or, for 'imagefolder', your folder of class sub-folders). Must be "
    "inside the data folder (DISTILLERY_HOME, default distillery-data/) or a folder in DISTILLERY_ALLOWED_ROOTS.",
    "val": "Fraction of the training images held out to pick the best epoch (validation). 0 = use the test set.",
    "augment": "Random crops (and flips where they make sense) of training images: less over-fitting, slower.",
    "subset": "Train on at most this many images (a random, class-balanced pick) for a quick try. Empty = all.",
    "image_size": "Resize images to this side length (imagefolder datasets). Empty = the dataset's size.",
    "loader": "resident: the images are kept as bytes on the training device (GPU or RAM) and cropped there, the fastest "
    "way for datasets that fit. streaming: image files are decoded by worker processes, batch by batch, so memory stays flat "
    "whatever the folder's size (imagefolder only; random resized crops when augmenting). auto: resident when the images fit "
    "a quarter of the free memory; the run page says which was picked and why.",
    "workers": "Processes decoding images for the streaming loader. Empty = one per core (at most 8).",
    "arch": "The network architecture. The teacher is usually big and accurate, the student small and fast.",
    "epochs": "Passes over the training images.",
    "batch_size": "Images per optimisation step.",
    "devices": "Processes training this model together (DDP): GPUs on CUDA, CPU processes otherwise. Batch size stays "
    "the global batch; a teacher trained here uses the student's number.",
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
    """name -> ``describe_loss(name)``: summary, paper, needs and parameters with their defaults."""
    from kd_core.losses import LOSSES, describe_loss

    return {name: describe_loss(name) for name in sorted(LOSSES)}


def loss_line(name: str) -> str:
    info = losses().get(name)
    if info is None:
        return "unknown loss"
    return info.get("summary") or ""


# --------------------------------------------------------------------------- loading into the form


def apply_config(config: Any) -> list[tuple[str, str]]:
    """Put ``config`` into the form (call before the widgets are drawn), or nothing and the fields it cannot hold."""
    state, problems = config_to_state(config)
    if problems:
        return problems
    for key in [k for k in st.session_state if isinstance(k, str) and k.startswith(f"{P}r")]:
        del st.session_state[key]
    for key, value in state.items():
        st.session_state[key] = value
    st.session_state.pop(f"{P}t_upload_path", None)
    remember_loaded_name(st.session_state)
    return []


def new_term_state(loss: str = "kd") -> int:
    """Add a recipe term with ``loss``'s default parameters; returns its id."""
    from ui.form_fields import loss_params

    uid = next(term_ids)
    ss = st.session_state
    ss[f"{P}r{uid}_loss"], ss[f"{P}r{uid}_weight"], ss[f"{P}r{uid}_warmup_epochs"], ss[f"{P}r{uid}_extra"] = loss, 1.0, 0, ""
    for pname, default in loss_params(loss).items():
        ss[f"{P}r{uid}_p_{pname}"] = param_widget_value(default, default)[1]
    ss[f"{P}recipe_ids"] = [*ss.get(f"{P}recipe_ids", []), uid]
    return uid


# --------------------------------------------------------------------------- model sizes


def dataset_shape(name: str, image_size: int | None) -> tuple[int, int, int]:
    """(num_classes, in_channels, image_size) for building models of this dataset."""
    from kd_core.data import DATASETS

    info = DATASETS.get(name)
    if info is None:
        return 10, 3, 32
    return (info.num_classes or 10), info.in_channels, int(image_size or info.image_size)


def param_count(arch: str, num_classes: int, in_channels: int, image_size: int) -> int | None:
    """``arch``'s parameter count for this input shape; None for an unknown arch or one that cannot take the images.

    From the shipped table for the built-in datasets' shapes, else built once per process (ui.param_counts)."""
    return param_counts.param_count(arch, num_classes, in_channels, image_size)


@functools.lru_cache(maxsize=16)
def arch_param_counts(num_classes: int, in_channels: int, image_size: int) -> dict[str, int | None]:
    """Every architecture's parameter count for this input shape (None where it cannot be built for it).

    The built-in datasets' shapes come from a table (building the zoo, even on the meta device, took ~3.5 s on a
    server's first view of the form); other shapes are built on the meta device, once per process."""
    from kd_core.models import MODELS

    return {arch: param_count(arch, num_classes, in_channels, image_size) for arch in MODELS}


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


def show_problems(check: Any, *paths: str, prefix: bool = False) -> None:
    """Draw the errors and warnings of ``paths`` (with ``prefix``, of their sub-fields too) right here."""
    for found, draw, icon in ((check.errors, st.error, ":material/error:"), (check.notes, st.warning, ":material/warning:")):
        for path, messages in found.items():
            if path in paths or (prefix and any(path.startswith((p + ".", p + "[")) for p in paths)):
                for message in messages:
                    draw(f"{path}: {message}", icon=icon)


def options_with(options: list[str], current: Any) -> list[Any]:
    """Selectbox options that include ``current`` even when it is not valid (so validation can name it)."""
    return options if current in options or current is None else [*options, current]
