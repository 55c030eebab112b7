"""TGeo-KD: a sample-wise fusion ratio α(x) between the teacher's and the label's supervision, predicted from
the trilateral geometry of student, teacher and ground truth, trained on held-out data by a hypergradient.

Hu, Wu, Li, Ma, Chen, Wang, Yan, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry for Knowledge
Distillation", ICLR 2024 (arXiv 2312.15112); released code github.com/Chengming0501/TGeo-KD
(``src/fusion_ratio_bilevel.py``, ``src/network.py``).

The student's loss, per sample i (the released script's form)::

    ℓ_i = α_i · T² · KL(softmax(z_t,i / T) ‖ softmax(z_s,i / T)) + (1 − α_i) · CE(z_s,i, y_i)

α_i = σ(MLP(state_i)), the MLP ``9C → 32 → 16 → 1`` with LeakyReLU, fed the released "option 3" state:
``[p_s, p_t, g, t̄, (t̄−p_s)², (g−p_s)², (p_t−p_s)², (p_t−g)², (t̄−g)²]`` (softmax at T = 1, g the one-hot
label, t̄ the teacher's mean prediction over the training samples of class y_i). The state is a constant
for α: gradients reach the MLP only through the hypergradient below.

Bilevel training, as the paper describes it (the released script computes α under ``no_grad`` and its
outer loss does not depend on α, so its ratio network never learns; this one does). Each step, before the
student's update (Meta-Weight-Net order):

1. one virtual SGD step of the student on the training batch with the α-weighted loss,
   ``θ'(φ) = θ − η ∇_θ mean_i ℓ_i(θ, α_i(φ))`` (η the student's current learning rate);
2. the stepped student's CE on a batch of the *validation* split, ``L_val(θ'(φ))``;
3. ``∇_φ L_val`` by differentiating through step 1 (second order, ``torch.func.functional_call`` on the
   student's parameters and copies of its buffers), applied to φ by Adam.

The student then trains on ``mean_i ℓ_i`` with α from the updated network, detached. The validation split is
the only held-out data the method sees (``MethodContext.val_x``); the test split never reaches it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.losses.base import LossInputs
from kd_core.methods.base import Batch, Method, MethodContext, StudentOutputs, register_method

if TYPE_CHECKING:
    from kd_core.config import ExperimentConfig
    from kd_core.engine.experiment import PhaseRun
    from kd_core.engine.precision import Precision

STATE_BLOCKS = 9  # vectors of C entries in the geometry state
QUANTILES = (0.1, 0.5, 0.9)


class FusionRatioNet(nn.Module):
    """The released ``Controller``: ``Linear(9C, 32) → LeakyReLU → Linear(32, 16) → LeakyReLU → Linear(16, 1) → sigmoid``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(STATE_BLOCKS * num_classes, 32), nn.LeakyReLU(), nn.Linear(32, 16), nn.LeakyReLU(), nn.Linear(16, 1))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """α per sample, shape ``[B]``, in (0, 1)."""
        return torch.sigmoid(self.net(state)).squeeze(1)


def geometry_state(p_s: torch.Tensor, p_t: torch.Tensor, g: torch.Tensor, t_bar: torch.Tensor) -> torch.Tensor:
    """Vertices S, T, G and T̄ of the trilateral geometry and the squared differences between them, ``[B, 9C]``."""
    return torch.cat([p_s, p_t, g, t_bar, (t_bar - p_s) ** 2, (g - p_s) ** 2, (p_t - p_s) ** 2, (p_t - g) ** 2, (t_bar - g) ** 2], dim=1)


def per_sample_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T²·KL_i, CE_i)`` per sample, each ``[B]``: KL(teacher ‖ student) at temperature T, CE against the label."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2
    return kl, F.cross_entropy(student_logits, target, reduction="none")


