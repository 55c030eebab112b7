"""Benchmark: all-pairs minibatch CKA (kd_core.analysis.cka_matrix) vs a straightforward per-pair loop.

Models: torchvision ResNet-18 (teacher side) and ResNet-34 (student side), random weights, 32×32 inputs,
10 tapped layers each (100 layer pairs). Data: random images (values do not change the cost).

* ``ours``: ``cka_matrix(r18, r34, data, ..., batch_size=250)`` -- one pass, both models hooked once,
  per batch one U-centered Gram per layer and one GEMM for all pairs (minibatch debiased linear CKA).
* ``naive_gram``: extract all features first (float32, CPU), then a Python double loop over layer pairs
  calling full-data debiased linear CKA in the Gram form of the google-research notebook
  (``cka(gram_linear(x), gram_linear(y), debiased=True)``, NumPy float64) -- Grams recomputed per pair,
  as in torch_cka-style code.
* ``forward_only``: both models over the data without hooks -- the floor every method pays.
* ``naive_feature``: the same loop with the feature-space form (``feature_space_linear_cka``), which is the
  fast per-pair choice when the widths are below n (mean-pooled features).

Each run happens in a fresh subprocess; peak memory = ``ru_maxrss`` minus the RSS after models and data
were built. The per-pair loops stop after ``--cap`` seconds and extrapolate (marked ``capped``).

Usage: ``.venv/bin/python bench/cka.py [--n 2000 10000] [--pooling mean] [--cap 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

R18_LAYERS = ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
              "layer4.1", "fc:input"]  # fmt: skip
R34_LAYERS = ["conv1", "layer1.0", "layer1.2", "layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5",
              "layer4.1", "fc:input"]  # fmt: skip
BATCH = 250


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the straightforward per-pair implementation (google-research Demo.ipynb, NumPy) ---------------------


def gram_linear(x: np.ndarray) -> np.ndarray:
    return x.dot(x.T)


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    gram_x = center_gram(gram_x, unbiased=debiased)
    gram_y = center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return float(scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y)))


def feature_space_linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x = x - np.mean(x, 0, keepdims=True)
    y = y - np.mean(y, 0, keepdims=True)
    dot = np.linalg.norm(x.T.dot(y)) ** 2
    nx = np.linalg.norm(x.T.dot(x))
    ny = np.linalg.norm(y.T.dot(y))
    if debiased:
        n = x.shape[0]
        rx, ry = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
        sx, sy = rx.sum(), ry.sum()

        def h(xty: float, a: np.ndarray, b: np.ndarray, s1: float, s2: float) -> float:
            return xty - n / (n - 2.0) * a.dot(b) + s1 * s2 / ((n - 1) * (n - 2))

        dot = h(dot, rx, ry, sx, sy)
        nx = np.sqrt(h(nx**2, rx, rx, sx, sx))
        ny = np.sqrt(h(ny**2, ry, ry, sy, sy))
    return float(dot / (nx * ny))


# --- one measured run ---------------------------------------------------------------------------------


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from torchvision.models import resnet18, resnet34

    torch.manual_seed(0)
    return resnet18(num_classes=10).eval(), resnet34(num_classes=10).eval()


def run_one(mode: str, n: int, pooling: str, cap: float) -> dict[str, object]:
    from kd_core.analysis import cka_matrix, extract_features

    t_model, s_model = _models()
    data = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = _rss_mb()
    out: dict[str, object] = {"mode": mode, "n": n, "pooling": pooling, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if mode == "forward_only":  # the floor every method pays: both models over the data, no hooks
        with torch.no_grad():
            for start in range(0, n, BATCH):
                t_model(data[start : start + BATCH])
                s_model(data[start : start + BATCH])
    elif mode == "ours":
        res = cka_matrix(t_model, s_model, data, R18_LAYERS, R34_LAYERS, batch_size=BATCH, pooling=pooling)
        out["matrix"] = res.matrix.tolist()
        out["n_used"] = res.n
    else:
        ft = extract_features(t_model, data, R18_LAYERS, batch_size=BATCH, pooling=pooling)  # type: ignore[arg-type]
        fs = extract_features(s_model, data, R34_LAYERS, batch_size=BATCH, pooling=pooling)  # type: ignore[arg-type]
        t_feat = time.perf_counter() - t0
        out["feature_s"] = t_feat
        xs = [ft[k].double().numpy() for k in R18_LAYERS]
        ys = [fs[k].double().numpy() for k in R34_LAYERS]
        pairs = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
        mat = np.full((len(xs), len(ys)), np.nan)
        t1 = time.perf_counter()
        done = 0
        for i, j in pairs:  # the double loop over layer pairs
            if mode == "naive_gram":
                mat[i, j] = cka(gram_linear(xs[i]), gram_linear(ys[j]), debiased=True)
            else:
                mat[i, j] = feature_space_linear_cka(xs[i], ys[j], debiased=True)
            done += 1
            if time.perf_counter() - t1 > cap:
                break
        loop = time.perf_counter() - t1
        out["pairs_done"] = done
        out["pairs_total"] = len(pairs)
        out["capped"] = done < len(pairs)
        out["loop_s"] = loop
        if done < len(pairs):
            loop = loop / done * len(pairs)  # extrapolated
        out["matrix"] = mat.tolist()
        out["n_used"] = n
        out["total_s_est"] = t_feat + loop
    out["total_s"] = time.perf_counter() - t0
    out.setdefault("total_s_est", out["total_s"])
    out["peak_mb_over_base"] = _peak_mb() - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--pooling", default="mean", choices=["mean", "flatten"])
    ap.add_argument("--modes", nargs="+", default=["forward_only", "ours", "naive_feature", "naive_gram"])
    ap.add_argument("--cap", type=float, default=300.0, help="seconds per per-pair loop before extrapolating")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "N", "POOLING"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.one[2], args.cap)))
        return

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    print(f"ResNet-18 ({len(R18_LAYERS)} layers) vs ResNet-34 ({len(R34_LAYERS)} layers), 32x32, "
          f"pooling={args.pooling}, batch {BATCH}")  # fmt: skip
    results = []
    for n in args.n:
        runs: dict[str, dict[str, object]] = OrderedDict()
        for mode in args.modes:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", mode, str(n), args.pooling, "--cap", str(args.cap)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"  {mode} n={n} failed:\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode] = r
            extra = ""
            if "feature_s" in r:
                extra = f" (features {r['feature_s']:.1f}s, pair loop {r['loop_s']:.1f}s, " \
                        f"{r['pairs_done']}/{r['pairs_total']} pairs{', CAPPED -> extrapolated' if r['capped'] else ''})"  # fmt: skip
            print(f"n={n:6d} {mode:14s} time {r['total_s_est']:8.1f}s  peak +{r['peak_mb_over_base']:7.0f} MB{extra}")
        if "ours" in runs and "forward_only" in runs:
            fwd = float(runs["forward_only"]["total_s"])
            over = {m: float(r["total_s_est"]) - fwd for m, r in runs.items() if m != "forward_only"}
            print("         time above the bare forward passes: "
                  + ", ".join(f"{m} {v:.1f}s" for m, v in over.items()))  # fmt: skip
        if "ours" in runs:
            ours = runs["ours"]
            mo = np.array(ours["matrix"])
            for mode, r in runs.items():
                if mode in ("ours", "forward_only"):
                    continue
                mm = np.array(r["matrix"])
                diff = np.nanmax(np.abs(mm - mo))
                print(f"         speed-up ours vs {mode}: {float(r['total_s_est']) / float(ours['total_s']):.1f}x; "
                      f"memory ratio {float(r['peak_mb_over_base']) / max(1.0, float(ours['peak_mb_over_base'])):.1f}x; "
                      f"max |CKA diff| (minibatch vs full-data debiased) {diff:.4f}")  # fmt: skip
        results.append(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
