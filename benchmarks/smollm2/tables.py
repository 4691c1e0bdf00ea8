"""Tables of the SmolLM2 benchmark (results.json of run.py) for docs/benchmarks.md.

Per regime: every method at its validation-chosen setting (test exact match, mean
over seeds and its spread, per task, general-behaviour loss), the defaults row,
the base and the individual fine-tunes; then the best awd-family method and the
best built-in (each chosen per seed on validation) against each other and against
task arithmetic: a paired bootstrap crossed over seeds and test prompts (seeds
and prompts resampled independently; every seed scores the same prompts).
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import make  # noqa: E402

AWD = ("awd", "awd_ties", "awd_dare_ties")
REGIMES = {
    "a": "(a) fine-tunes of the instruct model, base_model = instruct",
    "b-inst": "(b) fine-tunes of a shared extra stage, base_model = instruct",
    "b-stage": "(b) the same fine-tunes, base_model = the shared stage",
}
TASKS = tuple(make.TASKS)
METHODS = ("task_arithmetic", "ties", "awd")
# what the intervals resample: the test prompts of each task, and the seeds (a
# resample of 1 or 2 seeds carries little of the fine-tunes' training randomness)
CI_HEAD = ("| comparison (test, points) | difference | 95% CI (bootstrap over test prompts "
           "and the {seeds} seed(s), paired) |")


def _test_mean(test):
    return 100 * sum(test[t]["exact"] for t in TASKS) / len(TASKS)


def _matrix(entries, method):
    """[seed][task][prompt] exact (0/1) of a method's chosen setting."""
    return [[e[method]["test"][t]["exact_each"] for t in TASKS] for e in entries]


def _key(result):
    return (-result["val"]["exact"], result["val"]["loss"])


def chosen(entry, method):
    """A method's setting chosen on validation among its 7 evaluations: the 6 of its
    grid (the best of which `tune` chose) and its defaults (its defaults alone where
    its grid was not run: TIES in regime b)."""
    runs = [entry[k] for k in (f"{method}/tuned", f"{method}/default") if k in entry]
    return min(runs, key=_key)


def _choose(entry, methods):
    """The method with the best validation exact (loss breaks ties) in one seed."""
    return min(methods, key=lambda m: _key(chosen(entry, m)))


