"""What a run stores for the Analysis page: CKA at checkpoints during training, and one bundle at the end.

Pages only read these files, so they load instantly and runs can be compared. Formats: each CKA
checkpoint is a JSON file (``cka_<phase>_e<epoch>.json``); the end-of-run bundle is ``analysis.json``
(scalars, per-model summaries) plus ``analysis.safetensors`` (embeddings, logits, 2-D projections,
attribution maps, thumbnails). Everything records what produced it: split, n, estimator, method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kd_core.analysis.agreement import agreement_buckets, calibration
from kd_core.analysis.attribution import attribute, compare_maps, random_topk_iou
from kd_core.analysis.cka import cka_matrix, self_similarity
from kd_core.analysis.prototypes import align_student_to_teacher, class_means, project_2d, prototype_report
from kd_core.features import INPUT_SUFFIX, FeatureTap
from kd_core.models import feature_spec

CKA_POOLING = "mean"  # spatial mean of conv maps: cheap, and comparable across different map sizes
ATTRIBUTION_TOP_K = 0.1
BUCKET_ORDER = ("teacher_right_student_wrong", "teacher_wrong_student_right", "both_wrong", "both_right")


@dataclass(frozen=True)
class AnalysisSettings:
    cka_checkpoints: int = 4
    samples: int = 500
    attribution_images: int = 12
    projections: tuple[str, ...] = ("pca",)
    attribution_methods: tuple[str, ...] = ("saliency", "integrated_gradients", "smoothgrad", "gradcam", "occlusion")
    seed: int = 0


def cka_epochs(epochs: int, checkpoints: int) -> set[int]:
    """1-based epochs at which CKA is computed: evenly spaced, the last one always included."""
    if checkpoints <= 0 or epochs <= 0:
        return set()
    return {int(round(e)) for e in np.linspace(1, epochs, min(checkpoints, epochs))}


def _display(name: str) -> str:
    return "embedding" if name.endswith(INPUT_SUFFIX) else name


def _batch_size(n: int) -> int:
    return max(4, min(100, n // 2))  # several equal batches: the minibatch estimator averages over them


def cka_checkpoint(teacher: nn.Module, model: nn.Module, x: torch.Tensor, *, phase: str, epoch: int, step: int, split: str, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Teacher-vs-model and model-vs-model CKA on ``x``; written to ``cka_<phase>_e<epoch>.json``."""
    batch = _batch_size(len(x))
    device = x.device
    cross = cka_matrix(teacher, model, x, batch_size=batch, pooling=CKA_POOLING, device=device)
    own = self_similarity(model, x, batch_size=batch, pooling=CKA_POOLING, device=device)
    meta = {
        "phase": phase, "epoch": epoch, "step": step, "split": split,
        "rows": [_display(n) for n in cross.x_layers], "cols": [_display(n) for n in cross.y_layers],
        "n": cross.n, "batch_size": batch, "estimator": cross.estimator, "pooling": CKA_POOLING,
    }
    path = out_dir / f"cka_{phase}_e{epoch}.json"
    path.write_text(json.dumps({**meta, "matrix": cross.matrix.tolist(), "self_model": own.matrix.tolist()}))
    return path, meta


