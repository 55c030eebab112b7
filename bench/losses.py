"""Forward+backward time of every registered loss term on CIFAR-like shapes.

Shapes: 100 classes, 256-d embeddings and the three stage maps of a resnet8x4 student / resnet32x4
teacher (64×32×32, 128×16×16, 256×8×8), training-set size 50 000 (CRD's banks). Only the loss term is
timed (the models are not run): inputs are random leaf tensors, the student side requiring grad.

    .venv/bin/python bench/losses.py [--device cuda] [--batches 64 256]

Prints a Markdown table: best-of-N ms per forward+backward (the minimum is the least disturbed by other
processes on a shared machine) and the ratio to ``kd`` in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kd_core.losses import BuildContext, LossInputs, ModelShapes, create_loss, loss_names  # noqa: E402

STAGES = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
NUM_CLASSES, EMBEDDING, NUM_TRAIN = 100, 256, 50_000


def make_context() -> BuildContext:
    shapes = ModelShapes(NUM_CLASSES, EMBEDDING, STAGES)
    return BuildContext(shapes, shapes, NUM_TRAIN, class_means=torch.randn(NUM_CLASSES, EMBEDDING))


def make_inputs(batch: int, device: torch.device) -> LossInputs:
    def student(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, requires_grad=True)

    def teacher(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    return LossInputs(
        student_logits=student(batch, NUM_CLASSES),
        teacher_logits=teacher(batch, NUM_CLASSES),
        target=torch.randint(0, NUM_CLASSES, (batch,), device=device),
        # post-ReLU-like features and embeddings, as the hooks would deliver
        student_embedding=student(batch, EMBEDDING),
        teacher_embedding=teacher(batch, EMBEDDING).relu(),
        student_stages=[student(batch, *s) for s in STAGES],
        teacher_stages=[teacher(batch, *s).relu() for s in STAGES],
        index=torch.randperm(NUM_TRAIN, device=device)[:batch],
        step=10,
        total_steps=1000,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_term(name: str, batch: int, device: torch.device, budget_s: float, max_reps: int) -> float:
    """Best ms of forward+backward over repeated calls (3 warm-up calls not counted)."""
    loss = create_loss(name)
    loss.build(make_context())
    loss.to(device).train()
    inputs = make_inputs(batch, device)
    leaves = [t for t in vars(inputs).values() if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves += inputs.student_stages
    samples: list[float] = []
    started = time.perf_counter()
    for rep in range(max_reps + 3):
        for t in (*leaves, *loss.parameters()):
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss(inputs).backward()
        loss.after_step(1.0)
        _sync(device)
        if rep >= 3:
            samples.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - started > budget_s and len(samples) >= 3:
                break
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per (term, batch) at most")
    parser.add_argument("--max-reps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    names = ["kd", *(n for n in loss_names() if n != "kd")]
    results = {
        (n, b): time_term(n, b, device, args.budget, args.max_reps) for b in args.batches for n in names
    }
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}\n")
    header = " | ".join(f"B={b} ms | B={b} ×kd" for b in args.batches)
    print(f"| term | {header} |")
    print("|---|" + "---:|" * (2 * len(args.batches)))
    for n in names:
        cells = " | ".join(
            f"{results[n, b]:.3f} | {results[n, b] / results['kd', b]:.1f}" for b in args.batches
        )
        print(f"| {n} | {cells} |")


if __name__ == "__main__":
    main()