def bootstrap(a, b, n=2000, seed=0):
    """Mean difference a - b (points) and its 95% interval, seeds x prompts crossed."""
    rng = random.Random(seed)
    seeds, tasks = len(a), len(a[0])
    prompts = [len(a[0][t]) for t in range(tasks)]

    def stat(ss, ps):
        total, count = 0.0, 0
        for s in ss:
            for t in range(tasks):
                for p in ps[t]:
                    total += a[s][t][p] - b[s][t][p]
                    count += 1
        return 100 * total / count

    point = stat(range(seeds), [range(n_) for n_ in prompts])
    draws = sorted(
        stat([rng.randrange(seeds) for _ in range(seeds)],
             [[rng.randrange(n_) for _ in range(n_)] for n_ in prompts])
        for _ in range(n))
    return point, draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def regime_table(results, regime):
    keys = sorted(k for k in results if k.startswith(regime + "/s"))
    # only seeds with every method tuned and at its defaults (a run still going
    # or stopped early leaves a seed out, and the table says how many it has)
    keys = [k for k in keys if all(f"{m}/default" in results[k] for m in METHODS)
            and all(f"{m}/tuned" in results[k] for m in METHODS
                    if regime == "a" or m != "ties")]
    entries = [results[k] for k in keys]
    if not entries:
        return ""
    methods = list(METHODS)
    lines = [f"#### {REGIMES[regime]}", "",
             f"Seeds: {', '.join(k.split('/')[1] for k in keys)}; test: {len(entries[0][f'{methods[0]}/tuned']['test'][TASKS[0]]['exact_each'])} "
             f"prompts per task. Exact match in points (mean over seeds; ± half the range "
             f"over seeds); general = loss on the instruct model's own answers to {len(entries[0]['base']['general']['exact_each'])} "
             f"general prompts (lower keeps more of it).", "",
             "| model / method | chosen on validation (per seed) | "
             + " | ".join(TASKS) + " | mean ± | general loss |",
             "|---|---|" + "---:|" * len(TASKS) + "---:|---:|"]

    def row(name, tests, chosen=""):
        per_task = [sum(100 * t[x]["exact"] for t in tests) / len(tests) for x in TASKS]
        means = [_test_mean(t) for t in tests]
        mean = sum(means) / len(means)
        spread = (max(means) - min(means)) / 2
        general = sum(t["general"]["loss"] for t in tests) / len(tests)
        lines.append(f"| {name} | {chosen} | " + " | ".join(f"{v:.1f}" for v in per_task)
                     + f" | **{mean:.1f}** ± {spread:.1f} | {general:.3f} |")

    row("base model (no merge)", [e["base"] for e in entries])
    own = [100 * sum(e["individual"][t][t]["exact"] for t in TASKS) / len(TASKS)
           for e in entries]
    lines.append("| the fine-tunes, each on its own task | | "
                 + " | ".join(f"{sum(100 * e['individual'][t][t]['exact'] for e in entries) / len(entries):.1f}"
                              for t in TASKS)
                 + f" | **{sum(own) / len(own):.1f}** ± {(max(own) - min(own)) / 2:.1f} | |")
    for ft in entries[0]["individual"]:
        row(f"fine-tune {ft} alone", [e["individual"][ft] for e in entries])
    for kind in ("tuned", "default"):
        for m in methods:
            if kind == "tuned" and f"{m}/tuned" not in entries[0]:
                continue  # only its defaults were run (the next block)
            picks = [chosen(e, m) if kind == "tuned" else e[f"{m}/default"] for e in entries]
            settings = "; ".join(", ".join(f"{k}={v:g}" for k, v in p["settings"].items())
                                 for p in picks)
            row(f"{m}" + (" (defaults)" if kind == "default" else ""),
                [p["test"] for p in picks], settings)
    lines.append("")
    builtins = [m for m in methods if m not in AWD]
    awds = [m for m in methods if m in AWD]
    best_awd = [_choose(e, awds) for e in entries]
    best_builtin = [_choose(e, builtins) for e in entries]

    def pick(choice):
        return [[chosen(e, c)["test"][t]["exact_each"] for t in TASKS]
                for e, c in zip(entries, choice)]

    comparisons = [
        ("best awd-family vs best built-in", pick(best_awd), pick(best_builtin)),
        ("best awd-family vs task_arithmetic", pick(best_awd),
         pick(["task_arithmetic"] * len(entries))),
    ]
    lines.append(f"Chosen on validation per seed: best awd-family {best_awd}, best built-in "
                 f"{best_builtin}.")
    lines.append("")
    lines.append(CI_HEAD.format(seeds=len(entries)))
    lines.append("|---|---:|---|")
    for name, a, b in comparisons:
        point, low, high = bootstrap(a, b)
        lines.append(f"| {name} | {point:+.1f} | [{low:+.1f}, {high:+.1f}] |")
    lines.append("")
    lines += learned_tables(entries, methods, own)
    return "\n".join(lines)


