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
METHODS = ("task_arithmetic", "ties", "awd", "awd_ties")
# what the intervals resample: the test prompts of each task, and the seeds (a
# resample of 2 or 3 seeds carries little of the fine-tunes' training randomness)
CI_HEAD = ("| comparison (test, points) | difference | 95% CI (bootstrap over test prompts "
           "and the {seeds} seed(s), paired) |")


def _test_mean(test):
    return 100 * sum(test[t]["exact"] for t in TASKS) / len(TASKS)


def _rank(val):
    """tune's own rank on exact match (loss breaks ties, NaN last)."""
    from mergekit_awd import evaluate

    return evaluate.rank(val, "exact")


def chosen(entry, method):
    """A method's candidate chosen on validation in the static tune (tune's rank:
    exact match, then loss), with its test scores."""
    mine = [r for r in entry["static"]["candidates"] if r["method"] == method
            and not r["as_written"] and not r["error"]]
    best = min(mine, key=lambda r: _rank(r["val"]))
    return dict(best, test=entry["static"]["tested"][best["candidate"]])


def as_written(entry):
    (row,) = [r for r in entry["static"]["candidates"] if r["as_written"]]
    return dict(row, test=entry["static"]["tested"][row["candidate"]])


def tune_choice(entry):
    st = entry["static"]
    row = st["candidates"][st["best"]]
    return dict(row, test=st["tested"][row["candidate"]])


def _choose(entry, methods):
    """The method with the best validation score (exact, then loss) in one seed."""
    return min(methods, key=lambda m: _rank(chosen(entry, m)["val"]))


def _each(test):
    return [test[t]["exact_each"] for t in TASKS]


