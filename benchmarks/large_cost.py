"""Merge cost where reading dominates: K + 1 inputs larger than the machine's memory.

    python benchmarks/large_cost.py [--size 3b] [--rounds 3] [--cache DIR] [--out FILE]

Builds (once, cached) a synthetic Llama family in bfloat16 — a base and K = 4
"fine-tunes" (base + a shared part + noise), sharded at 2 GB — written one
tensor at a time, so building it needs little memory. Then runs `mergekit-yaml`
with task_arithmetic, awd (scope: global) and awd (scope: tensor), alternated
over the rounds, each run starting with the inputs evicted from the page cache
(``posix_fadvise(DONTNEED)`` on every input file; no root needed). Per run: wall
seconds, peak RSS of the mergekit process, and bytes it read from storage
(``read_bytes`` of /proc/self/io, written by a wrapper as the process exits).

Also measured, as the floor of `scope: global` (which reads the selected
tensors twice: the Gram pass, then the merge): the time to read the selected
bytes once cold (``cat``-like sequential reads of the shards, after eviction)
and the time to read them again right after (what the page cache still holds).
The cost model in docs/benchmarks.md is fitted to these numbers.
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

SIZES = {
    # hidden, intermediate, layers, vocab, heads, kv heads
    "3b": (3072, 8192, 24, 32000, 24, 8),
    "1b": (2048, 5632, 16, 32000, 16, 4),
    "100m": (1024, 2816, 7, 4096, 16, 4),
}
SHARD_BYTES = 2 * 2**30


def shapes(size: str):
    """(name, shape, selected) of a Llama of this size, in checkpoint order."""
    h, inter, layers, vocab, heads, kv = SIZES[size]
    head = h // heads
    out = [("model.embed_tokens.weight", (vocab, h), False)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), False),
            (p + "self_attn.q_proj.weight", (h, h), True),
            (p + "self_attn.k_proj.weight", (kv * head, h), True),
            (p + "self_attn.v_proj.weight", (kv * head, h), True),
            (p + "self_attn.o_proj.weight", (h, h), True),
            (p + "post_attention_layernorm.weight", (h,), False),
            (p + "mlp.gate_proj.weight", (inter, h), True),
            (p + "mlp.up_proj.weight", (inter, h), True),
            (p + "mlp.down_proj.weight", (h, inter), True),
        ]
    out += [("model.norm.weight", (h,), False), ("lm_head.weight", (vocab, h), False)]
    return out


def build(root: str, size: str, k: int, shared: float = 0.02, noise: float = 0.01):
    """Base and K fine-tunes, written tensor by tensor into 2 GB shards."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    marker = os.path.join(root, "paths.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    h, inter, layers, vocab, heads, kv = SIZES[size]
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                         vocab_size=vocab, num_attention_heads=heads,
                         num_key_value_heads=kv, torch_dtype="bfloat16",
                         tie_word_embeddings=False, max_position_embeddings=2048,
                         architectures=["LlamaForCausalLM"])
    names = ["base"] + [f"ft{i}" for i in range(k)]
    dirs = {n: os.path.join(root, n) for n in names}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
        config.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, number = {n: {} for n in names}, 0, {}, 0
    plan = shapes(size)

    def flush():
        nonlocal shard, shard_bytes, number
        number += 1
        fname = f"model-{number:05d}.safetensors"
        for n in names:
            save_file(shard[n], os.path.join(dirs[n], fname), metadata={"format": "pt"})
        for t in shard["base"]:
            index[t] = fname
        shard, shard_bytes = {n: {} for n in names}, 0

    for name, shape, _ in plan:
        base = torch.randn(shape, generator=g) * 0.02
        common = torch.randn(shape, generator=g) * 0.02 * shared
        shard["base"][name] = base.to(torch.bfloat16)
        for i in range(k):
            tau = common + torch.randn(shape, generator=g) * 0.02 * noise
            shard[f"ft{i}"][name] = (base + tau).to(torch.bfloat16)
        shard_bytes += base.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard["base"]:
        flush()
    for n in names:  # rename the shards to the "-of-" convention, write the index
        total = number
        mapping = {}
        for i in range(1, total + 1):
            old = os.path.join(dirs[n], f"model-{i:05d}.safetensors")
            new = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(old, os.path.join(dirs[n], new))
            mapping[f"model-{i:05d}.safetensors"] = new
        with open(os.path.join(dirs[n], "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {t: mapping[s] for t, s in index.items()}}, f)
    paths = {"base": dirs["base"], "fts": [dirs[f"ft{i}"] for i in range(k)],
             "selected_params": sum(torch.Size(s).numel() for _, s, sel in plan if sel),
             "params": sum(torch.Size(s).numel() for _, s, _ in plan)}
    with open(marker, "w") as f:
        json.dump(paths, f)
    return paths


def files_of(paths):
    out = []
    for d in [paths["base"], *paths["fts"]]:
        out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    return out


def evict(files):
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files, block=16 * 2**20) -> float:
    start = time.perf_counter()
    buf = bytearray(block)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


WRAPPER = """
import atexit, sys
def _io():
    with open('/proc/self/io') as f:
        sys.stderr.write('AWD_IO ' + f.read().replace('\\n', ' ') + '\\n')
atexit.register(_io)
sys.argv = ['mergekit-yaml'] + sys.argv[1:]
from mergekit.scripts.run_yaml import main
main()
"""


def measure(config, workdir: str, name: str, gram_cache: str, env_extra=None):
    """One mergekit-yaml run; ``gram_cache``: its MERGEKIT_AWD_CACHE."""
    path = os.path.join(workdir, f"{name}.yml")
    out = os.path.join(workdir, f"out-{name}")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = dict(os.environ, MERGEKIT_AWD_CACHE=gram_cache, **(env_extra or {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, path, out, "--quiet",
                             "--no-copy-tokenizer", "--no-write-model-card"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    io = {}
    for line in err.splitlines():
        if line.startswith("AWD_IO "):
            parts = line[len("AWD_IO "):].split()
            io = {parts[i].rstrip(":"): int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    subprocess.run(["rm", "-rf", out])
    return {"wall_s": wall, "rss_gib": usage.ru_maxrss / 2**20,
            "read_gib": io.get("read_bytes", 0) / 2**30}


def recipe(paths, method, **parameters):
    return {"merge_method": method, "base_model": paths["base"],
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths["fts"]],
            "parameters": parameters, "dtype": "bfloat16"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="3b", choices=sorted(SIZES))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "awd-large"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--build-only", action="store_true", help="make the family and stop")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    paths = build(os.path.join(args.cache, f"llama-{args.size}-k{args.k}"), args.size, args.k)
    if args.build_only:
        return
    files = files_of(paths)
    input_gib = sum(os.path.getsize(f) for f in files) / 2**30
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    print(f"# synthetic Llama {args.size}, K={args.k}, bfloat16: {paths['params'] / 1e9:.2f}B "
          f"parameters ({paths['selected_params'] / 1e9:.2f}B selected), inputs "
          f"{input_gib:.1f} GiB on disk, machine memory {mem_gib:.1f} GiB, "
          f"{os.cpu_count()} cores (built/loaded in {time.perf_counter() - start:.0f} s)")
    selected_files = files  # every shard holds selected tensors
    evict(files)
    cold = read_all(selected_files)
    warm = read_all(selected_files)
    evict(files)
    print(f"read every input once, cold: {cold:.1f} s ({input_gib / cold:.2f} GiB/s); "
          f"again right after: {warm:.1f} s")
    awd_global = recipe(paths, "awd", scope="global", steps=1000, **{"lambda": 0.5})
    variants = {
        "task_arithmetic": recipe(paths, "task_arithmetic"),
        "awd_global": awd_global,
        # the same merge after `mergekit-awd report` (or sweep / tune) kept its Gram pass
        "awd_global_kept_gram": awd_global,
        "awd_tensor": recipe(paths, "awd", scope="tensor", steps=1000, **{"lambda": 0.5}),
    }
    env_of = {}  # per variant: extra environment of its mergekit-yaml process
    results = {name: [] for name in variants}
    workdir = os.path.join(args.cache, "work")
    os.makedirs(workdir, exist_ok=True)
    kept = os.path.join(workdir, "gram-kept")
    subprocess.run(["rm", "-rf", kept])
    report = os.path.join(workdir, "report.yml")
    with open(report, "w") as f:
        yaml.safe_dump(awd_global, f)
    t = time.perf_counter()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-awd"), "report",
                    report, "--out", os.path.join(workdir, "report"), "--quiet"], check=True,
                   env=dict(os.environ, MERGEKIT_AWD_CACHE=kept), stdout=subprocess.DEVNULL)
    print(f"mergekit-awd report (keeps the Gram pass): {time.perf_counter() - t:.1f} s")
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            evict(files)
            fresh = os.path.join(workdir, f"gram-fresh-{r}-{name}")  # never a kept pass
            subprocess.run(["rm", "-rf", fresh])  # (nor one an earlier run of this left)
            m = measure(variants[name], workdir, name,
                        kept if name.endswith("_kept_gram") else fresh, env_of.get(name))
            results[name].append(m)
            print(f"round {r + 1} {name}: {m['wall_s']:.1f} s, RSS {m['rss_gib']:.2f} GiB, "
                  f"read {m['read_gib']:.1f} GiB", flush=True)
    print("\n| method | wall s (median) | / TA | peak RSS GiB | read GiB | / TA |")
    print("|---|---:|---:|---:|---:|---:|")
    ta = results["task_arithmetic"]
    for name, runs in results.items():
        ratio = statistics.median(m["wall_s"] / t["wall_s"] for m, t in zip(runs, ta))
        rread = statistics.median(m["read_gib"] / max(t["read_gib"], 1e-9)
                                  for m, t in zip(runs, ta))
        print(f"| {name} | {statistics.median(m['wall_s'] for m in runs):.1f} | {ratio:.2f}x | "
              f"{statistics.median(m['rss_gib'] for m in runs):.2f} | "
              f"{statistics.median(m['read_gib'] for m in runs):.1f} | {rread:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": args.size, "k": args.k, "input_gib": input_gib,
                       "memory_gib": mem_gib, "cold_read_s": cold, "warm_read_s": warm,
                       "params": paths["params"], "selected_params": paths["selected_params"],
                       "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
