"""What tune's scorer costs on the SmolLM2 benchmark's validation prompts, by full
passes and with each task's shared prompt prefix passed once (``share_prefix``),
side by side in one process (alternating, ``--repeats`` times), and whether the two
give the same scores.

    python benchmarks/smollm2/scoring.py WORK [--models base,ft-inst-s0/sort]

WORK is a run.py work folder (its base, fine-tunes and data/*.val.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--models", default="base,ft-inst-s0/sort")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    base = os.path.join(args.work, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tasks = evaluate.load_tasks(
        [f"{t}={args.work}/data/{t}.val.jsonl" for t in make.TASKS], tokenizer, base)
    tokens = sum(len(p) + len(a) for t in tasks for p, a in t.examples)
    shared = {t.name: evaluate.shared_prefix(t.examples) for t in tasks}
    print(f"{sum(len(t.examples) for t in tasks)} prompts, {tokens} tokens; shared "
          f"prefix per task {shared}; torch threads {torch.get_num_threads()}")
    print("| model | full passes s | shared prefix s | ratio | exact differing | "
          "max loss difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model = tune.load_model(os.path.join(args.work, name))
        agrees = evaluate.prefix_agrees(model, tasks)
        seconds = {False: [], True: []}
        scores = {}
        for _ in range(args.repeats):
            for share in (False, True):
                began = time.perf_counter()
                scores[share] = evaluate.score(model, tasks, 4096, share)
                seconds[share].append(time.perf_counter() - began)
        a, b = scores[False], scores[True]
        differ = sum(x != y for t in a for x, y in zip(a[t]["exact_each"], b[t]["exact_each"]))
        gap = max(abs(x - y) for t in a for x, y in zip(a[t]["loss_each"], b[t]["loss_each"]))
        full, fast = min(seconds[False]), min(seconds[True])
        print(f"| {name} (prefix_agrees {agrees}) | {full:.1f} | {fast:.1f} | "
              f"{full / fast:.2f}x | {differ} of {sum(len(v['exact_each']) for v in a.values())} "
              f"| {gap:.1e} |", flush=True)


if __name__ == "__main__":
    main()