def _settings(row):
    return ", ".join(f"{k}={v:g}" for k, v in row["settings"].items() if v is not None) \
        or "the recipe's"


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
    keys = sorted(k for k in results if k.startswith(regime + "/s") and "static" in results[k])
    entries = [results[k] for k in keys]
    if not entries:
        return ""
    n_test = len(entries[0]["base"][TASKS[0]]["exact_each"])
    n_val = len(entries[0]["static"]["candidates"][0]["val_scores"][TASKS[0]]["exact_each"])
    lines = [f"#### {REGIMES[regime]}", "",
             f"Seeds: {', '.join(k.split('/')[1] for k in keys)}; validation: {n_val} prompts "
             f"per task; test: {n_test} prompts per task. Exact match in points (mean over "
             f"seeds; ± half the range over seeds); general = loss on the instruct model's "
             f"own answers to {len(entries[0]['base']['general']['exact_each'])} general "
             f"prompts (lower keeps more of it).", "",
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
    for m in METHODS:
        picks = [chosen(e, m) for e in entries]
        row(m, [p["test"] for p in picks], "; ".join(_settings(p) for p in picks))
    picks = [as_written(e) for e in entries]
    row("awd as written (its defaults: lambda=1, keep_delta=0)", [p["test"] for p in picks])
    picks = [tune_choice(e) for e in entries]
    row("**tune's choice** (all four methods)", [p["test"] for p in picks],
        "; ".join(p["candidate"] for p in picks))
    lines.append("")
    builtins = [m for m in METHODS if m not in AWD]
    awds = [m for m in METHODS if m in AWD]
    best_awd = [_choose(e, awds) for e in entries]
    best_builtin = [_choose(e, builtins) for e in entries]

    def pick(choice):
        return [_each(chosen(e, c)["test"]) for e, c in zip(entries, choice)]

    def same(m):
        return pick([m] * len(entries))

    oracle = [max(_tested(e), key=lambda lbl: _test_mean(e["static"]["tested"][lbl]))
              for e in entries]
    comparisons = [
        ("best awd-family vs best built-in", pick(best_awd), pick(best_builtin)),
        ("awd vs task_arithmetic", same("awd"), same("task_arithmetic")),
        ("awd_ties vs ties (the paper's AWD + TIES)", same("awd_ties"), same("ties")),
        *[(f"{m} vs tune's choice", same(m), [_each(tune_choice(e)["test"]) for e in entries])
          for m in METHODS],
        ("awd as written vs tune's choice", [_each(as_written(e)["test"]) for e in entries],
         [_each(tune_choice(e)["test"]) for e in entries]),
        ("tune's choice vs the test-best of the scored candidates",
         [_each(tune_choice(e)["test"]) for e in entries],
         [_each(e["static"]["tested"][o]) for e, o in zip(entries, oracle)]),
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
    lines += regret_table(entries, keys)
    lines += cost_table(entries, keys)
    lines += learned_tables(entries, own)
    return "\n".join(lines)


def _tested(entry):
    """The candidates scored on test: tune's choice, each other method's best, the
    recipe as written."""
    return list(entry["static"]["tested"])


def _val_mean(row, n):
    """Validation exact and loss of a candidate on the first n prompts of each task."""
    scores = row["val_scores"]
    ex = sum(sum(scores[t]["exact_each"][:n]) / len(scores[t]["exact_each"][:n])
             for t in TASKS) / len(TASKS)
    lo = sum(sum(scores[t]["loss_each"][:n]) / len(scores[t]["loss_each"][:n])
             for t in TASKS) / len(TASKS)
    return {"exact": ex, "loss": lo}


def regret_table(entries, keys, sizes=(25, 50, 100)):
    """Regret of choosing on n validation prompts per task: the test-best of the
    candidates scored on test (the oracle) minus the test score of the candidate
    the first n validation prompts choose among the same ones."""
    n_val = len(entries[0]["static"]["candidates"][0]["val_scores"][TASKS[0]]["exact_each"])
    sizes = [n for n in sizes if n <= n_val]
    lines = ["Regret (test points the choice leaves behind): among the candidates tune "
             "scored on test (each method's validation best and the recipe as written), "
             "the test-best minus the one that the first n validation prompts per task "
             "choose (exact, then loss). At n = "
             f"{n_val} this is tune's own choice.", "",
             "| seed | oracle (test-best) | " + " | ".join(f"n = {n}: choice, regret"
                                                         for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    totals = {n: [] for n in sizes}
    for key, e in zip(keys, entries):
        rows = {r["candidate"]: r for r in e["static"]["candidates"]}
        tested = _tested(e)
        test = {lbl: _test_mean(e["static"]["tested"][lbl]) for lbl in tested}
        oracle = max(tested, key=lambda lbl: test[lbl])
        cells = []
        for n in sizes:
            pick = min(tested, key=lambda lbl: _rank(_val_mean(rows[lbl], n)))
            totals[n].append(test[oracle] - test[pick])
            cells.append(f"{pick} ({test[pick]:.1f}), {test[oracle] - test[pick]:.1f}")
        lines.append(f"| {key.split('/')[1]} | {oracle} ({test[oracle]:.1f}) | "
                     + " | ".join(cells) + " |")
    lines.append("| mean regret | | " + " | ".join(
        f"{sum(v) / len(v):.1f}" for v in totals.values()) + " |")
    lines.append("")
    return lines


def cost_table(entries, keys):
    """What the static tune cost, per seed."""
    lines = ["The static tune (one `mergekit-awd tune` process per seed, 2 cores):", "",
             "| seed | candidates (per method) | process s | Gram pass s | form s, first "
             "lambda of a setting (median) | form s, later lambdas (median) | score s "
             "(median) |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, e in zip(keys, entries):
        st = e["static"]
        rows = [r for r in st["candidates"] if not r["error"]]
        per = {}
        for r in rows:
            per[r["method"]] = per.get(r["method"], 0) + 1
        first, later, seen = [], [], set()
        for r in rows:
            setting = (r["method"],) + tuple(sorted((k, v) for k, v in r["settings"].items()
                                                    if k != "lambda"))
            (later if setting in seen else first).append(r["form_seconds"])
            seen.add(setting)
        lines.append(f"| {key.split('/')[1]} | {len(rows)} ("
                     + ", ".join(f"{m} {c}" for m, c in per.items()) + f") | "
                     f"{st['seconds']:.0f} | {st['gram_seconds'] or 0:.1f} | "
                     f"{_median(first):.1f} | {_median(later):.2f} | "
                     f"{_median([r['score_seconds'] for r in rows]):.1f} |")
    lines.append("")
    return lines


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else float("nan")


def learned_tables(entries, own):
    """Rows and comparisons of the learned merges (`tune --learn`), where run."""
    names = [f"{m}/learned-{k}" for k in ("layer", "model") for m in ("awd", "task_arithmetic")]
    have = [e for e in entries if any(n in e for n in names)]
    names = [n for n in names if have and all(n in e for e in have)]
    if not names:
        return []
    entries = have
    lines = [f"Learned coefficients (`mergekit-awd tune --learn`, from each method's static "
             f"choice; fitted on 75% of the validation prompts of each task, the step kept "
             f"on the other 25%, test scored once), seeds with every learned row: "
             f"{len(entries)}:",
             "",
             "| learned merge | started from (per seed) | kept step (per seed) | " + " | ".join(TASKS)
             + " | mean ± | % of the fine-tunes | general loss | fit s | process s | peak GiB |",
             "|---|---|---|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|---:|---:|"]
    own = [100 * sum(e["individual"][t][t]["exact"] for t in TASKS) / len(TASKS)
           for e in entries]
    own_mean = sum(own) / len(own)
    for name in names:
        runs = [e[name] for e in entries]
        tests = [r["test"] for r in runs]
        per_task = [sum(100 * t[x]["exact"] for t in tests) / len(tests) for x in TASKS]
        means = [_test_mean(t) for t in tests]
        mean = sum(means) / len(means)
        general = sum(t["general"]["loss"] for t in tests) / len(tests)
        secs = sum(r["summary"]["seconds"] for r in runs) / len(runs)
        proc = sum(r["process_seconds"] for r in runs) / len(runs)
        peak = max(r["summary"]["peak_rss_gib"] for r in runs)
        label = name.replace("/learned-", " learned per ")
        lines.append(
            f"| {label} | " + "; ".join(r["summary"]["from"] for r in runs) + " | "
            + ", ".join(f"{r['summary']['step_kept']}/{r['summary']['steps']}" for r in runs)
            + " | " + " | ".join(f"{v:.1f}" for v in per_task)
            + f" | **{mean:.1f}** ± {(max(means) - min(means)) / 2:.1f} | "
            f"{100 * mean / own_mean:.0f}% | {general:.3f} | {secs:.0f} | {proc:.0f} | "
            f"{peak:.1f} |")
    lines.append("")
    choice = [tune_choice(e) for e in entries]
    best_static = [_each(c["test"]) for c in choice]
    best_pct = sum(_test_mean(c["test"]) for c in choice) / len(entries)
    lines.append(f"Best static merge per seed, tune's choice on validation: "
                 f"{[c['candidate'] for c in choice]} (test {best_pct:.1f}, "
                 f"{100 * best_pct / own_mean:.0f}% of the fine-tunes' {own_mean:.1f}).")
    lines.append("")
    lines.append(CI_HEAD.format(seeds=len(entries)))
    lines.append("|---|---:|---|")

    def each(name):
        return [_each(e[name]["test"]) for e in entries]

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
    """Validation exact vs lambda (best over the other knobs, mean over seeds), every
    lambda the search tried."""
    from mergekit_awd import report

    keys = sorted(k for k in results if k.startswith(regime + "/s") and "static" in results[k])
    series = {}
    for k in keys:
        best = {}
        for r in results[k]["static"]["candidates"]:
            if r["as_written"] or r["error"]:
                continue
            lam = r["settings"]["lambda"]
            pts = best.setdefault(r["method"], {})
            pts[lam] = max(pts.get(lam, -1.0), 100 * r["val"]["exact"])
        for method, pts in best.items():
            acc = series.setdefault(method, {})
            for lam, v in pts.items():
                acc.setdefault(lam, []).append(v)
    data = {m: sorted((lam, sum(v) / len(v)) for lam, v in pts.items())
            for m, pts in series.items()}
    with open(path, "w") as f:
        f.write(report.lines_svg(data, f"SmolLM2 regime {regime}: validation exact vs lambda "
                                       f"(every lambda searched)",
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
