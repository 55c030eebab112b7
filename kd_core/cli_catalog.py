"""``python -m kd_core methods``, ``models`` and ``rank-students``: what there is to choose from (no queue involved)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kd_core.cli_common import command, format_table, open_store


@command("methods", "every method and loss term: what it does, its paper and its parameters with defaults")
def cmd_methods(args: argparse.Namespace) -> int:
    from kd_core.losses import describe_loss, loss_names
    from kd_core.methods import METHODS, describe_method

    def show(info: dict[str, Any]) -> None:
        params = ", ".join(f"{k}={v!r}" for k, v in info["params"].items()) or "no parameters"
        print(f"  {info['name']:<16} {info['summary']}")
        print(f"  {'':<16} {params}" + (f"\n  {'':<16} {info['paper']}" if info.get("paper") else ""))
        if info.get("caveat"):
            print(f"  {'':<16} note: {info['caveat']}")

    print("methods (config key `method: {name: NAME, params: {...}}`; they change the training loop):")
    for name in sorted(METHODS):
        show(describe_method(name))
    print("\nloss terms (config key `recipe: [{loss: NAME, weight: W, params: {...}}]`):")
    for name in loss_names():
        show(describe_loss(name))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default="1x28x28", help="input size as CxHxW (default 1x28x28: mnist5k)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")


@command("models", "every architecture with its parameter count at a given input size", _models_args)
def cmd_models(args: argparse.Namespace) -> int:
    from kd_core.models import MODELS, count_parameters, create_model

    try:
        channels, height, width = (int(v) for v in args.input.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input {args.input!r}: give channels x height x width, e.g. 3x32x32") from None
    if height != width:
        raise ValueError(f"--input {args.input!r}: images are square here; give equal height and width")
    rows = [[name, info.family, f"{count_parameters(create_model(name, args.classes, channels, height)):,}", info.description]
            for name, info in MODELS.items()]
    print(format_table(rows, ["architecture", "family", f"parameters at {args.input}, {args.classes} classes", "description"]))
    return 0


def _rank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file: its teacher and dataset")
    p.add_argument("--candidates", required=True, help="student architectures, comma-separated, e.g. cnn_tiny,lenet5,mlp")
    p.add_argument("--batch-size", type=int, default=64, help="images per scoring batch (default 64, the released code's CIFAR-10 batch)")
    p.add_argument("--repeats", type=int, default=3, help="draws (batch and random weights) averaged (default 3)")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    p.add_argument("--teacher-init", choices=["gaussian", "trained"], default="gaussian",
                   help="gaussian (default): the teacher Gaussian-initialised, as the released DisWOT code; "
                        "trained: the weights teacher.source names (run:<id> or file:<path>)")
    p.add_argument("--by", choices=["score", "relation", "semantic"], default="score",
                   help="order by the DisWOT score (default: relation + semantic, as released) or by one of its parts")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


@command("rank-students", "DisWOT: rank candidate students for a config's teacher and dataset, training-free (nothing is trained)", _rank_args)
def cmd_rank_students(args: argparse.Namespace) -> int:
    from kd_core.config import load_config
    from kd_core.diswot import rank_students
    from kd_core.teachers import TeacherUnavailable, run_teachers_in

    run_teachers = run_teachers_in(open_store(args)) if args.teacher_init == "trained" else None
    config = load_config(args.config, run_teachers=run_teachers)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    try:
        ranking = rank_students(config, candidates, batch_size=args.batch_size, repeats=args.repeats, seed=args.seed,
                                teacher_init=args.teacher_init, by=args.by, device=args.device, run_teachers=run_teachers)
    except TeacherUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(ranking.describe())
    print(ranking.table())
    return 0
