"""Benchmark: all-pairs debiased linear CKA from stored features, kd_core vs pytorch-cka.

Features: 8 "teacher" and 8 "student" layers of widths 10, 32, 64, 128, 256, 512 (mean-pooled 4×4 maps
or logits), 1024 and 2048 (flattened 64×4×4 and 128×4×4 maps), float32 as ``extract_features`` returns
them, post-ReLU with random weights over a latent that the two sides partly share (so the 64 CKA values
spread over (0, 1) and pytorch-cka's clamp to [0, 1] never bites).

Per n it times, best of k with the repeats interleaved (a shared machine disturbs each call differently):

* ``ours auto``: ``cka_matrix_from_features(xs, ys, debiased=True)``, the method its cost model picks;
  ``ours gram`` / ``ours feature``: the same with the path forced;
* ``peer f64``: pytorch-cka's ``cka_from_features(xs, ys)`` (all pairs, debiased HSIC_1) on float64 copies
  of the features -- the precision at which values can agree to 1e-6, the target of issue 14;
* ``peer f32``: the same on the float32 features (its speed with model features as they come; it forms
  uncentred Grams in float32, so its values miss the float64 ones by 1e-3..1e-2 on post-ReLU features).

The peer holds every layer's n×n Gram at once (peak about ``(Lx + 2·Ly)·n²`` floats); it is only run when
that fits in half the available memory, else its time is extrapolated from the largest n it ran at (its
cost is proportional to n² at fixed widths) and marked ``~``. "max abs diff" compares ours (``auto``)
with the peer in float64, ours clipped to [0, 1] as the peer clips. ``--model-check`` prints the cost
model of ``auto`` next to the measured times of both paths on three width sets, around the predicted
crossover. On a machine busy with other work, ``--threads 1 --clock cpu`` gives steadier ratios.

Threads matter: with torch on one thread our Grams are OpenBLAS syrk (one triangle); on several threads they
are ``torch.mm`` in torch's own pool, as the peer's are (``kd_core.analysis.blas.usable`` says why), so the
peer gains more from a second core than we do. Run both: the default (torch's thread count) and ``--threads 1``.

Usage: ``.venv/bin/python bench/cka.py [--quick] [--n 256 512 ...] [--repeats 5] [--model-check]
[--threads 1 --clock cpu]`` (pytorch-cka comes from ``requirements-bench.txt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# pytorch-cka's package is named ``cka``, which this script's own folder would shadow
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from kd_core.analysis.cka import cka_matrix_from_features  # noqa: E402
from kd_core.analysis.cka_linear import (  # noqa: E402
    F32_MIN_N,
    choose_method,
    feature_path_cost,
    gram_path_cost,
)

try:
    from cka import cka_from_features as peer_cka  # pytorch-cka
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("pytorch-cka is missing: .venv/bin/pip install -r requirements-bench.txt")

# (channels, spatial side, pooling) per layer; widths 10, 32, ..., 512 mean-pooled, 1024 and 2048 flattened
LAYERS = [(10, 1, "flatten"), (32, 4, "mean"), (64, 4, "mean"), (128, 4, "mean"), (256, 4, "mean"),
          (512, 4, "mean"), (64, 4, "flatten"), (128, 4, "flatten")]  # fmt: skip
LATENT = 64
FULL_N = [256, 512, 1000, 2000, 5000, 10000]
QUICK_N = [256, 512, 1000]


def features(
    n: int, latent: torch.Tensor, seed: int, layers: Sequence[tuple[int, int, str]] = LAYERS
) -> list[torch.Tensor]:
    """One side's pooled layer features [n, width] (float32) computed from a latent code [n, LATENT]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for channels, side, pooling in layers:
        w = torch.randn(LATENT, channels * side * side, generator=g) / LATENT**0.5
        maps = (latent @ w + 0.5 * torch.randn(n, channels * side * side, generator=g)).relu_()
        maps = maps.view(n, channels, side, side)
        out.append(maps.mean(dim=(2, 3)) if pooling == "mean" else maps.flatten(1))
    return out