def cka_teacher_self(teacher: nn.Module, x: torch.Tensor, *, split: str, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    batch = _batch_size(len(x))
    own = self_similarity(teacher, x, batch_size=batch, pooling=CKA_POOLING, device=x.device)
    names = [_display(n) for n in own.x_layers]
    meta = {"phase": "teacher", "rows": names, "cols": names, "n": own.n, "batch_size": batch, "estimator": own.estimator, "pooling": CKA_POOLING, "split": split}
    path = out_dir / "cka_teacher_self.json"
    path.write_text(json.dumps({**meta, "matrix": own.matrix.tolist()}))
    return path, meta


# --------------------------------------------------------------------------- end-of-run bundle


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate embeddings of ``x`` in eval mode."""
    was_training = model.training
    model.eval()
    logits, embeddings = [], []
    with FeatureTap(model, embedding=True) as tap:
        for start in range(0, len(x), batch):
            logits.append(model(x[start : start + batch]).float().cpu())
            embeddings.append(tap.embedding.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(embeddings)


def _attribution_order(teacher_pred: np.ndarray, student_pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k images to attribute: disagreements first (teacher right, student wrong...), then the rest."""
    masks = agreement_buckets(teacher_pred, student_pred, y)["masks"]
    order = np.concatenate([np.flatnonzero(masks[b]) for b in BUCKET_ORDER])
    return order[:k]


def _attribution_methods(model: nn.Module, methods: Sequence[str]) -> list[str]:
    has_stages = bool(feature_spec(model).stages)
    return [m for m in methods if m != "gradcam" or has_stages]  # Grad-CAM needs a spatial layer


def _prototype_summary(report: Any, side: str) -> dict[str, float]:
    return {
        "ncm_accuracy": 100.0 * float(getattr(report, f"ncm_acc_{side}")),
        "norm_mean": float(getattr(report, f"mean_norm_{side}")),
        "spread_mean": float(np.nanmean(getattr(report, f"rel_spread_{side}"))),
        "cosine_to_prototype_mean": float(np.nanmean(getattr(report, f"sample_cos_{side}"))),
    }


PROJECTION_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
Stage = Callable[[str], None]  # called with a line saying what the analysis is computing now


def _no_stage(_: str) -> None:
    pass


def _projections(name: str, emb: torch.Tensor, y: torch.Tensor, num_classes: int, settings: AnalysisSettings, tensors: dict[str, torch.Tensor],
                 on_stage: Stage, position: str) -> Any:
    protos = class_means(emb, y, num_classes)
    pca = None
    for method in settings.projections:
        on_stage(f"{PROJECTION_NAMES.get(method, method)} {position}")
        proj = project_2d(emb, method=method, seed=settings.seed, prototypes=protos)
        tensors[f"{name}.{method}"] = torch.from_numpy(proj.points).float()
        tensors[f"{name}.{method}_prototypes"] = torch.from_numpy(proj.prototypes).float()
        if method == "pca":
            pca = proj
    return pca


def build_analysis(models: dict[str, nn.Module], checkpoints: dict[str, str], x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, sample_index: torch.Tensor, class_names: list[str], settings: AnalysisSettings, out_dir: Path,
                   on_stage: Stage = _no_stage) -> tuple[Path, dict[str, Any]]:
    """Compute every end-of-run view for ``models`` (teacher first) on ``x``; write JSON + safetensors.

    ``on_stage`` hears what is being computed ("t-SNE 2/3", "attribution maps 1/3"), for progress reports.
    """
    num_classes = len(class_names)
    on_stage("predictions and embeddings")
    y_np = y.cpu().numpy()
    tensors: dict[str, torch.Tensor] = {"images": images.half().cpu(), "targets": y.cpu(), "sample_index": sample_index.cpu()}
    outputs = {name: _outputs(model, x) for name, model in models.items()}
    logits_t, emb_t = outputs["teacher"]
    summary: dict[str, Any] = {
        "split": "test", "n": len(y_np), "class_names": class_names, "models": list(models), "checkpoints": checkpoints,
        "accuracy": {}, "prototypes": {}, "prototype_cosine": {}, "norm_ratio": {}, "agreement": {}, "calibration": {},
        "projections": list(settings.projections),
    }
    pcas = {}
    for position, (name, (logits, emb)) in enumerate(outputs.items(), 1):
        tensors[f"{name}.logits"], tensors[f"{name}.embedding"] = logits, emb
        summary["accuracy"][name] = 100.0 * float((logits.argmax(1).numpy() == y_np).mean())
        conf, acc, counts, ece = calibration(F.softmax(logits, 1), y_np)
        summary["calibration"][name] = {"confidence": np.nan_to_num(conf).tolist(), "accuracy": np.nan_to_num(acc).tolist(), "counts": np.asarray(counts).tolist(), "ece": float(ece)}
        pcas[name] = _projections(name, emb, y.cpu(), num_classes, settings, tensors, on_stage, f"{position}/{len(outputs)}")
        report = prototype_report(emb_t, emb, y_np, num_classes)
        side = "t" if name == "teacher" else "s"
        summary["prototypes"][name] = _prototype_summary(report, side)
        summary["prototype_cosine"][name] = np.nan_to_num(getattr(report, f"cos_{side}")).tolist()
        if name != "teacher":
            summary["norm_ratio"][name] = float(report.mean_norm_s / report.mean_norm_t)
            buckets = agreement_buckets(logits_t, logits, y_np)
            summary["agreement"][name] = {
                "both_right": buckets["both_right"], "teacher_right_model_wrong": buckets["teacher_right_student_wrong"],
                "teacher_wrong_model_right": buckets["teacher_wrong_student_right"], "both_wrong": buckets["both_wrong"],
                "agreement_rate": buckets["agreement_rate"],
            }
            if pcas.get("teacher") is not None:
                mapping = align_student_to_teacher(emb, emb_t)
                tensors[f"joint.{name}_pca"] = torch.from_numpy(pcas["teacher"].transform(mapping(emb))).float()
                summary.setdefault("joint_r2", {})[name] = mapping.r2
    summary["joint_space"] = "each model's embedding mapped to the teacher's width by least squares, then projected with the teacher's PCA"
    summary["attribution"] = _attributions(models, x, y, outputs, settings, tensors, on_stage)
    json_path = out_dir / "analysis.json"
    tensor_path = out_dir / "analysis.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_path))
    json_path.write_text(json.dumps(summary))
    return json_path, {"tensors": str(tensor_path), "split": "test", "n": summary["n"]}


def _attributions(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], settings: AnalysisSettings, tensors: dict[str, torch.Tensor],
                  on_stage: Stage) -> dict[str, Any]:
    k = min(settings.attribution_images, len(y))
    student = "student" if "student" in outputs else next(iter(outputs))
    pick = _attribution_order(outputs["teacher"][0].argmax(1).numpy(), outputs[student][0].argmax(1).numpy(), y.cpu().numpy(), k)
    tensors["attr_index"] = torch.from_numpy(pick).long()
    methods = [m for m in settings.attribution_methods if all(m in _attribution_methods(model, settings.attribution_methods) for model in models.values())]
    images, target = x[pick], y[pick]
    maps: dict[str, dict[str, torch.Tensor]] = {}
    for position, (name, model) in enumerate(models.items(), 1):
        on_stage(f"attribution maps {position}/{len(models)}")
        maps[name] = {}
        for method in methods:
            maps[name][method] = attribute(model, images, target, method, seed=settings.seed).float().cpu()
            tensors[f"attr.{name}.{method}"] = maps[name][method]
    agreement = {
        name: {method: {key: np.nan_to_num(np.asarray(val)).tolist() for key, val in compare_maps(maps["teacher"][method], maps[name][method], k=ATTRIBUTION_TOP_K).items() if key in ("spearman", "iou")} for method in methods}
        for name in models
        if name != "teacher"
    }
    return {
        "methods": methods, "target": "label", "normalization": "per_map", "k": ATTRIBUTION_TOP_K,
        "iou_random": random_topk_iou(ATTRIBUTION_TOP_K), "agreement": agreement,
    }


def analysis_subset(n_total: int, samples: int, seed: int) -> torch.Tensor:
    """A fixed, seeded subset of the test split (sorted), the same for every model of the run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[: min(samples, n_total)].sort().values

