"""Tables of `mergekit-awd tune` runs with --test over the data-free rules (issue #33):
every method's best candidate on validation, scored once on test, per task, with the
general-prompt loss, and paired test differences (95% bootstrap within tasks); with
several runs (seeds), each run's tables, then the differences pooled over the seeds
(the mean of the seeds' differences, bootstrap within task and seed).

    python benchmarks/smollm2/data_free_tables.py SEED0/tune.json [SEED1/tune.json ...]
    python benchmarks/smollm2/data_free_tables.py SEED0/tune.json+SEED0-kd1/tune.json
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


def points(d) -> str:
    """A difference (point, low, high) in exact points with its interval."""
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def plain_rule(method: str) -> str:
    """The rule an AWD variant runs behind ("awd_wudi (keep_delta 1)" -> "wudi")."""
    return method.split(" ")[0].removeprefix("awd_")


def load(path: str):
    """(tune.json, its tested scores, its best row per method). ``A.json+B.json``: one
    seed's run A with run B beside it (the same data and fine-tunes, other settings,
    e.g. the AWD variants at keep_delta 1): B's methods join A's, as "METHOD (B's
    settings)" where A has METHOD too, compared with A's TIES and plain rule."""
    first, *others = path.split("+")
    t = json.load(open(first))
    test, best = tested(t), best_per_method(t)
    for other in others:
        u = json.load(open(other))
        theirs = tested(u)
        for method, r in best_per_method(u).items():
            if r["candidate"] in test or r["candidate"] not in theirs:
                continue  # the same candidate as A's, or not scored on test
            shared = ", ".join(f"{k} {v:g}" for k, v in r["settings"].items()
                               if k not in ("lambda", "alpha"))
            # a method A did not run keeps its name (pooled with the seeds that ran it)
            best[method if method not in best else f"{method} ({shared})"] = r
            test[r["candidate"]] = theirs[r["candidate"]]
    return t, test, best


def main(path: str) -> None:
    t, test, best = load(path)
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
            lines.append("- TIES " + points(d))
        plain = plain_rule(method)
        if plain != method and plain in best and test.get(best[plain]["candidate"]):
            d = paired(s, test[best[plain]["candidate"]])
            lines.append(f"- {plain} " + points(d))
        if lines:
            print(f"{method}: " + "; ".join(lines) + " (test exact points)")
    print(f"\nchosen: {t['test']['candidate']}")


def pooled(paths) -> None:
    """Per method: mean test exact over the seeds, and paired differences pooled."""
    runs, tests, bests = zip(*map(load, paths))
    methods = [m for m in bests[0] if all(m in b and test.get(b[m]["candidate"])
                                            for b, test in zip(bests, tests))]

    def scores(method):
        return [test[b[method]["candidate"]] for b, test in zip(bests, tests)]

    def pooled_diff(a, b, n=2000, seed=0):
        rng = np.random.default_rng(seed)
        per_seed = []
        for x, y in zip(a, b):
            diffs = [np.array(x[k]["exact_each"], float) - np.array(y[k]["exact_each"], float)
                     for k in TASKS]
            point = np.mean([d.mean() for d in diffs])
            boots = np.mean([d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1)
                             for d in diffs], axis=0)
            per_seed.append((point, boots))
        point = float(np.mean([p for p, _ in per_seed]))
        boots = np.mean([b for _, b in per_seed], axis=0)
        return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))

    print(f"\npooled over {len(runs)} seeds: test exact (mean of seeds), general loss, "
          "paired differences in test exact points [95% CI]")
    chosen = {next(m for m, r in b.items() if r["candidate"] == t["test"]["candidate"])
              for t, b in zip(runs, bests)}
    choice = chosen.pop() if len(chosen) == 1 else None  # the same method in every seed
    print("| method | test mean | per seed | general loss | - TIES | AWD variant - plain | "
          + (f"{choice} (tune's choice) - this |" if choice else "tune's choice - this |"))
    print("|---|---:|---|---:|---:|---:|---:|")
    for method in methods:
        s = scores(method)
        means = [100 * np.mean([x[k]["exact"] for k in TASKS]) for x in s]
        loss = np.mean([x["general"]["loss"] for x in s])
        cells = []
        if "ties" in methods and method != "ties":
            d = pooled_diff(s, scores("ties"))
            cells.append(points(d))
        else:
            cells.append("")
        plain = plain_rule(method)
        if plain != method and plain in methods:
            d = pooled_diff(s, scores(plain))
            cells.append(points(d))
        else:
            cells.append("")
        if choice is not None and method != choice:
            d = pooled_diff(scores(choice), s)
            cells.append(points(d))
        else:
            cells.append("" if choice is not None else "(choices differ by seed)")
        print(f"| {method} | {np.mean(means):.1f} | " + " / ".join(f"{m:.1f}" for m in means)
              + f" | {loss:.2f} | " + " | ".join(cells) + " |")
    print("chosen: " + "; ".join(t["test"]["candidate"] for t in runs))


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"## {path}")
        main(path)
    if len(sys.argv) > 2:
        pooled(sys.argv[1:])
