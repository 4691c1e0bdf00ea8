"""The data-free merges on SmolLM2 (issue #33): one `mergekit-awd tune` of task
arithmetic, TIES, the data-free rules and their AWD variants for one (regime, seed),
each method's lambda searched with the same budget (tune's default: 6 validation
evaluations a setting), chosen on validation, every method's best scored once on test
and on the general prompts.

    python benchmarks/smollm2/data_free.py WORK --regime a --seed 2
    python benchmarks/smollm2/data_free.py WORK --regime b-inst --seed 0
    python benchmarks/smollm2/data_free.py WORK --regime b-inst --seed 0 \
        --methods awd_tsv,awd_wudi --keep-delta 1
    python benchmarks/smollm2/data_free.py WORK --regime a --seed 2 \
        --methods tsv,iso_c,awd_tsv,awd_iso_c --tag spectral
    python benchmarks/smollm2/data_free_tables.py WORK/data-free/*/s*/tune.json

WORK is run.py's folder (the base, the data and the fine-tunes are made there when
missing and reused when present: the same models as run.py's and keep.py's). A run that
stopped is continued by tune's own record (WORK/data-free/REGIME/sSEED/record.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make  # noqa: E402
import run  # noqa: E402

METHODS = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi",
           "awd_tsv", "awd_iso_c", "awd_iso_cts", "awd_wudi")


def models_of(work: str, regime: str, seed: int, steps: int, n: int, n_val: int):
    """(merge base, fine-tunes) of the regime and seed, as run.py makes them."""
    base = os.path.join(work, "base")
    make.make_base(base)
    data = os.path.join(work, "data")
    held = make.write_data(data, n)
    run._trim_val(data, n_val)
    run.general_answers(base, os.path.join(data, "general.jsonl"))
    start_from = base
    if regime != "a":
        start_from = os.path.join(work, "stage")
        make.fine_tune(base, start_from, "stage", set().union(*held.values()), 2 * steps, 8,
                       5e-5, seed=999, tasks=make.STAGE_TASKS)
    origin = "inst" if regime == "a" else "stage"
    models = []
    for i, task in enumerate(make.TASKS):
        path = os.path.join(work, f"ft-{origin}-s{seed}", task)
        make.fine_tune(start_from, path, task, held[task], steps, 8, 5e-5, seed=seed * 100 + i)
        models.append(path)
    merge_base = start_from if regime == "b-stage" else base
    return merge_base, models, data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--regime", default="a", choices=("a", "b-inst", "b-stage"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--keep-delta", default=None,
                        help="keep_delta values of the AWD variants (tune's --keep-delta; "
                             "default: tune's, 0); the run goes to its own folder")
    parser.add_argument("--tag", default=None,
                        help="a name for this run's folder (sSEED-TAG), e.g. for other --methods "
                             "on models that an earlier run of the seed already made")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--n", type=int, default=200, help="test prompts per task")
    parser.add_argument("--n-val", type=int, default=100, help="validation prompts per task")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    merge_base, models, data = models_of(args.work, args.regime, args.seed, args.steps,
                                         args.n, args.n_val)
    name = (f"s{args.seed}" + (f"-kd{args.keep_delta}" if args.keep_delta else "")
            + (f"-{args.tag}" if args.tag else ""))
    folder = os.path.join(args.work, "data-free", args.regime, name)
    os.makedirs(folder, exist_ok=True)
    path = run.recipe(merge_base, models, os.path.join(folder, "recipe.yml"))
    extra = ["--keep-delta", args.keep_delta] if args.keep_delta else []
    t = run.tune(path, data, folder, ["--methods", args.methods, *extra])
    print(f"{args.regime}/s{args.seed}: chosen {t['test']['candidate']}, "
          f"{t['process_seconds']:.0f} s; tables: python {HERE}/data_free_tables.py "
          f"{folder}/tune.json")


if __name__ == "__main__":
    main()
