"""Tables, confidence intervals and plots of the causal-LM benchmark.

    python benchmarks/causal_lm/tables.py [--work DIR] [--docs docs]

Reads results.json of run.py; rewrites the part of docs/benchmarks.md between
the causal-LM markers and writes docs/img/causal-lm-lambda.svg.

Confidence intervals: paired hierarchical bootstrap (2000 resamples): seeds drawn
with replacement, then within each drawn seed the test prompts of each task drawn
with replacement, the same draw for both methods; the statistic is the mean
exact-match accuracy over the eight tasks (points).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from run import BUILT_IN, DEFAULTS, METHODS, REGIMES  # noqa: E402

BEGIN, END = "<!-- causal-lm:begin -->", "<!-- causal-lm:end -->"
AWD = tuple(m for m in METHODS if m not in BUILT_IN)
LABEL = {
    "shared-over-pretrained": "shared instruct stage, `base_model` = pretrained",
    "shared-over-instruct": "shared instruct stage, `base_model` = instruct",
    "independent": "independent fine-tunes of the pretrained model",
}


def correct(seed_res, method, key="methods"):
    """{task: bool array} of one seed's chosen merge of ``method`` on the test prompts."""
    return {t: np.array(v, dtype=float) for t, v in seed_res[key][method]["test"].items()}


def bootstrap(res, a, b, key_a="methods", key_b="methods", n=2000, rng_seed=0):
    """Mean and 95% CI of score(a) - score(b), paired, over seeds and prompts."""
    rng = np.random.default_rng(rng_seed)
    seeds = list(res["seeds"])
    diffs = []  # per seed: (tasks, prompts) array of a - b
    for s in seeds:
        ca, cb = correct(res["seeds"][s], a, key_a), correct(res["seeds"][s], b, key_b)
        diffs.append(np.stack([ca[t] - cb[t] for t in ca]))
    point = 100 * np.mean([d.mean() for d in diffs])
    n_prompts = diffs[0].shape[1]
    stats = np.zeros(n)
    for i in range(n):
        picked = rng.integers(len(seeds), size=len(seeds))
        total = 0.0
        for j in picked:
            idx = rng.integers(n_prompts, size=(diffs[j].shape[0], n_prompts))
            total += np.take_along_axis(diffs[j], idx, axis=1).mean()
        stats[i] = 100 * total / len(picked)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return point, lo, hi


def fmt_ci(ci):
    point, lo, hi = ci
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}]{star}"


def scores(res, method, key="methods"):
    return [res["seeds"][s][key][method]["test_mean"] for s in res["seeds"]]


def mean_val(res, method):
    return float(np.mean([res["seeds"][s]["methods"][method]["val"] for s in res["seeds"]]))


def setting_text(res, method):
    out = []
    for s in res["seeds"]:
        st = res["seeds"][s]["methods"][method]["setting"]
        out.append("/".join(f"{v:g}" for v in st.values()))
    keys = "/".join(res["seeds"][next(iter(res["seeds"]))]["methods"][method]["setting"])
    return f"{keys} = " + ", ".join(out)


