"""Solver alone on real task vectors: Gram-space Algorithm 1 vs naive full-space autograd.

    python benchmarks/solver_minilm.py [--work DIR] [--naive-steps 5]

Uses the eight MiniLM fine-tunes of the quality benchmark (regime given by
--regime) and the selected linear-layer weights, K = 8. Gram space: the Gram
pass plus 1000 steps, measured. Naive: a few steps measured (time and peak
memory growth) and scaled to 1000.
"""

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import reference  # noqa: E402

from mergekit_awd import solver  # noqa: E402


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "awd-quality"))
    parser.add_argument("--regime", default="correlated")
    parser.add_argument("--naive-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = reference.load(os.path.join(args.work, "base"))
    root = os.path.join(args.work, f"ft-{args.regime}")
    fts = [reference.load(os.path.join(root, t)) for t in sorted(os.listdir(root))]
    names = [k for k in base if reference.paper_selected(k.replace("encoder.layer.", ".layers."), base[k])]
    T = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in names]) for ft in fts])
    del fts
    K, P = T.shape
    before = rss_mib()
    start = time.perf_counter()
    G = solver.gram(T).numpy()
    a, b = solver.raw_hyperparameters(0.01, 0.005, units="relative", optimizer="sgd",
                                      s=solver.scale_of(G), numel=P)
    solver.sgd_gram(G, a, b, 1000)
    gram_s = time.perf_counter() - start
    gram_mem = rss_mib() - before
    start = time.perf_counter()
    reference.solve_delta(T.double(), 0.01, 0.005, args.naive_steps)
    naive_s = (time.perf_counter() - start) * 1000 / args.naive_steps
    naive_mem = rss_mib() - before
    print(f"| MiniLM-L6 task vectors ({args.regime}), K={K}, {P:,} selected params | "
          f"{gram_s:.2f} s, +{gram_mem:.0f} MiB | {naive_s:.0f} s (scaled from {args.naive_steps} steps), "
          f"+{naive_mem:.0f} MiB | {naive_s / gram_s:.0f}x |")


if __name__ == "__main__":
    main()
