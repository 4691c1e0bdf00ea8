"""CPU vs `--cuda`: the same merges on both, agreement and times.

    python benchmarks/gpu_check.py [--sizes tiny,100m] [--methods awd,tsv,...] [--no-learn]
    python benchmarks/gpu_check.py --sizes tiny --dry-run     # its plumbing, CPU only

For each model (the quick start's shipped tiny Llama family and the synthetic 100M
Llama family of benchmarks/merge_cost.py) and each method (`awd` in both scopes,
then the data-free rules and `awd_wudi`), merges with `mergekit-yaml` on CPU and
with `--cuda`, then checks that the merged deltas (merged - base) agree per tensor,
relative: to 1e-5 for the closed forms (`awd`, `tsv`, `iso_c`, `iso_cts`), to 1e-3
for WUDI's (300 Adam steps, whose normalised updates carry last-bit differences
forward). Then `mergekit-awd tune` on the tiny example, static and `--learn layer`,
on CPU and with `--cuda`: the same choice and losses within 1e-3 (static), and the
learned merge's held-out score within 2 points. Prints both wall times and the card
the GPU run used. Meant for a machine with an NVIDIA GPU (it exits with an error
without one); `--dry-run` runs the "GPU" leg on the CPU too, to check this script
before device time is spent on it. About 5 minutes on one H200 with the defaults.
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

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "example_models", "tiny-llama")


def example_models():
    """The quick start's shipped tiny Llama family (checked against its manifest)."""
    import examples

    examples.check(SHIPPED)
    return examples.make(SHIPPED)  # on disk: nothing is trained


def families(sizes, cache):
    import examples

    if "tiny" in sizes:
        paths = example_models()
        yield "example tiny Llama (4 fine-tunes)", paths["base"], [
            paths[t] for t in examples.TASKS]
    if "100m" in sizes:
        from merge_cost import family

        p = family(cache, "100m", 4)
        yield "synthetic 100M Llama (K=4)", p["base"], p["fts"]


# (method, parameters, tolerance on the relative difference of merged deltas)
CASES = {
    "awd": [("awd", {"scope": "global"}, 1e-5), ("awd", {"scope": "tensor"}, 1e-5)],
    "tsv": [("tsv", {}, 1e-5)],
    "iso_c": [("iso_c", {}, 1e-5)],
    "iso_cts": [("iso_cts", {}, 1e-5)],
    "wudi": [("wudi", {}, 1e-3)],
    "awd_wudi": [("awd_wudi", {}, 1e-3)],
}


