"""How much cheaper `mergekit-awd report` is than the merge it describes.

    python benchmarks/report_cost.py RECIPE [--rounds 3]

Alternates `mergekit-awd report RECIPE` and `mergekit-yaml RECIPE OUT` (both
whole processes, start-up included), then the same two jobs inside one process
(after the imports: the work itself), and prints median times and the median
per-round ratio of each.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(args):
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bindir = os.path.dirname(sys.executable)
    report, merge = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            jobs = [
                ("report", [os.path.join(bindir, "mergekit-awd"), "report", args.recipe,
                            "--out", os.path.join(tmp, "rep"), "--quiet"]),
                ("merge", [os.path.join(bindir, "mergekit-yaml"), args.recipe,
                           os.path.join(tmp, "out"), "--quiet", "--no-copy-tokenizer"]),
            ]
            for name, cmd in jobs if r % 2 == 0 else reversed(jobs):
                (report if name == "report" else merge).append(timed(cmd))
    rows = [("processes", report, merge), ("in one process", *in_process(args))]
    print("| recipe | measured | report s | merge s | report / merge |")
    print("|---|---|---:|---:|---:|")
    for label, rep, mer in rows:
        ratio = statistics.median(a / b for a, b in zip(rep, mer))
        print(f"| {args.recipe} | {label} | {statistics.median(rep):.2f} | "
              f"{statistics.median(mer):.2f} | {ratio:.2f} |")


def in_process(args):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_awd import cli

    with open(args.recipe) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    options = MergeOptions(quiet=True, copy_tokenizer=False)
    report, merge = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            def do_report():
                cli.analyze(cli._collect(config, options))

            def do_merge():
                run_merge(config.model_copy(deep=True), os.path.join(tmp, f"out{r}"), options)

            for name, job in ([("r", do_report), ("m", do_merge)] if r % 2 == 0
                              else [("m", do_merge), ("r", do_report)]):
                start = time.perf_counter()
                job()
                (report if name == "r" else merge).append(time.perf_counter() - start)
    return report, merge


if __name__ == "__main__":
    main()
