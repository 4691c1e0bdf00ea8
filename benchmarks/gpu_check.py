"""CPU vs `--cuda`: the same `awd` merges on both, agreement and times.

    python benchmarks/gpu_check.py [--sizes tiny,100m] [--out docs/gpu_check.md]

For each model (the offline example's tiny Llama family and the synthetic 100M
Llama family of benchmarks/merge_cost.py) and each scope, merges with
`mergekit-yaml` on CPU and with `--cuda`, then checks that the merged deltas
(merged - base) agree to 1e-5 relative per tensor, and prints both wall times
and the card the GPU run used. Meant for a machine with an NVIDIA GPU; it
exits with an error without one.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import reference  # noqa: E402


def families(sizes, cache):
    from mergekit_awd import examples

    if "tiny" in sizes:
        paths = examples.make(os.path.join(cache, "tiny-llama"))
        yield "example tiny Llama (4 fine-tunes)", paths["base"], [
            paths[t] for t in examples.TASKS]
    if "100m" in sizes:
        from merge_cost import family

        p = family(cache, "100m", 4)
        yield "synthetic 100M Llama (K=4)", p["base"], p["fts"]


def merge(base, fts, out, scope, *options):
    config = {"merge_method": "awd", "base_model": base, "dtype": "float32",
              "models": [{"model": m} for m in fts], "parameters": {"scope": scope}}
    path = out + ".yml"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    start = time.perf_counter()
    subprocess.run([exe, path, out, "--quiet", "--no-copy-tokenizer", *options], check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "awd-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to check")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}\n")
    print("| model | scope | CPU s | --cuda s | max relative difference of merged deltas | ok |")
    print("|---|---|---:|---:|---:|---|")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, base, fts in families(args.sizes.split(","), args.cache):
            base_state = reference.load(base)
            for scope in ("global", "tensor"):
                cpu_out, gpu_out = (os.path.join(tmp, f"{scope}-{d}") for d in ("cpu", "gpu"))
                t_cpu = merge(base, fts, cpu_out, scope)
                t_gpu = merge(base, fts, gpu_out, scope, "--cuda")
                a, b = reference.load(cpu_out), reference.load(gpu_out)
                worst = max(
                    float((a[k].double() - b[k].double()).norm()
                          / (a[k].double() - base_state[k].double()).norm().clamp_min(1e-30))
                    for k in a
                )
                ok &= worst <= 1e-5
                print(f"| {label} | {scope} | {t_cpu:.1f} | {t_gpu:.1f} | {worst:.2e} | "
                      f"{'yes' if worst <= 1e-5 else 'NO'} |")
                for d in (cpu_out, gpu_out):
                    subprocess.run(["rm", "-rf", d])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