def merge(base, fts, out, method, parameters, *options):
    config = {"merge_method": method, "base_model": base, "dtype": "float32",
              "models": [{"model": m} for m in fts], "parameters": dict(parameters)}
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
    parser.add_argument("--methods", default=",".join(CASES),
                        help=f"some of {', '.join(CASES)}")
    parser.add_argument("--no-learn", action="store_true", help="skip tune --learn layer")
    parser.add_argument("--dry-run", action="store_true",
                        help="the 'GPU' leg on the CPU too: checks this script, not a GPU")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "awd-bench"))
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in CASES]
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(CASES)}")
    gpu = [] if args.dry_run else ["--cuda"]
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to check (--dry-run checks this script on the CPU)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    card = "none: --dry-run" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"GPU: {card}; torch {torch.__version__}\n")
    print("| model | method | parameters | CPU s | --cuda s | max relative difference of "
          "merged deltas | tolerance | ok |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, base, fts in families(args.sizes.split(","), args.cache):
            base_state = reference.load(base)
            for method, parameters, tol in (c for m in methods for c in CASES[m]):
                name = "-".join([method, *map(str, parameters.values())])
                cpu_out, gpu_out = (os.path.join(tmp, f"{name}-{d}") for d in ("cpu", "gpu"))
                t_cpu = merge(base, fts, cpu_out, method, parameters)
                t_gpu = merge(base, fts, gpu_out, method, parameters, *gpu)
                a, b = reference.load(cpu_out), reference.load(gpu_out)
                worst = max(
                    float((a[k].double() - b[k].double()).norm()
                          / (a[k].double() - base_state[k].double()).norm().clamp_min(1e-30))
                    for k in a
                )
                ok &= worst <= tol
                shown = ", ".join(f"{k}: {v}" for k, v in parameters.items()) or "defaults"
                print(f"| {label} | {method} | {shown} | {t_cpu:.1f} | {t_gpu:.1f} | "
                      f"{worst:.2e} | {tol:g} | {'yes' if worst <= tol else 'NO'} |",
                      flush=True)
                for d in (cpu_out, gpu_out):
                    subprocess.run(["rm", "-rf", d])
    if "tiny" in args.sizes.split(","):
        ok &= tune_check(args.cache, gpu, learn=not args.no_learn)
    print("\nall agree" if ok else "\nSOME DISAGREE")
    sys.exit(0 if ok else 1)


def tune_check(cache, gpu, learn: bool) -> bool:
    """`mergekit-awd tune` on CPU and on the GPU (``gpu``: the extra options): the same
    static table and choice; with ``learn``, `--learn layer` too (its fit runs on the
    device), whose held-out score must agree within 2 points."""
    import json

    import examples

    paths = example_models()
    data = examples.write_data(os.path.join(cache, "tiny-data"), n=100)
    recipe = os.path.join(cache, "tune.yml")
    with open(recipe, "w") as f:
        yaml.safe_dump({"merge_method": "awd", "base_model": paths["base"], "dtype": "float32",
                        "models": [{"model": paths[t]} for t in examples.TASKS],
                        "parameters": {"alpha": 0.01}}, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-awd")
    runs = [("static", ["--methods", "awd,ties", "--lambda", "0.3,0.5,0.7",
                        "--keep-delta", "0,1"])]
    if learn:
        runs.append(("--learn layer", ["--methods", "awd", "--lambda", "0.3,0.5",
                                       "--learn", "layer", "--learn-steps", "20"]))
    ok = True
    for what, options in runs:
        tables, times = [], []
        for leg, extra in (("cpu", []), ("gpu", gpu)):
            out = os.path.join(cache, f"tune-{what.replace(' ', '')}-{leg}")
            subprocess.run(["rm", "-rf", out])
            args = [exe, "tune", recipe, "--out", out, "--quiet", *options, *extra]
            for t in examples.TASKS:
                args += ["--data", f"{t}={data[t + '.val']}"]
            start = time.perf_counter()
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
            with open(os.path.join(out, "tune.json")) as f:
                tables.append(json.load(f))
        cpu, dev = tables
        static = list(zip(cpu["candidates"], dev["candidates"]))
        d_exact = max(abs(a["mean"]["exact"] - b["mean"]["exact"]) for a, b in static)
        d_loss = max(abs(a["mean"]["loss"] - b["mean"]["loss"]) / abs(a["mean"]["loss"])
                     for a, b in static)
        same = cpu["best"] == dev["best"]
        print(f"\ntune {what} (example models, {len(cpu['candidates'])} static candidates, "
              f"400 prompts): CPU {times[0]:.1f} s, GPU leg {times[1]:.1f} s; max |exact "
              f"difference| {d_exact:.4f}, max relative loss difference {d_loss:.2e}; "
              f"same static choice: {same} ({cpu['candidates'][cpu['best']]['candidate']})")
        ok &= same and d_loss <= 1e-3
        if what != "static":
            learned = [(run.get("learned") or []) for run in (cpu, dev)]
            if not all(learned):
                print("  no learned merge in tune.json: NO")
                ok = False
                continue
            scores = [(rows[0].get("held_out") or {}).get("exact") for rows in learned]
            gap = (abs(scores[0] - scores[1]) if None not in scores else float("inf"))
            print(f"  learned per layer, held-out exact: CPU {scores[0]}, GPU leg "
                  f"{scores[1]}; |difference| {gap:.4f} (at most 0.02: "
                  f"{'yes' if gap <= 0.02 else 'NO'})")
            ok &= gap <= 0.02
    return ok


if __name__ == "__main__":
    main()
