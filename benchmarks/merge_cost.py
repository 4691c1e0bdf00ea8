"""Cost of `awd` vs mergekit's `task_arithmetic`, side by side in one run.

    python benchmarks/merge_cost.py [--size 100m] [--rounds 3] [--cache DIR]

Builds (once, cached) a synthetic Llama family: a base and K=4 perturbed
"fine-tunes" in float32, then runs `mergekit-yaml` alternately with
task_arithmetic, awd scope global and awd scope tensor (1000 sgd steps each),
measuring each run's wall time and peak RSS (the child's own ru_maxrss), and
prints the median ratio to task_arithmetic of the same round. Then the solver
alone: 1000 Gram-space steps vs the naive full-space autograd implementation
on the same task vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SIZES = {
    # hidden, intermediate, layers, vocab -> about this many parameters
    "25m": (512, 1408, 7, 4096),
    "100m": (1024, 2816, 7, 4096),
    "400m": (2048, 5632, 7, 8192),
}


def family(cache: str, size: str, k: int, shard: str = None):
    from synthetic import make_family, tiny_llama_config

    hidden, inter, layers, vocab = SIZES[size]
    root = os.path.join(cache, f"llama-{size}-k{k}" + (f"-shard{shard}" if shard else ""))
    marker = os.path.join(root, "paths.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    config = tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        vocab_size=vocab,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
    )
    paths = make_family(root, config=config, n_models=k, shared=0.02, noise=0.01,
                        max_shard_size=shard)
    with open(marker, "w") as f:
        json.dump(paths, f)
    return paths


def recipe(paths, method, per_model=None, **parameters):
    config = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [{"model": p, "parameters": {"weight": 1.0, **(per_model or {})}}
                   for p in paths["fts"]],
        "parameters": parameters,
        "dtype": "float32",
    }
    return config


def measure(config, workdir: str, name: str, pythonpath: str = None):
    """Wall seconds and peak RSS (MiB) of one `mergekit-yaml` run (``pythonpath``: the
    mergekit_awd to import, e.g. a checkout of an earlier commit)."""
    path = os.path.join(workdir, f"{name}.yml")
    out = os.path.join(workdir, f"out-{name}")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    start = time.perf_counter()
    # every run pays its own Gram pass (a kept one would make `global` a kept-pass run)
    env = dict(os.environ, MERGEKIT_AWD_CACHE="off")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [exe, path, out, "--quiet", "--no-copy-tokenizer", "--no-write-model-card"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def merge_cost(paths, rounds: int, ties: bool = False, before: str = None):
    variants = {
        "task_arithmetic": recipe(paths, "task_arithmetic"),
        **({"ties": recipe(paths, "ties", {"density": 0.2})} if ties else {}),
        "awd_global": recipe(paths, "awd", steps=1000, scope="global"),
        "awd_tensor": recipe(paths, "awd", steps=1000, scope="tensor"),
    }
    code = {}
    if before:
        for name in ("awd_global", "awd_tensor"):
            variants[f"{name} (before)"] = variants[name]
            code[f"{name} (before)"] = before
    results = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as workdir:
        measure(variants["task_arithmetic"], workdir, "warmup")  # page cache
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                results[name].append(measure(variants[name], workdir, name.replace(" ", "_"),
                                             code.get(name)))
    rows = []
    for name, runs in results.items():
        ratios_t = [w / results["task_arithmetic"][i][0] for i, (w, _) in enumerate(runs)]
        ratios_m = [m / results["task_arithmetic"][i][1] for i, (_, m) in enumerate(runs)]
        rows.append(
            (
                name,
                statistics.median(w for w, _ in runs),
                statistics.median(m for _, m in runs),
                statistics.median(ratios_t),
                statistics.median(ratios_m),
            )
        )
    return rows


def solver_cost(paths, naive_steps: int, small: int):
    """1000 Gram-space steps vs naive full-space autograd, on the same task vectors."""
    from safetensors.torch import load_file

    from mergekit_awd import solver

    import reference

    base = load_file(os.path.join(paths["base"], "model.safetensors"))
    fts = [load_file(os.path.join(p, "model.safetensors")) for p in paths["fts"]]
    names = [n for n, t in base.items() if reference.paper_selected(n, t)]
    T = torch.stack(
        [torch.cat([(ft[n] - base[n]).reshape(-1) for n in names]) for ft in fts]
    )
    del base, fts
    out = {"P_full": T.shape[1]}

    def gram_solve(X):
        start = time.perf_counter()
        G = solver.gram(X).numpy()
        a, b = solver.raw_hyperparameters(0.01, 0.02, units="relative", optimizer="sgd",
                                          s=solver.scale_of(G), numel=X.shape[1])
        solver.sgd_gram(G, a, b, 1000)
        return time.perf_counter() - start

    def naive(X, steps):
        start = time.perf_counter()
        reference.solve_delta(X.double(), 0.01, 0.02, steps)
        return time.perf_counter() - start

    # exact ratio, both 1000 steps, on a slice small enough for the naive solver
    X = T[:, :small].contiguous()
    out["small_P"] = small
    out["small_gram_s"] = gram_solve(X)
    out["small_naive_s"] = naive(X, 1000)
    # the whole selected model: Gram-space 1000 steps measured, naive per-step measured
    out["full_gram_s"] = gram_solve(T)
    out["full_naive_steps"] = naive_steps
    out["full_naive_s"] = naive(T, naive_steps)
    out["full_naive_1000_est_s"] = out["full_naive_s"] * 1000 / naive_steps
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="100m", choices=sorted(SIZES))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-steps", type=int, default=10)
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "awd-bench"))
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-solver", action="store_true")
    parser.add_argument("--ties", action="store_true", help="also time mergekit's ties")
    parser.add_argument("--shard", default=None, help="max shard size of the inputs, e.g. 500MB")
    parser.add_argument("--before", default=None,
                        help="a checkout of an earlier mergekit-awd: its awd runs side by side")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)

    paths = family(args.cache, args.size, args.k, args.shard)
    shards = len([f for f in os.listdir(paths["base"]) if f.endswith(".safetensors")])
    print(f"# synthetic Llama {args.size}, K={args.k}, float32, {shards} shard(s) per model, "
          f"{os.cpu_count()} CPU cores")
    if not args.skip_merge:
        print(f"\n## mergekit-yaml, {args.rounds} alternating rounds (medians)\n")
        print("| method | wall s | peak RSS MiB | wall / TA | RSS / TA |")
        print("|---|---:|---:|---:|---:|")
        for name, wall, rss, rt, rm in merge_cost(paths, args.rounds, args.ties, args.before):
            print(f"| {name} | {wall:.2f} | {rss:.0f} | {rt:.2f}x | {rm:.2f}x |")
    if args.skip_solver:
        return
    s = solver_cost(paths, args.naive_steps, args.small)
    print("\n## solver alone, 1000 steps (K=%d)\n" % args.k)
    print("| task vectors | Gram-space (incl. Gram pass) s | naive full-space autograd s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| {s['small_P']:,} params (both measured) | {s['small_gram_s']:.3f} | "
          f"{s['small_naive_s']:.1f} | {s['small_naive_s'] / s['small_gram_s']:.0f}x |")
    print(f"| {s['P_full']:,} params (naive: {s['full_naive_steps']} steps measured, x{1000 // s['full_naive_steps']}) | "
          f"{s['full_gram_s']:.2f} | {s['full_naive_1000_est_s']:.0f} | "
          f"{s['full_naive_1000_est_s'] / s['full_gram_s']:.0f}x |")


if __name__ == "__main__":
    main()
