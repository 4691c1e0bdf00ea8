"""Forming cost of the data-free rules (tsv, iso_c, iso_cts, wudi) against task arithmetic,
per weight matrix, side by side in one run, and whole models by sum over their matrices.

    python benchmarks/data_free_cost.py [--sizes 135m,1b,7b,70b] [--wudi-steps 5] [--device cpu]

For every distinct matrix shape of a model (T = 4 task vectors of random float32
entries), times each rule's kernel (``spectral``; WUDI for --wudi-steps steps, then
per step times its published 300) and task arithmetic's sum, and multiplies by how
often the shape occurs. WUDI's cost is the same at every step (one x A product and
Adam's update), so a few steps measure it (30 on the small shapes); an SVD's cost does
not depend on the values. Every kernel runs once before anything is timed, and a small
shape's time is the best of 3. Shapes too large to time here (--max-elements) are left
out and said so.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mergekit_awd import spectral

# (rows, cols) -> count per model: Llama-style layouts (q/o, k/v, gate/up, down, embed
# and head untied unless said)
MODELS = {
    "135m": {"layers": 30, "h": 576, "kv": 192, "ff": 1536, "vocab": 49152, "tied": True},
    "1b": {"layers": 16, "h": 2048, "kv": 512, "ff": 8192, "vocab": 128256, "tied": True},
    "7b": {"layers": 32, "h": 4096, "kv": 4096, "ff": 11008, "vocab": 32000, "tied": False},
    "70b": {"layers": 80, "h": 8192, "kv": 1024, "ff": 28672, "vocab": 128256, "tied": False},
}
STEPS = 300


def shapes(m: dict) -> dict:
    L, h, kv, ff, V = m["layers"], m["h"], m["kv"], m["ff"], m["vocab"]
    out = {}
    for shape, count in (((h, h), 2 * L), ((kv, h), 2 * L), ((ff, h), 2 * L), ((h, ff), L),
                         ((V, h), 1 if m["tied"] else 2)):
        out[shape] = out.get(shape, 0) + count  # q/o and k/v are one shape where kv = h
    return out


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matrix_seconds(shape, T: int, wudi_steps: int, device: str) -> dict:
    taus = torch.randn(T, *shape, device=device) * 1e-3
    small = taus.numel() <= 2e7  # best of 3, and WUDI's steps long enough to dwarf its setup
    repeat, wudi_steps = (3, max(wudi_steps, 30)) if small else (1, wudi_steps)
    out = {"task_arithmetic": _time(lambda: taus.sum(dim=0), repeat)}
    out["tsv"] = _time(lambda: spectral.tsv_m(taus), repeat)
    out["iso_c"] = _time(lambda: spectral.iso_c(taus), repeat)
    out["iso_cts"] = _time(lambda: spectral.iso_cts(taus, 0.8), repeat)
    setup = _time(lambda: spectral.wudi_terms(taus), repeat)
    steps = _time(lambda: spectral.wudi(taus, wudi_steps, 1e-5), repeat) - setup
    out["wudi"] = setup + max(steps, 0.0) / wudi_steps * STEPS
    return out


def warm_up(device: str) -> None:
    """Each kernel once on a small matrix before anything is timed: the first call of
    torch.optim.Adam and of the LAPACK routines costs about a second once, which the
    scaling of WUDI's few steps to 300 multiplied by 60 (an earlier run of this script
    gave the first shape, 576 x 576, 69 s of WUDI instead of ~1.5 s)."""
    matrix_seconds((64, 48), 4, 2, device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="135m,1b")
    parser.add_argument("--wudi-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-elements", type=float, default=3e8,
                        help="largest T x rows x cols timed")
    parser.add_argument("--json")
    args = parser.parse_args()
    T, results = 4, {}
    warm_up(args.device)
    for size in args.sizes.split(","):
        total, skipped = {}, []
        for shape, count in shapes(MODELS[size]).items():
            if T * shape[0] * shape[1] > args.max_elements:
                skipped.append(shape)
                continue
            sec = matrix_seconds(shape, T, args.wudi_steps, args.device)
            print(f"{size} {shape[0]}x{shape[1]} x{count}: " + ", ".join(
                f"{k} {v:.3f} s" for k, v in sec.items()), flush=True)
            for k, v in sec.items():
                total[k] = total.get(k, 0.0) + count * v
        ta = total.get("task_arithmetic", 0.0)
        line = ", ".join(f"{k} {v:.1f} s ({v / ta:.0f}x)" for k, v in total.items()
                         if k != "task_arithmetic")
        print(f"{size} on {args.device}, matrices only, T = {T}: task arithmetic's sum "
              f"{ta:.2f} s; {line}" + (f"; not timed: {skipped}" if skipped else ""),
              flush=True)
        results[size] = {"seconds": total, "skipped": [list(s) for s in skipped]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