def learned_tables(entries, methods, own):
    """Rows and comparisons of the learned merges (`tune --learn`), where run."""
    names = [f"{m}/learned-{k}" for k in ("layer", "model") for m in ("awd", "task_arithmetic")]
    names = [n for n in names if all(n in e for e in entries)]
    if not names:
        return []
    lines = ["Learned coefficients (`mergekit-awd tune --learn`, fitted on 75 of the 100 "
             "validation prompts per task, the step kept on the other 25, test scored once):",
             "",
             "| learned merge | started from (per seed) | kept step (per seed) | " + " | ".join(TASKS)
             + " | mean ± | % of the fine-tunes | general loss | fit s | peak GiB |",
             "|---|---|---|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|---:|"]
    own_mean = sum(own) / len(own)
    for name in names:
        runs = [e[name] for e in entries]
        tests = [r["test"] for r in runs]
        per_task = [sum(100 * t[x]["exact"] for t in tests) / len(tests) for x in TASKS]
        means = [_test_mean(t) for t in tests]
        mean = sum(means) / len(means)
        general = sum(t["general"]["loss"] for t in tests) / len(tests)
        secs = sum(r["summary"]["seconds"] for r in runs) / len(runs)
        peak = max(r["summary"]["peak_rss_gib"] for r in runs)
        label = name.replace("/learned-", " learned per ")
        lines.append(
            f"| {label} | " + "; ".join(r["summary"]["from"] for r in runs) + " | "
            + ", ".join(f"{r['summary']['step_kept']}/{r['summary']['steps']}" for r in runs)
            + " | " + " | ".join(f"{v:.1f}" for v in per_task)
            + f" | **{mean:.1f}** ± {(max(means) - min(means)) / 2:.1f} | "
            f"{100 * mean / own_mean:.0f}% | {general:.3f} | {secs:.0f} | {peak:.1f} |")
    lines.append("")
    static = [min(methods, key=lambda m: _key(chosen(e, m))) for e in entries]
    best_static = [[chosen(e, m)["test"][t]["exact_each"] for t in TASKS]
                   for e, m in zip(entries, static)]
    best_pct = sum(_test_mean(chosen(e, m)["test"]) for e, m in zip(entries, static)) / len(
        entries)
    lines.append(f"Best static method per seed, chosen on validation: {static} "
                 f"(test {best_pct:.1f}, {100 * best_pct / own_mean:.0f}% of the fine-tunes' "
                 f"{own_mean:.1f}).")
    lines.append("")
    lines.append(CI_HEAD.format(seeds=len(entries)))
    lines.append("|---|---:|---|")

    def each(name):
        return [[e[name]["test"][t]["exact_each"] for t in TASKS] for e in entries]

    for name in names:
        point, low, high = bootstrap(each(name), best_static)
        label = name.replace("/learned-", " learned per ")
        lines.append(f"| {label} − best static | {point:+.1f} | [{low:+.1f}, {high:+.1f}] |")
    for kind in ("layer", "model"):
        a, b = f"awd/learned-{kind}", f"task_arithmetic/learned-{kind}"
        if a in names and b in names:
            point, low, high = bootstrap(each(a), each(b))
            lines.append(f"| awd learned per {kind} − task_arithmetic learned per {kind} "
                         f"(the paper's claim) | {point:+.1f} | [{low:+.1f}, {high:+.1f}] |")
    lines.append("")
    return lines


def lambda_picture(results, regime, path):
    """Validation exact vs lambda (best over the other knob, mean over seeds)."""
    from mergekit_awd import report

    keys = sorted(k for k in results if k.startswith(regime + "/s")
                  and all(f"{m}/default" in results[k] for m in METHODS))
    series = {}
    for k in keys:
        for name, value in results[k].items():
            if "/" not in name or name.split("/")[1] not in ("tuned", "default"):
                continue
            method = name.split("/")[0]
            best = {}
            for settings, means in value["val_by_lambda"]:
                lam = settings["lambda"]
                best[lam] = max(best.get(lam, -1.0), 100 * means["exact"])
            acc = series.setdefault(method, {})
            for lam, v in best.items():
                acc.setdefault(lam, []).append(v)
    data = {m: sorted((lam, sum(v) / len(v)) for lam, v in pts.items())
            for m, pts in series.items()}
    with open(path, "w") as f:
        f.write(report.lines_svg(data, f"SmolLM2 regime {regime}: validation exact vs lambda",
                                 "lambda", "mean exact match (points)"))


def main(path):
    with open(path) as f:
        results = json.load(f)
    out = [regime_table(results, r) for r in REGIMES]
    print("\n".join(x for x in out if x))
    img = os.path.join(HERE, "..", "..", "docs", "img", "smollm2-lambda.svg")
    lambda_picture(results, "a", img)


if __name__ == "__main__":
    main(sys.argv[1])
