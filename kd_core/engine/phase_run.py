"""One phase of a run (a teacher, the distilled student or the baseline), trained epoch by epoch.

A resumed run continues at the exact batch: model, optimizer, scheduler, loss and method state and the
RNG come back from the checkpoint.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kd_core.data import batch_indices, num_batches
from kd_core.engine.callbacks import Callback
from kd_core.engine.checkpoint import load_weights, save_weights
from kd_core.engine.distributed import sync_batchnorm
from kd_core.engine.errors import StopRequested
from kd_core.engine.evaluation import classification_metrics, predict
from kd_core.engine.optim import make_optimizer, make_scheduler
from kd_core.engine.phases import Phase, Progress
from kd_core.engine.step import TrainStep, term_keys
from kd_core.engine.teacher import teacher_outputs_for
from kd_core.methods import Batch

if TYPE_CHECKING:
    from kd_core.engine.experiment import Experiment


class PhaseRun:
    """Trains one phase's model epoch by epoch; a resumed run continues at the exact batch."""

    def __init__(self, experiment: Experiment, phase: Phase, progress: Progress) -> None:
        exp = self.experiment = experiment
        self.phase, self.progress = phase, progress
        cfg = phase.model_config
        trains_teacher = phase.teacher_index is not None
        self.model = exp.teachers[phase.teacher_index] if phase.teacher_index is not None else exp.new_model(cfg.arch)
        if exp.config.compile:
            # in place: the state dict keeps its keys, so checkpoints load into a model that is not compiled
            self.model.compile()
        self.teacher = None if trains_teacher else exp.freeze_teacher()
        self.losses = exp.build_losses(phase.recipe, self.model, self.teacher)
        self.method = exp.build_method(self.model) if phase.name == "student" else None
        params = list(self.model.parameters()) + [p for module in (*self.losses, self.method) if module is not None for p in module.parameters()]
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.steps_per_epoch = num_batches(len(exp.data.train_y), cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # the outputs the student learns from: the teacher, or what a method makes of the teachers (an ensemble)
        self.target_teacher = self.method.distill_teacher(exp.teachers) if self.method is not None and self.teacher is not None else self.teacher
        needs: set[str] = set().union(*(loss.needs for loss in self.losses), self.method.teacher_needs if self.method else ())
        teacher_needed = self.target_teacher is not None and bool(needs & {"logits", "embedding", "stages"})
        self.teacher_outputs = teacher_outputs_for(exp, phase, self.target_teacher, needs, self.losses, self.method) if teacher_needed else None
        self.step = TrainStep(self.model, self.losses, phase.recipe, exp.precision, self.optimizer, self.teacher_outputs, self.method)
        self.restore()
        if exp.dist.active:
            self.spread_over_ranks(params)
        exp.sink.discard_metrics_after(phase.name, progress.step)
        self.split, self.eval_x, self.eval_y = exp.data.eval_split()
        self.eval_teacher_logits = predict(self.target_teacher, self.eval_x, exp.precision) if self.target_teacher is not None else None
        exp.guard.start_phase(phase.name, cfg.optimizer.lr, {key: term.weight for key, term in zip(term_keys(phase.recipe), phase.recipe)})

    def spread_over_ranks(self, params: list[nn.Parameter]) -> None:
        """Several devices: the step's forward goes through DDP; the other trainable parameters' gradients are averaged.

        ``self.model`` stays the plain module: evaluation, checkpoints and weights files never see DDP.
        """
        exp = self.experiment
        sync_batchnorm(self.model, exp.device, exp.dist)
        self.step.model = exp.dist.wrap(self.model, exp.device)
        in_model = {id(p) for p in self.model.parameters()}
        extras = [p for p in params if id(p) not in in_model]
        self.step.after_backward = lambda: exp.dist.average_grads(extras)

    def restore(self) -> None:
        state = self.experiment.resume_state() if self.progress.step > 0 or self.progress.epoch > 0 else None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for loss, loss_state in zip(self.losses, state["losses"]):
            loss.load_state_dict(loss_state)
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        if self.step.scaler is not None and "scaler" in state:
            self.step.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())

    def state(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "losses": [loss.state_dict() for loss in self.losses]}
        if self.method is not None:
            state["method"] = self.method.state_dict()
        if self.step.scaler is not None:
            state["scaler"] = self.step.scaler.state_dict()
        return state

    @property
    def teacher_mode(self) -> dict[str, Any]:
        outputs = self.teacher_outputs
        if outputs is None:
            return {}
        store = outputs.store_summary()
        return {"teacher_outputs": outputs.mode, "teacher_outputs_reason": outputs.why_live, **({"teacher_outputs_store": store} if store else {})}

    def run(self) -> dict[str, Any]:
        exp = self.experiment
        for callback in exp.callbacks:
            callback.on_phase_start(self)
        self.model.train()
        exp.reporter.start_clock()
        try:
            for epoch in range(self.progress.epoch, self.phase.model_config.epochs):
                self.train_epoch(epoch)
                if self.teacher_outputs is not None:
                    self.teacher_outputs.end_epoch(epoch)  # a fully trained epoch's teacher logits go to the soft-label store
                self.end_epoch(epoch)
        finally:
            self.step.close()
            if self.teacher_outputs is not None:
                self.teacher_outputs.close()
            exp.logger.flush()
        return exp.dist.on_main(self.finish)

    def train_epoch(self, epoch: int) -> None:
        exp, progress, cfg = self.experiment, self.progress, self.phase.model_config
        progress.epoch = epoch
        batches = batch_indices(len(exp.data.train_y), cfg.batch_size, shuffle=True, seed=exp.config.seed, epoch=epoch)
        on_step = [c for c in exp.callbacks if type(c).on_step is not Callback.on_step]
        t0 = time.perf_counter()
        train = exp.data.train_x.train_batches(batches, start=progress.batch, epoch=epoch, seed=exp.config.seed,
                                               augment=exp.config.dataset.augment, flip=exp.data.flip)
        for b, idx, x in train:
            batch = Batch(x, exp.data.train_y[idx], idx)
            if self.teacher_outputs is not None:
                self.teacher_outputs.begin_batch(epoch, b)
            if self.method is not None:
                batch = self.method.prepare_batch(batch, torch.Generator().manual_seed((exp.config.seed * 7927 + epoch) * 100_019 + b))
            batch = exp.dist.shard_batch(batch)  # DDP: this rank's rows of the global batch (after augmenting it whole)
            out = self.step(batch, epoch=epoch, epoch_progress=epoch + b / len(batches), step=progress.step, total_steps=self.total_steps)
            progress.step += 1
            progress.batch = b + 1
            values = exp.dist.mean_values(self.step.logged_values(out))  # DDP: the global batch's mean
            now = time.perf_counter()
            values["images_per_s"] = len(idx) / max(now - t0, 1e-9)  # since the last step: waiting for data counts
            t0 = now
            exp.logger.log(self.phase.name, progress.step, epoch, values)
            exp.reporter.images_seen += len(idx)
            exp.reporter.training(self.phase, progress, self.steps_per_epoch, lambda: {**self.teacher_mode, "trained_s": exp.trained_s(progress)})
            for callback in on_step:
                callback.on_step(self, idx)
            if exp.stop_requested():
                exp.save_checkpoint(progress, self.state())
                raise StopRequested()
            if time.monotonic() - exp._last_checkpoint > exp.config.checkpoint_every_s:
                exp.save_checkpoint(progress, self.state())

    def end_epoch(self, epoch: int) -> None:
        exp, progress = self.experiment, self.progress
        self.scheduler.step()
        progress.batch = 0
        exp.logger.flush()  # the non-finite check runs before this epoch can become "best"
        method_values = self.method.on_epoch_end(self, exp.precision) if self.method is not None else {}  # every rank: it may update the method
        if exp.dist.is_main:
            self.evaluate_epoch(epoch, method_values)
        progress.epoch = epoch + 1
        exp.save_checkpoint(progress, self.state())
        exp.dist.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint

    def evaluate_epoch(self, epoch: int, method_values: dict[str, Any]) -> None:
        """Validation metrics, CKA checkpoints and the best weights (on rank 0 alone when there are several devices)."""
        exp, progress = self.experiment, self.progress
        metrics = classification_metrics(self.predict(self.eval_x), self.eval_y, exp.data.num_classes, self.eval_teacher_logits)
        exp.logger.log(self.phase.name, progress.step, epoch, {**{f"{self.split}/{k}": v for k, v in metrics.items()}, **method_values})
        for callback in exp.callbacks:
            callback.on_epoch_end(self, epoch + 1)
        if metrics["top1"] > progress.best_top1:
            progress.best_top1 = metrics["top1"]
            save_weights(self.model, exp.dir / f"{self.phase.name}_best.safetensors")
            if self.method is not None:
                save_weights(self.method, exp.dir / f"{self.phase.name}_best_method.safetensors")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The phase's prediction for ``x``: the model's logits, or what the method makes of them (a blend)."""
        return predict(self.model, x, self.experiment.precision, self.method)

    def finish(self) -> dict[str, Any]:
        exp, phase = self.experiment, self.phase
        last_path = exp.dir / f"{phase.name}.safetensors"
        save_weights(self.model, last_path)
        exp.sink.add_artifact("checkpoint", str(last_path), {"model": phase.name, "which": "last", "arch": phase.model_config.arch})
        extras = nn.ModuleList(self.losses)
        extra_params = sum(p.numel() for module in (extras, self.method) if module is not None for p in module.parameters())
        if any(True for _ in extras.parameters()):
            save_weights(extras, exp.dir / f"{phase.name}_recipe_extras.safetensors")
        if self.method is not None:
            save_weights(self.method, exp.dir / f"{phase.name}_method.safetensors")
        result = {"last": exp.test_report(f"{phase.name}_last", self.model, self.method)["top1"], "extra_params": extra_params, **self.teacher_mode}
        best_path = exp.dir / f"{phase.name}_best.safetensors"
        if best_path.exists():
            load_weights(self.model, best_path)
            if self.method is not None:
                load_weights(self.method, exp.dir / f"{phase.name}_best_method.safetensors")
            exp.sink.add_artifact("checkpoint", str(best_path), {"model": phase.name, "which": "best", "arch": phase.model_config.arch})
        result["best"] = exp.test_report(f"{phase.name}_best", self.model, self.method)["top1"]
        if phase.teacher_index is not None:
            load_weights(self.model, last_path)
        return result
