"""The per-tensor solve alone (what `scope: tensor` adds per selected tensor).

    python benchmarks/solve_cost.py [--rounds 7]

1000 plain-GD steps of Algorithm 1 in the K x K Gram space, K = 2..16, on the
Gram matrix of correlated synthetic task vectors: the numpy step (the only one
before) against the unrolled straight-line Python step used for K <= solver.UNROLLED_MAX_K,
alternated, median milliseconds per solve, and the largest difference in w.
"""

import argparse
import statistics
import time

import numpy as np

from mergekit_awd import solver


def gram(K: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(K, 20_000)) + 0.6 * rng.normal(size=(1, 20_000))
    return T @ T.T


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print("| K | numpy step ms / solve | unrolled step ms / solve | speed-up | max abs diff in w |")
    print("|---:|---:|---:|---:|---:|")
    for K in (2, 3, 4, 6, 8, 12, 16):
        G = gram(K)
        alpha, lr = solver.raw_hyperparameters(0.001, 0.005, units="relative", optimizer="sgd",
                                               s=solver.scale_of(G), numel=20_000)
        M = solver.pair_weights(solver.active_tasks(G))
        times = {"numpy": [], "unrolled": []}
        runs = {"numpy": solver._steps_numpy, "unrolled": solver._steps_unrolled}
        for r in range(args.rounds):
            for name in (("numpy", "unrolled") if r % 2 == 0 else ("unrolled", "numpy")):
                start = time.perf_counter()
                w, _ = runs[name](G, M, alpha, lr, args.steps)
                times[name].append(time.perf_counter() - start)
                runs[name + "_w"] = w
        a, b = statistics.median(times["numpy"]), statistics.median(times["unrolled"])
        diff = float(np.abs(runs["numpy_w"] - runs["unrolled_w"]).max())
        used = "unrolled" if K <= solver.UNROLLED_MAX_K else "numpy"
        print(f"| {K} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x (uses {used}) | {diff:.1e} |")


if __name__ == "__main__":
    main()
