"""What `mergekit-awd tune` costs per candidate, against merging that candidate.

    python benchmarks/tune_cost.py RECIPE --data name=path ... [--rounds 3] [tune options: --lambda ...]

Runs one `mergekit-awd tune` (a subprocess, wall time measured) and reads each
candidate's forming and scoring time from its tune.json; then merges the chosen
recipe (best.yml) `--rounds` times with `mergekit-yaml` (wall time of the process)
and with mergekit's `run_merge` in this process (no interpreter start-up), alternated.
Prints one JSON object; ratios are medians of per-candidate forming time over the
median merge time of the same run, and per method the forming time of the first lambda
of each setting (in full) and of the later ones (one scaled add) against scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args, tune_args = parser.parse_known_args()  # the rest: `mergekit-awd tune` options
    bin_dir = os.path.dirname(sys.executable)
    work = tempfile.mkdtemp(prefix="tune-cost-")
    tune_out = os.path.join(work, "tune")
    command = [os.path.join(bin_dir, "mergekit-awd"), "tune", args.recipe, "--out", tune_out,
               *[x for d in args.data for x in ("--data", d)],
               *[a for a in tune_args if a != "--"]]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    tune_wall = time.perf_counter() - start
    with open(os.path.join(tune_out, "tune.json")) as f:
        table = json.load(f)
    rows = table["candidates"]

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_awd  # noqa: F401

    best = os.path.join(tune_out, "best.yml")
    with open(best) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    cli, api = [], []
    for r in range(args.rounds):
        out = os.path.join(work, f"m{r}")
        start = time.perf_counter()
        subprocess.run([os.path.join(bin_dir, "mergekit-yaml"), best, out, "--quiet"],
                       check=True, stderr=subprocess.DEVNULL)
        cli.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_merge(config, out + "-api", options=MergeOptions(quiet=True))
        api.append(time.perf_counter() - start)

    def median_form(pred):
        xs = [r["form_seconds"] for r in rows if pred(r)]
        return statistics.median(xs) if xs else None

    awd = median_form(lambda r: r["method"].startswith("awd"))
    builtin = median_form(lambda r: not r["method"].startswith("awd"))
    m_cli, m_api = statistics.median(cli), statistics.median(api)
    # per method: the first lambda of each setting (formed in full) and the later ones
    # (one scaled add, where the method is linear in lambda), against scoring
    per_method = {}
    seen = set()
    for r in rows:
        if "error" in r or r.get("as_written"):
            continue
        setting = (r["method"], tuple(sorted((k, v) for k, v in r["settings"].items()
                                             if k != "lambda")))
        kind = "later" if setting in seen else "first"
        seen.add(setting)
        m = per_method.setdefault(r["method"], {"first": [], "later": [], "score": []})
        m[kind].append(r["form_seconds"])
        m["score"].append(r["score_seconds"])
    summary = {}
    for method, m in per_method.items():
        first = statistics.median(m["first"]) if m["first"] else None
        later = statistics.median(m["later"]) if m["later"] else None
        score = statistics.median(m["score"])
        summary[method] = {"form_first_lambda_s": first, "form_later_lambda_s": later,
                           "score_s": score,
                           "form_later_over_score": later / score if later else None}
    awd_later = (summary.get("awd") or {}).get("form_later_lambda_s")
    for method, m in summary.items():
        m["form_later_over_awd_later"] = (m["form_later_lambda_s"] / awd_later
                                          if awd_later and m["form_later_lambda_s"] else None)
    print(json.dumps({
        "recipe": args.recipe,
        "candidates": len(rows),
        "examples": sum(v["examples"] for v in rows[0]["scores"].values()),
        "form": table["form"],
        "tune_wall_seconds": round(tune_wall, 2),
        "gram_seconds": round(table["gram_seconds"], 3),
        "form_seconds_awd_median": awd,
        "form_seconds_builtin_median": builtin,
        "score_seconds_median": statistics.median(r["score_seconds"] for r in rows),
        "mergekit_yaml_seconds": [round(x, 2) for x in cli],
        "run_merge_seconds": [round(x, 2) for x in api],
        "awd_form_over_mergekit_yaml": awd / m_cli if awd else None,
        "awd_form_over_run_merge": awd / m_api if awd else None,
        "builtin_form_over_mergekit_yaml": builtin / m_cli if builtin else None,
        "per_method": summary,
    }, indent=1))


if __name__ == "__main__":
    main()
