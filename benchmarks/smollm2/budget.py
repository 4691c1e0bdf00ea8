"""What a smaller --budget would have chosen in the recorded regime-(a) tunes, and how
it scores on test: `python benchmarks/smollm2/budget.py WORK [--score]`.

tune's lambda search depends on --budget only by where it stops (``search_lambda``
takes the same steps and stops at the budget), so the first b points of each recorded
path are the search a budget of b would have made. For task arithmetic and TIES (one
setting each) this prints, per seed and b, the lambda chosen on validation and its
test score: from the run's own test scores where it was tested, else scored here
with ``--score`` (the package's forming and scorer; results cached in
WORK/budget_test.json).
"""

from __future__ import annotations

import argparse
import json
import os

TASKS = ("reverse", "sort", "initials", "add")
METHODS = ("task_arithmetic", "ties")
BUDGETS = (5, 6, 8, 12)


def _mean(d):
    return sum(sum(v) / len(v) for v in d.values()) / len(d)


def picks(tune_json):
    """method -> budget -> (lambda, candidate row) chosen on validation."""
    rows = tune_json["candidates"]
    out = {}
    for search in tune_json["lambda_search"]:
        method = search["setting"].split()[0]
        if method not in METHODS:
            continue
        path = [p["lambda"] for p in search["path"]]
        row = {lam: next(r for r in rows if r["method"] == method
                         and abs(r["settings"].get("lambda", -1) - lam) < 1e-9)
               for lam in path}
        out[method] = {}
        for b in BUDGETS:
            seen = path[:b]
            # tune's rank: exact (higher), then loss (lower); ties to the smaller lambda
            best = max(seen, key=lambda lam: (row[lam]["mean"]["exact"],
                                              -row[lam]["mean"]["loss"], -lam))
            out[method][b] = (best, row[best])
    return out


def score_missing(work, entry, wanted, cache):
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    torch.set_num_threads(os.cpu_count() or 1)
    regime, seed = entry.split("/")
    recipe = yaml.safe_load(open(os.path.join(work, "tune", regime, seed, "recipe.yml")))
    config = MergeConfiguration.model_validate(recipe)
    model = tune.load_model(recipe["base_model"])
    tok = AutoTokenizer.from_pretrained(recipe["base_model"])
    spec = lambda split: [f"{t}={work}/data/{t}.{split}.jsonl" for t in TASKS]
    val = evaluate.load_tasks(spec("val"), tok, recipe["base_model"])
    test = evaluate.load_tasks(spec("test"), tok, recipe["base_model"])
    share = evaluate.prefix_agrees(model, val)
    former = tune.Former(config, MergeOptions(quiet=True), 2**40, model, in_memory=True)
    cands = [tune.Candidate(m, (("lambda", lam),) + ((("density", 0.5),) if m == "ties"
                                                     else ())) for m, lam in wanted]
    former.prepare(cands)
    for c in cands:
        tune.swap_in(model, former.form(c))
        v, t = evaluate.score(model, val, share_prefix=share), evaluate.score(
            model, test, share_prefix=share)
        cache[f"{entry}|{c.label}"] = {"val": {k: v[k]["exact_each"] for k in TASKS},
                                       "test": {k: t[k]["exact_each"] for k in TASKS}}
        print(f"{entry}|{c.label}: val {100 * _mean(cache[f'{entry}|{c.label}']['val']):.2f}"
              f" test {100 * _mean(cache[f'{entry}|{c.label}']['test']):.2f}", flush=True)


def tabulate(work, results, cache):
    """entry -> (method, budget) -> (lambda, validation exact, per task the test exact
    match of each prompt, or None where the choice was not scored on test)."""
    table = {}
    for entry in sorted(k for k in results if k.startswith("a/")):
        t = json.load(open(os.path.join(work, "tune", *entry.split("/"), "static",
                                        "tune.json")))
        table[entry] = {}
        for method, by_budget in picks(t).items():
            for b, (lam, row) in by_budget.items():
                table[entry][(method, b)] = (lam, row["mean"]["exact"], _test_each(
                    results[entry], cache, entry, row["candidate"]))
    return table


def _test_each(entry_results, cache, entry, label):
    """Per task, the test exact match of each prompt (None: not scored)."""
    tested = entry_results["static"]["tested"].get(label)
    if tested is not None:
        return {t: tested[t]["exact_each"] for t in TASKS}
    hit = cache.get(f"{entry}|{label}")
    return hit["test"] if hit else None


def interval(table, method, low, high):
    """Test of budget ``high`` minus budget ``low`` for ``method``, paired per prompt,
    mean over seeds x tasks, with a 95% bootstrap interval resampling prompts within
    each (seed, task): the seeds' own randomness is not in it."""
    from mergekit_awd import evaluate

    a, b = {}, {}
    for entry, row in table.items():
        hi, lo = row[(method, high)][2], row[(method, low)][2]
        if hi is None or lo is None:
            continue
        for t in TASKS:
            a[f"{entry}/{t}"], b[f"{entry}/{t}"] = hi[t], lo[t]
    return evaluate.paired_interval({k: a[k] for k in sorted(a)}, {k: b[k] for k in sorted(b)})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--score", action="store_true")
    args = parser.parse_args()
    results = json.load(open(os.path.join(args.work, "results.json")))
    cache_path = os.path.join(args.work, "budget_test.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    table = tabulate(args.work, results, cache)
    if args.score:
        for entry, row in table.items():
            missing = sorted({(m, lam) for (m, _), (lam, _, each) in row.items()
                              if each is None})
            if missing:
                score_missing(args.work, entry, missing, cache)
                with open(cache_path, "w") as f:
                    json.dump(cache, f)
        table = tabulate(args.work, results, cache)

    print("| seed | method | " + " | ".join(f"budget {b}: λ, val, test" for b in BUDGETS)
          + " |")
    print("|---|---|" + "---|" * len(BUDGETS))
    gains = {m: [] for m in METHODS}
    for entry, row in table.items():
        for m in METHODS:
            cells = []
            for b in BUDGETS:
                lam, val, each = row[(m, b)]
                cells.append(f"{lam:g}, {100 * val:.2f}, "
                             + ("?" if each is None else f"{100 * _mean(each):.2f}"))
            print(f"| {entry} | {m} | " + " | ".join(cells) + " |")
            lo, hi = row[(m, BUDGETS[0])][2], row[(m, BUDGETS[-1])][2]
            if lo is not None and hi is not None:
                gains[m].append(100 * (_mean(hi) - _mean(lo)))
    for m, g in gains.items():
        if g:
            print(f"\n{m}: test at budget {BUDGETS[-1]} - at budget {BUDGETS[0]}: "
                  + ", ".join(f"{x:+.2f}" for x in g) + f" (mean {sum(g) / len(g):+.2f})")
    print()
    for m in METHODS:
        for low in (6, 8):
            d, lo, hi = interval(table, m, low, BUDGETS[-1])
            print(f"- {m}, budget {BUDGETS[-1]} - budget {low} on test: {100 * d:+.2f} "
                  f"[{100 * lo:+.2f}, {100 * hi:+.2f}] (95% CI, prompts resampled within "
                  f"seed x task)")


if __name__ == "__main__":
    main()
