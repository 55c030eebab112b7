"""``teacher.source: timm``: timm's pretrained weights read from local files only and adapted by timm.

No network: the "pretrained" files are the original (224-pixel, 1000-class, 3-channel) timm models with a
fixed random init, saved as safetensors where a user would place the downloaded weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_core.config import ConfigError, validate_config
from kd_core.engine import run_experiment
from kd_core.models import create_model, feature_spec
from kd_core.sink import MemorySink
from kd_core.teachers import TeacherUnavailable, load_teacher_weights
from kd_core.timm_pretrained import weights_path

DIGITS = (1, 8)  # channels, pixels of the digits dataset


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data folder and an empty Hugging Face cache: nothing on this machine but what a test places."""
    import huggingface_hub.constants

    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "home"


def save_original(timm_name: str, path: Path) -> dict[str, torch.Tensor]:
    """The model timm would download, ImageNet-shaped, with a fixed random init, saved as safetensors at ``path``."""
    import timm

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(timm_name, num_classes=1000).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return load_file(str(path))


def config(arch: str, **teacher: object) -> dict:
    return {
        "name": "timm teacher", "seed": 1, "device": "cpu",
        "dataset": {"name": "digits", "val_fraction": 0.1, "subset": 200},
        "teacher": {"arch": arch, "source": "timm", "epochs": 0, "batch_size": 32, **teacher},
        "student": {"arch": "cnn_tiny", "epochs": 1, "batch_size": 32},
        "recipe": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9}],
        "checkpoint_every_s": 1000, "analysis": {"enabled": False}, "baseline": False,
    }


def loaded_teacher(arch: str) -> torch.nn.Module:
    model = create_model(arch, 10, *DIGITS)
    load_teacher_weights(model, "timm", arch, 10, run_teachers=None, input_shape=DIGITS)
    return model


def test_vit_weights_load_adapted_by_timm_with_the_feature_taps_kept() -> None:
    arch = "timm:vit_tiny_patch16_224"
    original = save_original("vit_tiny_patch16_224", weights_path(arch))
    validate_config(config(arch))
    model = loaded_teacher(arch)
    state = model.state_dict()
    # transformer blocks are not resampled: they are the file's own tensors
    for key in ("blocks.5.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "cls_token", "norm.weight"):
        assert torch.equal(state[key], original[key]), key
    # a 1-pixel patch over 8×8 one-channel images: timm resampled the patch and position embeddings
    assert original["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert state["patch_embed.proj.weight"].shape == (192, 1, 1, 1)
    assert original["pos_embed"].shape == (1, 197, 192) and state["pos_embed"].shape == (1, 65, 192)
    assert state["head.weight"].shape == (10, 192)  # the ImageNet head dropped for the dataset's classes
    spec = feature_spec(model)
    assert spec.classifier == "head" and len(spec.stages) == 4 and spec.tokens == (1, 8, 8)
    assert model(torch.randn(2, *DIGITS[:1], DIGITS[1], DIGITS[1])).shape == (2, 10)


def test_a_run_distils_from_the_timm_teacher(tmp_path: Path) -> None:
    # the engine's path is the same for every timm arch; ResNet-18 keeps it fast (a ViT's evaluations take ~25 s here)
    arch = "timm:resnet18"
    save_original("resnet18", weights_path(arch))
    summary = run_experiment(validate_config(config(arch)), MemorySink(), tmp_path / "run")
    assert "teacher_acc" in summary and "student_acc" in summary


def test_resnet_stem_is_summed_to_one_channel_and_the_blocks_kept() -> None:
    arch = "timm:resnet18"
    original = save_original("resnet18", weights_path(arch))
    state = loaded_teacher(arch).state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], original["layer3.1.conv2.weight"])
    assert torch.allclose(state["conv1.weight"], original["conv1.weight"].sum(dim=1, keepdim=True))
    assert state["fc.weight"].shape == (10, 512)


def test_the_hugging_face_cache_is_read_when_the_data_folder_has_no_file(home: Path) -> None:
    repo = home.parent / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    original = save_original("resnet18", repo / "snapshots" / "abc123" / "model.safetensors")
    state = loaded_teacher("timm:resnet18").state_dict()
    assert torch.equal(state["layer4.0.conv1.weight"], original["layer4.0.conv1.weight"])


def test_a_missing_file_names_the_file_the_folder_and_the_download(home: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_config(config("timm:deit_tiny_patch16_224"))
    message = dict(refused.value.errors)["teacher.source"]
    assert f"place deit_tiny_patch16_224.safetensors in {home / 'timm'}" in message
    assert "https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k" in message
    with pytest.raises(TeacherUnavailable, match="place deit_tiny_patch16_224.safetensors in"):  # and when the run starts
        loaded_teacher("timm:deit_tiny_patch16_224")


def test_a_pickled_file_is_never_loaded(home: Path) -> None:
    import timm

    pickled = weights_path("timm:vit_tiny_patch16_224").with_suffix(".pt")
    pickled.parent.mkdir(parents=True)
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), pickled)
    with pytest.raises(TeacherUnavailable, match=r"vit_tiny_patch16_224.pt there is not read: pickle files are never loaded"):
        loaded_teacher("timm:vit_tiny_patch16_224")


def test_a_file_of_other_weights_is_refused_not_loaded_in_part() -> None:
    path = weights_path("timm:resnet18")
    original = save_original("resnet18", path)
    save_file({k: v for k, v in original.items() if not k.startswith("layer4.")}, str(path))
    with pytest.raises(ConfigError, match=r"resnet18.safetensors does not hold timm's timm:resnet18 weights \(missing: layer4"):
        validate_config(config("timm:resnet18"))
    with pytest.raises(TeacherUnavailable, match=r"resnet18.safetensors does not hold timm's timm:resnet18 weights \(missing: layer4"):
        loaded_teacher("timm:resnet18")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(TeacherUnavailable, match="is not a valid safetensors file"):
        loaded_teacher("timm:resnet18")


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        ("cnn_small", "timm weights exist only for timm: architectures"),
        ("timm:mixer_s16_224", "timm has no pretrained weights for timm:mixer_s16_224"),
        ("timm:convnext_atto", "set dataset.image_size to 64 or more"),
    ],
)
def test_what_timm_cannot_serve_is_refused_at_validation(arch: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_config(config(arch))
    assert fragment in dict(refused.value.errors)["teacher.source"]


def test_convnext_loads_from_64_pixels() -> None:
    arch = "timm:convnext_atto"
    original = save_original("convnext_atto", weights_path(arch))
    model = create_model(arch, 10, 3, 64)
    load_teacher_weights(model, "timm", arch, 10, run_teachers=None, input_shape=(3, 64))
    assert torch.equal(model.state_dict()["stages.2.blocks.0.conv_dw.weight"], original["stages.2.blocks.0.conv_dw.weight"])