def teacher_student(
    n: int, layers: Sequence[tuple[int, int, str]] = LAYERS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, LATENT, generator=g)
    shared = torch.cat([z[:, : LATENT // 2], torch.randn(n, LATENT // 2, generator=g)], dim=1)
    return features(n, z, 1, layers), features(n, shared, 2, layers)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peer_peak_bytes(n: int, lx: int, ly: int, itemsize: int) -> int:
    """pytorch-cka 1.1.3: Gram list + stacked copy of one side while the other side's stack is held."""
    return (lx + 2 * ly) * n * n * itemsize


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_of(
    fns: dict[str, Callable[[], object]], k: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[float, object]]:
    """Best time of each function over k interleaved rounds after one untimed warm-up round (thread
    pools, allocator), with its last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {name: fn() for name, fn in fns.items()}
    for _ in range(k):
        for name, fn in fns.items():
            t0 = clock()
            results[name] = fn()
            times[name].append(clock() - t0)
    return {name: (min(ts), results[name]) for name, ts in times.items()}


def _as_np(m: object) -> np.ndarray:
    return m.double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)


def _fmt(seconds: float | None, estimated: bool = False) -> str:
    if seconds is None:
        return "-"
    return ("~" if estimated else "") + (f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s")


def main_table(ns: Sequence[int], repeats: int | None, paths: Sequence[str], clock: str) -> None:
    widths = [c * s * s if p == "flatten" else c for c, s, p in LAYERS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time, load average "
          f"{os.getloadavg()[0]:.1f}; layers {widths} on each side (8×8 pairs), float32 features; best of k "
          "interleaved\n")  # fmt: skip
    print("| n | auto picks | ours auto | ours gram | ours feature | peer f64 | peer f32 | f64 peer / ours | "
          "f32 peer / ours | max abs diff (vs peer f64) | peer f32 error |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    last_peer: tuple[int, float] | None = None
    for n in ns:
        xs, ys = teacher_student(n)
        k = repeats or (5 if n <= 2000 else 3)
        fns: dict[str, Callable[[], object]] = {
            p: (lambda p=p: cka_matrix_from_features(xs, ys, debiased=True, method=p)) for p in paths
        }
        avail = mem_available()
        run64 = peer_peak_bytes(n, len(xs), len(ys), 8) < avail / 2
        if run64:
            x64, y64 = [x.double() for x in xs], [y.double() for y in ys]
            fns["peer64"] = lambda: peer_cka(x64, y64)
        if peer_peak_bytes(n, len(xs), len(ys), 4) < avail / 2:
            fns["peer32"] = lambda: peer_cka(xs, ys)
        res = best_of(fns, k, CLOCKS[clock])
        t = {name: v[0] for name, v in res.items()}
        est = False
        if run64:
            last_peer = (n, t["peer64"])
            peer = _as_np(res["peer64"][1])
            diff = f"{np.abs(np.clip(_as_np(res['auto'][1]), 0, 1) - peer).max():.1e}" if "auto" in res else "-"
            err32 = f"{np.abs(_as_np(res['peer32'][1]) - peer).max():.1e}" if "peer32" in res else "-"
            clamped = int(((_as_np(res["auto"][1]) < 0) | (_as_np(res["auto"][1]) > 1)).sum()) if "auto" in res else 0
            if clamped:
                diff += f" ({clamped} clamped)"
        else:
            diff = err32 = "-"
            if last_peer is not None:  # cost ∝ n² at fixed widths (Grams, their products and sums)
                t["peer64"] = last_peer[1] * (n / last_peer[0]) ** 2
                est = True
        picks = choose_method(n, [x.shape[1] for x in xs], [y.shape[1] for y in ys])
        ours = t.get("auto")
        ratio64 = f"{t['peer64'] / ours:.1f}×" if ours and "peer64" in t else "-"
        ratio32 = f"{t['peer32'] / ours:.1f}×" if ours and "peer32" in t else "-"
        print(f"| {n} | {picks} | {_fmt(ours)} | {_fmt(t.get('gram'))} | {_fmt(t.get('feature'))} | "
              f"{_fmt(t.get('peer64'), est)} | {_fmt(t.get('peer32'))} | {ratio64} | {ratio32} | {diff} | {err32} |",
              flush=True)  # fmt: skip


# width sets for the cost-model check: both sides get the same widths
MODEL_SETS = {
    "10..2048": [10, 32, 64, 128, 256, 512, 1024, 2048],
    "10..512": [10, 16, 32, 64, 128, 256, 384, 512],
    "10..128": [10, 16, 24, 32, 48, 64, 96, 128],
}


def crossover(widths: Sequence[int]) -> int:
    """Smallest n at which the cost model switches from the gram to the feature path (bisection)."""
    lo, hi = F32_MIN_N, 1 << 20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if choose_method(mid, widths, widths) == "gram" else (lo, mid)
    return hi


def model_check(repeats: int | None, max_seconds: float, clock: str) -> None:
    """Modelled gram/feature cost ratio next to the measured time ratio, around each predicted crossover."""
    print("\nCost model of method='auto' (float64-GEMM flops; float32 flops count half) vs measured time:\n")
    print("| widths (8 per side) | predicted crossover n | n | model gram/feature | measured gram/feature | "
          "gram s per Gflop | feature s per Gflop | auto picks the faster |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, widths in MODEL_SETS.items():
        cross = crossover(widths)
        for n in sorted({max(256, cross // 2), cross, 2 * cross}):
            cost_g, cost_f = gram_path_cost(n, widths, widths), feature_path_cost(n, widths, widths)
            if min(cost_g, cost_f) / 1e9 * 0.02 > max_seconds:  # ~50 Gflop/s: skip runs longer than the cap
                continue
            xs, ys = teacher_student(n, [(w, 1, "flatten") for w in widths])
            fns = {p: (lambda p=p: cka_matrix_from_features(xs, ys, method=p)) for p in ("gram", "feature")}
            t = {p: v[0] for p, v in best_of(fns, repeats or 3, CLOCKS[clock]).items()}
            faster = "gram" if t["gram"] < t["feature"] else "feature"
            auto = "gram" if cost_g < cost_f else "feature"
            print(f"| {name} | {cross} | {n} | {cost_g / cost_f:.2f} | {t['gram'] / t['feature']:.2f} | "
                  f"{t['gram'] / cost_g * 1e9:.4f} | {t['feature'] / cost_f * 1e9:.4f} | "
                  f"{'yes' if auto == faster else 'no'} ({auto}) |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", help=f"sample counts (default {FULL_N})")
    ap.add_argument("--quick", action="store_true", help=f"only n in {QUICK_N}")
    ap.add_argument("--repeats", type=int, help="best of k (default 5 up to n=2000, then 3)")
    ap.add_argument("--paths", nargs="+", default=["auto", "gram", "feature"], choices=["auto", "gram", "feature"])
    ap.add_argument("--model-check", action="store_true", help="also check the cost model around its crossovers")
    ap.add_argument("--max-seconds", type=float, default=10.0, help="skip model-check runs predicted longer")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: process CPU time, steadier than wall time on a machine busy with other work "
                         "(with --threads 1; several threads add their spin-waits)")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main_table(args.n or (QUICK_N if args.quick else FULL_N), args.repeats, args.paths, args.clock)
    if args.model_check:
        model_check(args.repeats, args.max_seconds, args.clock)


if __name__ == "__main__":
    main()
