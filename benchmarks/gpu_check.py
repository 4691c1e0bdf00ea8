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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "example_configs"))

import reference  # noqa: E402


def families(sizes, cache):
    import examples

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
    if "tiny" in args.sizes.split(","):
        ok &= tune_check(args.cache)
    sys.exit(0 if ok else 1)


def tune_check(cache) -> bool:
    """`mergekit-awd tune` on CPU and with --cuda: the same table and the same choice."""
    import json

    import examples

    paths = examples.make(os.path.join(cache, "tiny-llama"))
    data = examples.write_data(os.path.join(cache, "tiny-data"), n=100)
    recipe = os.path.join(cache, "tune.yml")
    with open(recipe, "w") as f:
        yaml.safe_dump({"merge_method": "awd", "base_model": paths["base"], "dtype": "float32",
                        "models": [{"model": paths[t]} for t in examples.TASKS],
                        "parameters": {"alpha": 0.01}}, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-awd")
    tables, times = [], []
    for extra in ([], ["--cuda"]):
        out = os.path.join(cache, "tune-" + ("gpu" if extra else "cpu"))
        args = [exe, "tune", recipe, "--out", out, "--quiet", "--methods", "awd,ties",
                "--lambda", "0.3,0.5,0.7", "--keep-delta", "0,1", *extra]
        for t in examples.TASKS:
            args += ["--data", f"{t}={data[t + '.val']}"]
        start = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        with open(os.path.join(out, "tune.json")) as f:
            tables.append(json.load(f))
    cpu, gpu = tables
    d_exact = max(abs(a["mean"]["exact"] - b["mean"]["exact"])
                  for a, b in zip(cpu["candidates"], gpu["candidates"]))
    d_loss = max(abs(a["mean"]["loss"] - b["mean"]["loss"]) / abs(a["mean"]["loss"])
                 for a, b in zip(cpu["candidates"], gpu["candidates"]))
    same = cpu["best"] == gpu["best"]
    print(f"\ntune (example models, {len(cpu['candidates'])} candidates, 400 prompts): "
          f"CPU {times[0]:.1f} s, --cuda {times[1]:.1f} s; max |exact difference| "
          f"{d_exact:.4f}, max relative loss difference {d_loss:.2e}; same choice: {same} "
          f"({cpu['candidates'][cpu['best']]['candidate']})")
    return same and d_loss <= 1e-3


if __name__ == "__main__":
    main()
