"""The training engine: teacher, distilled student and CE-only baseline student, as resumable phases.

``run_experiment(config, sink, artifacts_dir)`` is the whole public surface. It reports through a
:class:`~kd_core.sink.MetricsSink`, writes safetensors checkpoints into ``artifacts_dir``, checks
``stop_requested()`` after every step (cancel), and resumes from ``artifacts_dir/checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.analysis.report import AnalysisSettings, analysis_subset, build_analysis, cka_checkpoint, cka_epochs, cka_teacher_self
from kd_core.config import ExperimentConfig, LossTerm, TrainingConfig
from kd_core.data import DataSplits, augment_batch, batch_indices, iterate, load_dataset
from kd_core.features import FeatureTap, probe_shapes
from kd_core.losses import BuildContext, DistillLoss, LossInputs, create_loss
from kd_core.models import count_parameters, create_model
from kd_core.sink import MetricLogger, MetricsSink
from kd_core.teachers import load_teacher_weights

EVAL_BATCH = 512
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, incompatible teacher...). The message says why and what to do."""


class StopRequested(Exception):
    """Raised after a requested stop has been checkpointed."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: cuda was requested but no CUDA GPU is visible; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Phase:
    """One model trained from start to end: the teacher, the distilled student or the baseline."""

    name: str  # "teacher" | "student" | "baseline"
    model_config: TrainingConfig
    recipe: list[LossTerm]


def plan_phases(config: ExperimentConfig) -> list[Phase]:
    ce_only = [LossTerm(loss="ce", weight=1.0)]
    phases = []
    if config.teacher.source in ("train", "torchvision") and config.teacher.epochs > 0:
        phases.append(Phase("teacher", config.teacher, ce_only))
    phases.append(Phase("student", config.student, config.recipe))
    if config.baseline:
        phases.append(Phase("baseline", config.student, ce_only))
    return phases


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Logits for ``x`` in eval mode, batched; training mode restored afterwards."""
    was_training = model.training
    model.eval()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = torch.cat([model(xb).float() for xb, _ in iterate(x, x, EVAL_BATCH)])
    model.train(was_training)
    return out


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int, teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1/top-5 (%), CE loss, per-class accuracy and, against a teacher, agreement and KL(teacher‖student)."""
    pred = logits.argmax(1)
    out = {"top1": 100.0 * (pred == target).float().mean().item(), "loss": F.cross_entropy(logits, target).item()}
    if num_classes >= 10:
        top5 = logits.topk(5, 1).indices.eq(target[:, None]).any(1)
        out["top5"] = 100.0 * top5.float().mean().item()
    correct = torch.zeros(num_classes, device=logits.device).index_add_(0, target, (pred == target).float())
    counts = torch.bincount(target, minlength=num_classes).clamp(min=1)
    for c, acc in enumerate((100.0 * correct / counts).tolist()):
        out[f"class_acc/{c}"] = acc
    if teacher_logits is not None:
        out["agreement"] = 100.0 * (pred == teacher_logits.argmax(1)).float().mean().item()
        log_p_t = F.log_softmax(teacher_logits, 1)
        out["kl_teacher_student"] = F.kl_div(F.log_softmax(logits, 1), log_p_t, reduction="batchmean", log_target=True).item()
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[list[int]]:
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


# --------------------------------------------------------------------------- checkpoints


def save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def load_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


@dataclass
class Progress:
    """Where training stands, for checkpoints, resume and the progress report."""

    phase_index: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    step: int = 0  # optimizer steps done in this phase
    best_top1: float = -1.0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished phases


# --------------------------------------------------------------------------- the engine


class Experiment:
    def __init__(self, config: ExperimentConfig, sink: MetricsSink, artifacts_dir: Path, stop_requested: Callable[[], bool]) -> None:
        self.config = config
        self.sink = sink
        self.dir = Path(artifacts_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested = stop_requested
        self.device = resolve_device(config.device)
        self.amp = self.device.type == "cuda"
        self.logger = MetricLogger(sink)
        self.phases = plan_phases(config)
        self.data: DataSplits = load_dataset(
            config.dataset.name,
            config.dataset.root,
            val_fraction=config.dataset.val_fraction,
            subset=config.dataset.subset,
            image_size=config.dataset.image_size,
            seed=config.seed,
        ).to(self.device)
        self.teacher: nn.Module | None = None
        self.started = time.time()
        self._last_progress = 0.0
        self._last_checkpoint = time.monotonic()

    # ---- models

    def new_model(self, arch: str, seed_offset: int = 0) -> nn.Module:
        seed_everything(self.config.seed + seed_offset)
        model = create_model(arch, self.data.num_classes, self.data.in_channels, self.data.image_size).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_teacher(self, progress: Progress) -> None:
        """Build the teacher: trained in its own phase, or loaded/randomly initialised per ``source``."""
        cfg = self.config.teacher
        self.teacher = self.new_model(cfg.arch, seed_offset=1)
        trained_here = self.phases[0].name == "teacher"
        if trained_here and "teacher" in progress.results:
            load_weights(self.teacher, self.dir / "teacher.safetensors")
        elif cfg.source not in ("train", "random"):
            load_teacher_weights(self.teacher, cfg.source, cfg.arch, self.data.num_classes, artifacts_root=self.dir.parent)

    def freeze_teacher(self) -> nn.Module:
        assert self.teacher is not None
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return self.teacher

    # ---- main loop

    def run(self, resume: bool) -> dict[str, Any]:
        progress = self.load_checkpoint() if resume else Progress()
        self.prepare_teacher(progress)
        sizes = self.model_sizes()
        self.sink.update_summary(sizes)
        if not any(p.name == "teacher" for p in self.phases) and "teacher" not in progress.results:
            self.evaluate_fixed_teacher(progress)
        while progress.phase_index < len(self.phases):
            phase = self.phases[progress.phase_index]
            result = self.run_phase(phase, progress)
            progress.results[phase.name] = result
            progress.phase_index += 1
            progress.epoch = progress.batch = progress.step = 0
            progress.best_top1 = -1.0
            self.save_checkpoint(progress, None, None, None, None)
        summary = self.final_summary(progress)
        if self.config.analysis.enabled:
            summary.update(self.record_analysis())
        self.sink.update_summary(summary)
        summary = {**sizes, **summary}
        self.logger.flush()
        return summary

    def model_sizes(self) -> dict[str, Any]:
        student = create_model(self.config.student.arch, self.data.num_classes, self.data.in_channels, self.data.image_size)
        t, s = count_parameters(self.teacher), count_parameters(student)
        return {"teacher_params": t, "student_params": s, "compression": round(t / s, 2), "device": str(self.device)}

    def evaluate_fixed_teacher(self, progress: Progress) -> None:
        teacher = self.freeze_teacher()
        split, x, y = self.data.eval_split()
        metrics = classification_metrics(predict(teacher, x, self.amp), y, self.data.num_classes)
        self.logger.log("teacher", 0, 0, {f"{split}/{k}": v for k, v in metrics.items()})
        progress.results["teacher"] = {"last": self.test_report("teacher", teacher)["top1"]}

    def run_phase(self, phase: Phase, progress: Progress) -> dict[str, Any]:
        cfg = phase.model_config
        is_teacher = phase.name == "teacher"
        model = self.teacher if is_teacher else self.new_model(cfg.arch)
        assert model is not None
        teacher = None if is_teacher else self.freeze_teacher()
        losses = self.build_losses(phase.recipe, model, teacher)
        params = list(model.parameters()) + [p for loss in losses for p in loss.parameters()]
        optimizer = make_optimizer(params, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        steps_per_epoch = math.ceil(len(self.data.train_y) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        if progress.step > 0 or progress.epoch > 0:
            self.restore_phase_state(model, optimizer, scheduler, losses)
        self.sink.discard_metrics_after(phase.name, progress.step)
        needs = set().union(*(loss.needs for loss in losses))
        teacher_needed = teacher is not None and bool(needs & {"logits", "embedding", "stages"})
        cache = self.teacher_cache(teacher, needs, losses) if teacher_needed else None
        split, eval_x, eval_y = self.data.eval_split()
        eval_teacher_logits = predict(teacher, eval_x, self.amp) if teacher is not None else None
        tap_s = FeatureTap(model, stages="stages" in needs, embedding="embedding" in needs)
        tap_t = FeatureTap(teacher, stages="stages" in needs, embedding="embedding" in needs) if teacher_needed and cache is None else None
        keys = [self.term_key(phase.recipe, i) for i in range(len(losses))]  # log names, once per phase
        adaptive = [(key, loss) for key, loss in zip(keys, losses) if type(loss).after_step is not DistillLoss.after_step]
        model.train()
        try:
            for epoch in range(progress.epoch, cfg.epochs):
                progress.epoch = epoch
                batches = batch_indices(len(self.data.train_y), cfg.batch_size, shuffle=True, seed=self.config.seed, epoch=epoch)
                epoch_start, epoch_images = time.perf_counter(), 0
                for b in range(progress.batch, len(batches)):
                    t0 = time.perf_counter()
                    idx = batches[b].to(self.device)
                    x, y = self.data.train_x[idx], self.data.train_y[idx]
                    if self.config.dataset.augment:
                        # seeded per batch, so a run resumed mid-epoch sees the same crops and flips
                        aug_gen = torch.Generator().manual_seed((self.config.seed * 7919 + epoch) * 100_003 + b)
                        x = augment_batch(x, flip=self.data.flip, generator=aug_gen)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        tap_s.clear()
                        logits = model(x)
                        inputs = LossInputs(student_logits=logits.float(), target=y, index=idx, epoch=epoch, step=progress.step, total_steps=total_steps)
                        if "embedding" in needs:
                            inputs.student_embedding = tap_s.embedding
                        if "stages" in needs:
                            inputs.student_stages = tap_s.stages
                        if teacher_needed:
                            self.fill_teacher(inputs, teacher, tap_t, cache, x, idx, needs)
                        terms = {key: loss(inputs).float() for key, loss in zip(keys, losses)}
                    total = sum(self.term_weight(term, epoch + b / len(batches)) * terms[key] for key, term in zip(keys, phase.recipe))
                    if not torch.isfinite(total):
                        raise TrainingError(
                            f"the loss became {total.item()} at {phase.name} epoch {epoch + 1}, step {progress.step + 1}: "
                            f"lower {phase.name}.optimizer.lr (now {cfg.optimizer.lr}) or the recipe weights"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    for key, loss in adaptive:  # schedules follow their own term's value (TAID)
                        loss.after_step(float(terms[key].detach()))
                    progress.step += 1
                    progress.batch = b + 1
                    values: dict[str, Any] = {"loss/total": total.detach()}
                    values.update({f"loss/{k}": v.detach() for k, v in terms.items()})
                    for _, loss in adaptive:
                        values.update(loss.logged_values())
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    values["images_per_s"] = len(idx) / max(time.perf_counter() - t0, 1e-9)
                    self.logger.log(phase.name, progress.step, epoch, values)
                    epoch_images += len(idx)
                    self.report_progress(phase, progress, steps_per_epoch, cfg.epochs, epoch_images / max(time.perf_counter() - epoch_start, 1e-9))
                    if self.stop_requested():
                        self.save_checkpoint(progress, model, optimizer, scheduler, losses)
                        raise StopRequested()
                    if time.monotonic() - self._last_checkpoint > self.config.checkpoint_every_s:
                        self.save_checkpoint(progress, model, optimizer, scheduler, losses)
                scheduler.step()
                progress.batch = 0
                metrics = classification_metrics(predict(model, eval_x, self.amp), eval_y, self.data.num_classes, eval_teacher_logits)
                self.logger.log(phase.name, progress.step, epoch, {f"{split}/{k}": v for k, v in metrics.items()})
                if teacher is not None and epoch + 1 in self.cka_epochs(cfg.epochs):
                    self.record_cka(teacher, model, eval_x, split, phase.name, epoch + 1, progress.step)
                if metrics["top1"] > progress.best_top1:
                    progress.best_top1 = metrics["top1"]
                    save_weights(model, self.dir / f"{phase.name}_best.safetensors")
                progress.epoch = epoch + 1
                self.save_checkpoint(progress, model, optimizer, scheduler, losses)
        finally:
            tap_s.remove()
            if tap_t is not None:
                tap_t.remove()
            self.logger.flush()
        return self.finish_phase(phase, model, losses)

    # ---- loss plumbing

    @staticmethod
    def term_key(recipe: list[LossTerm], i: int) -> str:
        name = recipe[i].loss
        return name if sum(t.loss == name for t in recipe) == 1 else f"{name}_{i}"

    @staticmethod
    def term_weight(term: LossTerm, epoch_progress: float) -> float:
        if term.warmup_epochs <= 0:
            return term.weight
        return term.weight * min(1.0, (epoch_progress + 1) / term.warmup_epochs)

    def build_losses(self, recipe: list[LossTerm], model: nn.Module, teacher: nn.Module | None) -> list[DistillLoss]:
        losses = [create_loss(term.loss, term.params) for term in recipe]
        if teacher is None:
            return [loss.to(self.device) for loss in losses]
        d = self.data
        context = BuildContext(
            student=probe_shapes(model, d.in_channels, d.image_size),
            teacher=probe_shapes(teacher, d.in_channels, d.image_size),
            num_train=len(d.train_y),
        )
        if any("class_means" in loss.needs for loss in losses):
            context.class_means = self.teacher_class_means(teacher)
        for loss in losses:
            loss.build(context)
        return [loss.to(self.device) for loss in losses]

    @torch.no_grad()
    def teacher_class_means(self, teacher: nn.Module) -> torch.Tensor:
        """Mean teacher embedding per class over the training set, in one vectorized pass (ND)."""
        with FeatureTap(teacher, embedding=True) as tap:
            embeddings = []
            for xb, _ in iterate(self.data.train_x, self.data.train_y, EVAL_BATCH):
                teacher(xb)
                embeddings.append(tap.embedding.float())
        emb = torch.cat(embeddings)
        y = self.data.train_y
        sums = torch.zeros(self.data.num_classes, emb.shape[1], device=emb.device).index_add_(0, y, emb)
        return sums / torch.bincount(y, minlength=self.data.num_classes).clamp(min=1)[:, None].float()

    def teacher_cache(self, teacher: nn.Module, needs: set[str], losses: list[DistillLoss]) -> dict[str, torch.Tensor] | None:
        """Teacher logits/embeddings of every training image, when nothing makes them vary between epochs."""
        cacheable = (
            self.config.cache_teacher
            and not self.config.dataset.augment
            and "stages" not in needs
            and all(loss.teacher_cacheable for loss in losses)
        )
        if not cacheable:
            return None
        with torch.no_grad(), FeatureTap(teacher, embedding="embedding" in needs) as tap:
            logits, embeddings = [], []
            for xb, _ in iterate(self.data.train_x, self.data.train_y, EVAL_BATCH):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits.append(teacher(xb).float())
                if tap.embedding is not None:
                    embeddings.append(tap.embedding.float())
        cache = {"logits": torch.cat(logits)}
        if embeddings:
            cache["embedding"] = torch.cat(embeddings)
        return cache

    @staticmethod
    def fill_teacher(inputs: LossInputs, teacher: nn.Module, tap: FeatureTap | None, cache: dict[str, torch.Tensor] | None, x: torch.Tensor, idx: torch.Tensor, needs: set[str]) -> None:
        if cache is not None:
            inputs.teacher_logits = cache["logits"][idx]
            inputs.teacher_embedding = cache["embedding"][idx] if "embedding" in cache else None
            return
        assert tap is not None
        tap.clear()
        with torch.no_grad():
            inputs.teacher_logits = teacher(x).float()
        if "embedding" in needs:
            inputs.teacher_embedding = tap.embedding
        if "stages" in needs:
            inputs.teacher_stages = tap.stages

    # ---- reporting

    def report_progress(self, phase: Phase, progress: Progress, steps_per_epoch: int, epochs: int, images_per_s: float) -> None:
        now = time.monotonic()
        if now - self._last_progress < 2.0:
            return
        self._last_progress = now
        remaining_images = (steps_per_epoch * epochs - progress.step) * phase.model_config.batch_size
        for later in self.phases[progress.phase_index + 1 :]:
            remaining_images += later.model_config.epochs * len(self.data.train_y)
        self.sink.update_progress(
            {
                "phase": phase.name,
                "phase_index": progress.phase_index + 1,
                "phases": len(self.phases),
                "epoch": progress.epoch + 1,
                "epochs": epochs,
                "step": progress.step,
                "steps": steps_per_epoch * epochs,
                "images_per_s": round(images_per_s, 1),
                "eta_s": round(remaining_images / images_per_s, 1) if images_per_s > 0 else None,
            }
        )

    def test_report(self, name: str, model: nn.Module) -> dict[str, Any]:
        """Accuracy, per-class accuracy and confusion matrix of ``model`` on the test split (saved as JSON)."""
        logits = predict(model, self.data.test_x, self.amp)
        metrics = classification_metrics(logits, self.data.test_y, self.data.num_classes)
        report = {
            "split": "test",
            "top1": metrics["top1"],
            "top5": metrics.get("top5"),
            "class_acc": [metrics[f"class_acc/{c}"] for c in range(self.data.num_classes)],
            "confusion": confusion_matrix(logits.argmax(1), self.data.test_y, self.data.num_classes),
            "class_names": self.data.class_names,
        }
        path = self.dir / f"{name}_report.json"
        path.write_text(json.dumps(report))
        self.sink.add_artifact("report", str(path), {"model": name, "split": "test"})
        return report

    def finish_phase(self, phase: Phase, model: nn.Module, losses: list[DistillLoss]) -> dict[str, Any]:
        last_path = self.dir / f"{phase.name}.safetensors"
        save_weights(model, last_path)
        self.sink.add_artifact("checkpoint", str(last_path), {"model": phase.name, "which": "last", "arch": phase.model_config.arch})
        extras = nn.ModuleList(losses)
        extra_params = sum(p.numel() for p in extras.parameters())
        if extra_params:
            save_weights(extras, self.dir / f"{phase.name}_recipe_extras.safetensors")
        result = {"last": self.test_report(f"{phase.name}_last", model)["top1"], "extra_params": extra_params}
        best_path = self.dir / f"{phase.name}_best.safetensors"
        if best_path.exists():
            load_weights(model, best_path)
            self.sink.add_artifact("checkpoint", str(best_path), {"model": phase.name, "which": "best", "arch": phase.model_config.arch})
        result["best"] = self.test_report(f"{phase.name}_best", model)["top1"]
        if phase.name == "teacher":
            load_weights(model, last_path)
        return result

    def final_summary(self, progress: Progress) -> dict[str, Any]:
        r = progress.results
        teacher = r.get("teacher", {})
        summary: dict[str, Any] = {
            "teacher_acc": teacher.get("last"),
            "student_acc": r["student"]["best"],
            "student_last_acc": r["student"]["last"],
            "recipe_extra_params": r["student"]["extra_params"],
            "selection_split": self.data.eval_split()[0],
            "duration_s": round(time.time() - self.started, 1),
        }
        if "baseline" in r:
            summary["baseline_acc"] = r["baseline"]["best"]
            summary["baseline_last_acc"] = r["baseline"]["last"]
            summary["kd_gain"] = round(summary["student_acc"] - summary["baseline_acc"], 2)
        return summary

    # ---- analysis artifacts (read by the Analysis page)

    def analysis_settings(self) -> AnalysisSettings:
        a = self.config.analysis
        return AnalysisSettings(a.cka_checkpoints, a.samples, a.attribution_images, tuple(a.projections), seed=self.config.seed)

    def cka_epochs(self, epochs: int) -> set[int]:
        return cka_epochs(epochs, self.config.analysis.cka_checkpoints) if self.config.analysis.enabled else set()

    def record_cka(self, teacher: nn.Module, model: nn.Module, eval_x: torch.Tensor, split: str, phase: str, epoch: int, step: int) -> None:
        x = eval_x[: self.config.analysis.samples]
        if not (self.dir / "cka_teacher_self.json").exists():
            path, meta = cka_teacher_self(teacher, x, split=split, out_dir=self.dir)
            self.sink.add_artifact("cka", str(path), meta)
        path, meta = cka_checkpoint(teacher, model, x, phase=phase, epoch=epoch, step=step, split=split, out_dir=self.dir)
        self.sink.add_artifact("cka", str(path), meta)

    def record_analysis(self) -> dict[str, Any]:
        """The end-of-run bundle. A failure here is reported in the summary; the trained models stay."""
        try:
            models: dict[str, nn.Module] = {"teacher": self.freeze_teacher()}
            checkpoints = {"teacher": "teacher.safetensors"}
            for phase in self.phases:
                if phase.name != "teacher":
                    model = self.new_model(phase.model_config.arch)
                    load_weights(model, self.dir / f"{phase.name}_best.safetensors")
                    models[phase.name] = model.eval()
                    checkpoints[phase.name] = f"{phase.name}_best.safetensors"
            d = self.data
            idx = analysis_subset(len(d.test_y), self.config.analysis.samples, self.config.seed).to(self.device)
            x = d.test_x[idx]
            path, meta = build_analysis(models, checkpoints, x, d.test_y[idx], d.denormalize(x), idx, d.class_names, self.analysis_settings(), self.dir)
        except Exception as exc:  # noqa: BLE001 - the run's training results must survive an analysis bug
            import traceback

            traceback.print_exc()
            return {"analysis_error": f"{exc.__class__.__name__}: {exc}"}
        self.sink.add_artifact("analysis", str(path), meta)
        return {}

    # ---- checkpoint / resume

    def save_checkpoint(self, progress: Progress, model: nn.Module | None, optimizer: Any, scheduler: Any, losses: list[DistillLoss] | None) -> None:
        self.logger.flush()
        state: dict[str, Any] = {
            "progress": {k: v for k, v in progress.__dict__.items() if k != "results"},
            "results": json.dumps(progress.results),
            "rng": torch.get_rng_state(),
        }
        if model is not None:
            state.update(
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                losses=[loss.state_dict() for loss in losses or []],
            )
        tmp = self.dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.dir / CHECKPOINT)
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self) -> Progress:
        path = self.dir / CHECKPOINT
        if not path.exists():
            return Progress()
        # our own file, but still never unpickle arbitrary objects
        self._resume_state = torch.load(path, map_location=self.device, weights_only=True)
        progress = Progress(**self._resume_state["progress"], results=json.loads(self._resume_state["results"]))
        return progress

    def restore_phase_state(self, model: nn.Module, optimizer: Any, scheduler: Any, losses: list[DistillLoss]) -> None:
        state = getattr(self, "_resume_state", None)
        if state is None or "model" not in state:
            return
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for loss, loss_state in zip(losses, state["losses"]):
            loss.load_state_dict(loss_state)
        torch.set_rng_state(state["rng"].cpu())


def make_optimizer(params: list[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.scheduler
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if s.name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=s.milestones, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def run_experiment(
    config: ExperimentConfig,
    sink: MetricsSink,
    artifacts_dir: str | Path,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every phase of ``config``; return the summary (accuracies in %, KD gain in points)."""
    return Experiment(config, sink, Path(artifacts_dir), stop_requested).run(resume)