def fused_loss(alpha: torch.Tensor, kl: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """``mean_i [α_i·T²·KL_i + (1 − α_i)·CE_i]``."""
    return (alpha * kl + (1 - alpha) * ce).mean()


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """Fused attention kernels have no second derivative: use the math kernel inside the virtual step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@register_method
class TGeoKD(Method):
    name = "tgeo_kd"
    summary: ClassVar[str] = ("Per-sample ratio α(x) between the teacher's soft targets and the label, predicted from the geometry "
                              "of student, teacher and label by a small network trained on the validation split by a hypergradient.")
    paper: ClassVar[str] = ('Hu, Wu, Li, Ma, Chen, Wang, Yan, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry '
                            'for Knowledge Distillation", ICLR 2024')
    paper_url: ClassVar[str] = "https://arxiv.org/abs/2312.15112"
    caveat: ClassVar[str] = (
        "The ratio network is trained by a one-step-unrolled hypergradient on the validation split, as the paper "
        "describes; the released script never updates it. CE is taken on the logits (the released script applies it "
        "to softmax outputs). Its outer optimizer (Adam, lr 0.1, weight decay 0.05, one full-batch step per epoch on "
        "tabular data) is replaced by Adam with a smaller lr and no weight decay, one step per training batch. The "
        "teacher's class means t̄ are running means over the training batches seen so far.")
    teacher_needs: ClassVar[frozenset[str]] = frozenset(["logits"])
    has_own_loss: ClassVar[bool] = True

    class_prob_sum: torch.Tensor
    class_count: torch.Tensor
    virtual_lr: torch.Tensor
    adam_step: torch.Tensor
    epoch_alpha: torch.Tensor
    epoch_teacher_right: torch.Tensor

    def __init__(self, temperature: float = 1.5, alpha_lr: float = 1e-3, alpha_weight_decay: float = 0.0, val_batch_size: int = 64,
                 weight: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alpha_lr < 0 or alpha_weight_decay < 0:
            raise ValueError(f"alpha_lr and alpha_weight_decay must be >= 0, got {alpha_lr}, {alpha_weight_decay}")
        if isinstance(val_batch_size, bool) or not isinstance(val_batch_size, int) or val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a whole number >= 1, got {val_batch_size}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.temperature, self.alpha_lr, self.alpha_weight_decay = float(temperature), float(alpha_lr), float(alpha_weight_decay)
        self.val_batch_size, self.weight = val_batch_size, float(weight)
        self.alpha_net: FusionRatioNet | None = None
        self._student: tuple[nn.Module, ...] = ()  # a reference, not a submodule: the student is saved on its own
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seed = 0
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, inputs) of the batch being trained
        self._step_values: dict[str, torch.Tensor] = {}

    @classmethod
    def config_errors(cls, config: ExperimentConfig) -> list[tuple[str, str]]:
        if config.dataset.val_fraction <= 0:
            return [("dataset.val_fraction", "tgeo_kd trains its ratio network on the validation split: set val_fraction > 0 (e.g. 0.1)")]
        return []

    # ---- modules and state

    def build(self, context: MethodContext) -> None:
        from kd_core.config import OptimizerConfig

        if context.val_x is None or context.val_y is None or not len(context.val_y):
            raise ValueError("tgeo_kd needs a validation split (dataset.val_fraction > 0)")
        c = context.num_classes
        self.alpha_net = FusionRatioNet(c)
        for i, p in enumerate(self.alpha_net.parameters()):  # Adam's moments, as buffers: saved and resumed with the method
            self.register_buffer(f"adam_m{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_v{i}", torch.zeros_like(p))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("class_prob_sum", torch.zeros(c, c))
        self.register_buffer("class_count", torch.zeros(c))
        lr = context.config.student.optimizer.lr if context.config is not None else OptimizerConfig().lr
        self.register_buffer("virtual_lr", torch.tensor(float(lr)))  # follows the student's schedule, epoch by epoch
        self.register_buffer("epoch_alpha", torch.full((context.num_train,), float("nan")))
        self.register_buffer("epoch_teacher_right", torch.zeros(context.num_train))
        self._val = (context.val_x, context.val_y)
        self._seed = context.config.seed if context.config is not None else 0

    def init_student(self, student: nn.Module, teacher: nn.Module) -> None:
        self._student = (student,)

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Keeps a reference to the training inputs for the virtual step (the batch itself is unchanged)."""
        self._batch = (batch.idx, batch.x)
        return batch

    # ---- α

    def state(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The geometry state of each sample (no gradient), from the class means t̄ as they stand."""
        with torch.no_grad():
            c = student_logits.shape[1]
            t_bar = (self.class_prob_sum / self.class_count.clamp_min(1)[:, None])[target]
            g = F.one_hot(target, c).float()
            return geometry_state(F.softmax(student_logits.float(), 1), F.softmax(teacher_logits.float(), 1), g, t_bar)

    def alpha(self, state: torch.Tensor) -> torch.Tensor:
        assert self.alpha_net is not None, "build() comes first"
        return self.alpha_net(state)

    @torch.no_grad()
    def _observe_teacher(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> None:
        c = teacher_logits.shape[1]
        self.class_prob_sum.index_add_(0, target, F.softmax(teacher_logits.float(), 1))
        self.class_count += torch.bincount(target, minlength=c).float()

    # ---- the hypergradient

    def _val_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._val is not None
        val_x, val_y = self._val
        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + step)
        pick = torch.randperm(len(val_y), generator=generator)[: self.val_batch_size].to(val_y.device)
        return val_x[pick], val_y[pick]

    def hypergradient(self, x: torch.Tensor, state: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      val_x: torch.Tensor, val_y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``∇_φ L_val(θ − η ∇_θ L_train(θ, α_φ))`` and ``L_val``: one virtual SGD step, differentiated through.

        The student's own parameters and buffers are untouched: the virtual forwards run on copies of the
        buffers (batch-norm statistics), and gradients are returned, never accumulated.
        """
        from torch.func import functional_call

        assert self.alpha_net is not None and self._student
        student = self._student[0]
        params = {name: p for name, p in student.named_parameters() if p.requires_grad}

        def buffers() -> dict[str, torch.Tensor]:
            return {name: b.clone() for name, b in student.named_buffers()}

        with _double_backward_attention():
            alpha = self.alpha_net(state)
            logits = functional_call(student, {**params, **buffers()}, (x,))  # outside autocast: the parameters' dtype
            train_loss = fused_loss(alpha, *per_sample_terms(logits, teacher_logits, target, self.temperature))
            grads = torch.autograd.grad(train_loss, list(params.values()), create_graph=True, allow_unused=True)
            lr = self.virtual_lr
            stepped = {name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads)}
            val_logits = functional_call(student, {**stepped, **buffers()}, (val_x,))
            val_loss = F.cross_entropy(val_logits, val_y)
            hyper = torch.autograd.grad(val_loss, list(self.alpha_net.parameters()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.alpha_net.parameters(), hyper)], val_loss.detach()

    @torch.no_grad()
    def _adam(self, grads: list[torch.Tensor], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        """One Adam step of the ratio network (torch.optim.Adam's update, L2 weight decay), moments in buffers."""
        assert self.alpha_net is not None
        self.adam_step += 1
        t = float(self.adam_step)
        for i, (p, g) in enumerate(zip(self.alpha_net.parameters(), grads)):
            if self.alpha_weight_decay:
                g = g + self.alpha_weight_decay * p
            m, v = getattr(self, f"adam_m{i}"), getattr(self, f"adam_v{i}")
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-self.alpha_lr / (1 - beta1**t))

    # ---- the hooks of a training step

    def losses(self, inputs: LossInputs, student: StudentOutputs, epoch_progress: float) -> dict[str, torch.Tensor]:
        assert inputs.teacher_logits is not None and inputs.target is not None
        z_t, y = inputs.teacher_logits, inputs.target
        self._observe_teacher(z_t, y)
        state = self.state(inputs.student_logits, z_t, y)
        values: dict[str, torch.Tensor] = {}
        if self.training and self._student and self._val is not None:
            if self._batch is None or self._batch[0] is not inputs.index:
                raise RuntimeError("tgeo_kd's virtual step needs the training batch's inputs, which prepare_batch did not see")
            val_x, val_y = self._val_batch(inputs.step)
            hyper, val_loss = self.hypergradient(self._batch[1], state, z_t, y, val_x, val_y)
            self._adam(hyper)
            values["tgeo_hyper_val_loss"] = val_loss
        alpha = self.alpha(state).detach()
        if inputs.index is not None and self.training:
            with torch.no_grad():
                self.epoch_alpha[inputs.index] = alpha
                self.epoch_teacher_right[inputs.index] = (z_t.argmax(1) == y).float()
        values["tgeo_alpha_batch_mean"] = alpha.mean()
        self._step_values = values
        kl, ce = per_sample_terms(inputs.student_logits, z_t, y, self.temperature)
        return {"fused": self.weight * fused_loss(alpha, kl, ce)}

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        return dict(self._step_values)

    @torch.no_grad()
    def on_epoch_end(self, run: PhaseRun, precision: Precision) -> dict[str, Any]:
        """The distribution of α over the epoch's training samples; the next epoch's virtual learning rate."""
        self.virtual_lr.fill_(run.optimizer.param_groups[0]["lr"])  # the scheduler has stepped: next epoch's lr
        seen = ~torch.isnan(self.epoch_alpha)
        alpha, right = self.epoch_alpha[seen], self.epoch_teacher_right[seen] > 0.5
        out: dict[str, Any] = {}
        if len(alpha):
            out.update({"tgeo_alpha_mean": float(alpha.mean()), "tgeo_alpha_std": float(alpha.std(unbiased=False)),
                        "tgeo_alpha_min": float(alpha.min()), "tgeo_alpha_max": float(alpha.max())})
            qs = torch.quantile(alpha, torch.tensor(QUANTILES, device=alpha.device))
            out.update({f"tgeo_alpha_p{round(100 * q)}": float(v) for q, v in zip(QUANTILES, qs)})
            for name, mask in (("teacher_right", right), ("teacher_wrong", ~right)):
                if mask.any():
                    out[f"tgeo_alpha_mean_{name}"] = float(alpha[mask].mean())
        self.epoch_alpha.fill_(float("nan"))
        self.epoch_teacher_right.zero_()
        return out