def regime_section(name, res):
    seeds = list(res["seeds"])
    ind = [np.mean(list(res["seeds"][s]["individual"].values())) for s in seeds]
    rep = [res["seeds"][s]["awd_report"] for s in seeds]
    cis = {}

    def paired(a, b):  # each pair bootstrapped once (rows and the summary share them)
        if (a, b) not in cis:
            cis[a, b] = bootstrap(res, a, b)
        return cis[a, b]

    ran = res["seeds"][seeds[0]]["methods"]
    best_builtin = max((m for m in BUILT_IN if m in ran), key=lambda m: mean_val(res, m))
    best_awd = max((m for m in AWD if m in ran), key=lambda m: mean_val(res, m))
    from mergekit_awd.report import advice as report_advice

    advice = report_advice(  # the report's current wording, from the recorded numbers
        float(np.mean([r["delta_cosine_with_mean_task_vector"] for r in rep])),
        float(np.mean([r["delta_norm_relative"] for r in rep])))
    lines = [
        f"#### {LABEL.get(name, name)}",
        "",
        f"Individual fine-tunes (each on its own task): {np.mean(ind):.1f} mean exact match "
        f"(seeds {min(ind):.1f}–{max(ind):.1f}). What `mergekit-awd report` says "
        f"(global sgd, defaults; mean over seeds): mean off-diagonal |cos| of the task vectors "
        f"{np.mean([r['mean_abs_cosine_before'] for r in rep]):.3f} → "
        f"{np.mean([r['mean_abs_cosine_after'] for r in rep]):.3f} after disentangling, "
        f"‖δ‖ / RMS ‖τ‖ = {np.mean([r['delta_norm_relative'] for r in rep]):.3f}, "
        f"cos(δ, mean τ) = {np.mean([r['delta_cosine_with_mean_task_vector'] for r in rep]):.2f}"
        + ("; its advice: *" + advice + "*" if advice else "; no shared-stage advice") + ".",
        "",
        f"Best built-in on validation: **{best_builtin}**; best awd-family setting on "
        f"validation: **{best_awd}**.",
        "",
        "| method | chosen on validation (per seed) | test mean (seed range) | vs task arithmetic [95% CI] "
        f"| vs {best_builtin} [95% CI] |",
        "|---|---|---:|---:|---:|",
    ]
    for m in METHODS:
        if m not in res["seeds"][seeds[0]]["methods"]:
            continue
        sc = scores(res, m)
        vs_ta = "" if m == "task arithmetic" else fmt_ci(paired(m, "task arithmetic"))
        vs_best = "" if m == best_builtin else fmt_ci(paired(m, best_builtin))
        bold = "**" if m in (best_builtin, best_awd) else ""
        lines.append(f"| {bold}{m}{bold} | {setting_text(res, m)} | {np.mean(sc):.1f} "
                     f"({min(sc):.1f}–{max(sc):.1f}) | {vs_ta} | {vs_best} |")
    edge = [m for m in METHODS if m in res["seeds"][seeds[0]]["methods"] and any(
        res["seeds"][s]["methods"][m]["lambda_edge"] for s in seeds)]
    lines += ["", "Chosen λ at the end of the ladder (grid could not widen further): "
              + (", ".join(edge) if edge else "none") + "."]
    lines += ["", "Defaults (every method exactly as a user gets it, only `weight: 1.0` per "
              "model, which mergekit requires):", "",
              "| method | test mean (seed range) | vs task_arithmetic defaults [95% CI] |",
              "|---|---:|---:|"]
    for m in DEFAULTS:
        sc = scores(res, m, "defaults")
        ci = "" if m == "task_arithmetic" else fmt_ci(
            bootstrap(res, m, "task_arithmetic", "defaults", "defaults"))
        lines.append(f"| `{m}` | {np.mean(sc):.1f} ({min(sc):.1f}–{max(sc):.1f}) | {ci} |")
    return lines, {"best_builtin": best_builtin, "best_awd": best_awd,
                   "best_awd_vs_builtin": paired(best_awd, best_builtin),
                   "best_awd_vs_ta": paired(best_awd, "task arithmetic")}


PLOTTED = ("task arithmetic", "TIES", "DARE-TIES", "AWD global sgd", "AWD tensor sgd",
           "AWD-TIES")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        res = results["regimes"][regime]
        for m in PLOTTED + ("AWD global sgd + keep_delta", "AWD-TIES + keep_delta"):
            kd = 1.0 if m.endswith("keep_delta") else None
            curves = []
            for s in res["seeds"]:
                grid = res["seeds"][s]["methods"].get(m, {}).get("grid", [])
                curves.append({lam: v for lam, k, v in grid if (kd is None or k == kd)})
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if common:
                ys = [np.mean([c[x] for c in curves]) for x in common]
                label = m.replace("+ keep_delta", "keep_delta=1")
                ax.plot(common, ys, marker="o", ms=3, label=label,
                        ls="--" if kd else "-")
        ax.set_xscale("log")
        ax.set_title(LABEL.get(regime, regime), fontsize=9)
        ax.set_xlabel("lambda")
        ax.set_ylabel("validation exact match (mean of seeds)")
        ax.legend(fontsize=6)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "awd-causal-lm"))
    parser.add_argument("--docs", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs"))
    args = parser.parse_args()
    with open(os.path.join(args.work, "results.json")) as f:
        results = json.load(f)
    st = results["stages"]
    lines = [BEGIN, "",
             f"Stages, test exact match in the fine-tune formats (mean of 8 tasks): pretrained "
             f"{np.mean(list(st['pretrained'].values())):.1f}, instruct "
             f"{np.mean(list(st['instruct'].values())):.1f} (neither has seen the task tags). "
             f"(seeds {', '.join(map(str, results['setup']['seeds']))}; "
             f"{results['setup']['n_val']} validation and {results['setup']['n_test']} "
             f"test prompts per task).", ""]
    summary = {}
    for regime, res in results["regimes"].items():
        section, summary[regime] = regime_section(regime, res)
        lines += section + [""]
    lines += ["#### Summary: the best awd-family setting vs the best built-in (both chosen on validation)",
              "", "| regime | best built-in | best awd-family | vs best built-in [95% CI] | vs task arithmetic [95% CI] |",
              "|---|---|---|---:|---:|"]
    for regime, s in summary.items():
        lines.append(f"| {LABEL.get(regime, regime)} | {s['best_builtin']} | {s['best_awd']} | "
                     f"{fmt_ci(s['best_awd_vs_builtin'])} | {fmt_ci(s['best_awd_vs_ta'])} |")
    lines += ["", "Validation score vs λ (mean of the seeds, λ points every seed tried):", "",
              "![score vs lambda, causal LM](img/causal-lm-lambda.svg)", "", END]
    os.makedirs(os.path.join(args.docs, "img"), exist_ok=True)
    plot(results, os.path.join(args.docs, "img", "causal-lm-lambda.svg"))
    doc = os.path.join(args.docs, "benchmarks.md")
    with open(doc) as f:
        text = f.read()
    block = "\n".join(lines)
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(text)
    print(block)
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
