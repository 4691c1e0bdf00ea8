"""Tables of one `mergekit-awd tune` run with --test over the data-free rules (issue #33):
every method's best candidate on validation, scored once on test, per task, with the
general-prompt loss, and paired test differences (95% bootstrap within tasks).

    python benchmarks/smollm2/data_free_tables.py TUNE_DIR/tune.json
"""

from __future__ import annotations

import json
import sys

import numpy as np

TASKS = ("reverse", "sort", "initials", "add")


def tested(t: dict) -> dict:
    """candidate label -> its test scores (the choice and every compared candidate)."""
    out = {t["test"]["candidate"]: t["test"]["scores"]}
    for c in t["comparisons"]:
        if c.get("test_scores"):
            out[c["other"]] = c["test_scores"]
    return out


def best_per_method(t: dict) -> dict:
    """method -> its best candidate row on validation (tune's own order: exact, then loss)."""
    best = {}
    for r in t["candidates"]:
        if r.get("error") or r.get("as_written"):
            continue
        key = (r["mean"]["exact"], -r["mean"]["loss"])
        if r["method"] not in best or key > best[r["method"]][0]:
            best[r["method"]] = (key, r)
    return {m: r for m, (_, r) in best.items()}


def paired(a: dict, b: dict, n: int = 2000, seed: int = 0):
    """mean over tasks of a - b (exact match, example by example), 95% bootstrap CI."""
    rng = np.random.default_rng(seed)
    diffs = [np.array(a[k]["exact_each"], float) - np.array(b[k]["exact_each"], float)
             for k in TASKS]
    point = float(np.mean([d.mean() for d in diffs]))
    boots = np.mean([d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1) for d in diffs],
                    axis=0)
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main(path: str) -> None:
    t = json.load(open(path))
    test, best = tested(t), best_per_method(t)
    print("| method (best on validation) | val exact | " + " | ".join(TASKS)
          + " | test mean | general loss |")
    print("|---|---:|" + "---:|" * len(TASKS) + "---:|---:|")
    for method, r in best.items():
        s = test.get(r["candidate"])
        if s is None:
            print(f"| {r['candidate']} | {r['mean']['exact']:.3f} | (not scored on test) |")
            continue
        cells = [f"{100 * s[k]['exact']:.1f}" for k in TASKS]
        mean = np.mean([s[k]["exact"] for k in TASKS])
        print(f"| {r['candidate']} | {r['mean']['exact']:.3f} | " + " | ".join(cells)
              + f" | {100 * mean:.1f} | {s['general']['loss']:.2f} |")
    ties = test.get(best["ties"]["candidate"]) if "ties" in best else None
    print()
    for method, r in best.items():
        s = test.get(r["candidate"])
        if s is None:
            continue
        lines = []
        if ties is not None and method != "ties":
            d = paired(s, ties)
            lines.append(f"- TIES {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
        plain = method.removeprefix("awd_")
        if plain != method and plain in best and test.get(best[plain]["candidate"]):
            d = paired(s, test[best[plain]["candidate"]])
            lines.append(f"- {plain} {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
        if lines:
            print(f"{method}: " + "; ".join(lines) + " (test exact points)")
    print(f"\nchosen: {t['test']['candidate']}")


if __name__ == "__main__":
    main(sys.argv[1])
