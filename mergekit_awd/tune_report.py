"""What `mergekit-awd tune` prints and draws: the table of candidates, the comparison
and test lines, and the λ picture (SVG, no plotting library)."""

from __future__ import annotations

import os
from typing import Dict, List

from mergekit_awd import report, tune


def lines(req, ins, found, result) -> List[str]:
    """The report printed at the end of a run (stdout)."""
    data, rows, best = result.data, found.rows, result.best
    out = [table(rows, best, ins.metric, data["comparisons"])]
    out += [f"lambda search not done ({s['setting']}): {s['not_done']}"
            for s in data["lambda_search"] if "not_done" in s]
    for c in data["comparisons"]:
        out.append(f"validation ({c['why']}): " + tune.comparison_line(
            rows[best]["candidate"], c["other"], c["validation"]))
    out += [entry.line() for entry in result.learned]
    decision = data.get("decision")
    if decision:
        out.append(f"decision (examples nothing before saw, {sum(decision['examples'].values())}"
                   f"): " + tune.comparison_line(decision["learned"], decision["static"],
                                                  decision)
                   + ("; adopted" if decision["adopted"] else
                      f"; not adopted: {decision['why_not']}"))
        if "keep" in decision:
            out.append("decision, keep loss (keep examples the fit did not see): "
                       + tune.comparison_line(decision["learned"], decision["static"],
                                              decision["keep"]))
    names = ins.scorer.names
    tested = [data["test"]] if "test" in data else []
    tested += data.get("test_learned", []) + ([data["test_static"]] if "test_static" in data
                                              else [])
    for t in tested:
        out.append(f"test ({t['candidate']}, scored once): "
                   + " ".join(f"{name} " + "/".join(f"{s[m]:.3f}" for m in names)
                              for name, s in t["scores"].items())
                   + "  mean " + ", ".join(f"{m} {v:.4f}" for m, v in t["mean"].items()))
    if decision and "test" in decision:
        out.append("test (learned - static, scored once): " + tune.comparison_line(
            decision["learned"], decision["static"], decision["test"]))
    for c in data["comparisons"]:
        if "test" in c:
            out.append(f"test ({c['why']}, scored once): " + tune.comparison_line(
                data["test"]["candidate"], c["other"], c["test"]))
    summary = ""
    if data["comparisons"]:
        c = data["comparisons"][0]
        low, high = c["validation"]["ci95"]
        summary = (f"  (vs {c['other']}: {c['validation']['difference']:+.4f} "
                   f"[{low:+.4f}, {high:+.4f}], "
                   + ("separated" if c["validation"]["separated"] else "not separated")
                   + " on validation)")
    out.append(f"best: {result.chosen_label}  ->  "
               f"{os.path.join(req.out_dir, 'best.yml')}{summary}")
    return out


def table(rows, best: int, metric: str, comparisons=()) -> str:
    scored = rows[best]
    tasks = list(scored["scores"])
    width = max(len(r["candidate"]) for r in rows) + 2
    head = f"  {'candidate':{width}s}" + "".join(f"{t[:10]:>11s}" for t in tasks)
    head += "".join(f"{m:>11s}" for m in scored["mean"])
    keep = any("keep" in r for r in rows)
    head += f"{'keep loss':>11s}" if keep else ""
    head += "  chosen - this (95% CI)" if comparisons else ""
    lines = [head]
    against = {c["other"]: c["validation"] for c in comparisons}
    for i, r in enumerate(rows):
        mark = "* " if i == best else "  "
        if "error" in r:
            lines.append(f"{mark}{r['candidate']:{width}s}  failed: {r['error']}")
            continue
        cells = "".join(f"{r['scores'][t][metric]:11.4f}" for t in tasks)  # none: external
        cells += "".join(f"{v:11.4f}" for v in r["mean"].values())
        if keep:
            cells += f"{r['keep']['loss']:11.4f}" if "keep" in r else f"{'-':>11s}"
        c = against.get(r["candidate"])
        if c is not None:
            cells += (f"  {c['difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                      + ("" if c["separated"] else " ?"))
        lines.append(f"{mark}{r['candidate']:{width}s}{cells}")
    what = {"exact": "exact match", "loss": "loss", "entropy": "entropy",
            "external": "--eval-cmd"}[metric]
    lines.append((f"(per-task columns: {what}; * = chosen on {what}" if tasks
                  else f"(* = chosen on {what}")
                 + ("; ? = the data cannot separate it from the chosen one" if comparisons
                    else "")
                 + ("; keep loss: the loss on the --keep reference answers, lower keeps "
                    "more, not used to choose)" if keep else ")"))
    return "\n".join(lines)


def picture(rows, metric: str, path: str) -> None:
    """Best score per lambda, one line per method (maximised over the other knobs)."""
    series: Dict[str, Dict[float, float]] = {}
    for r in rows:
        if "error" in r or "lambda" not in r["settings"]:  # failed, or no lambda
            continue
        value = r["mean"][metric]
        if metric in ("loss", "entropy"):
            value = -value
        pts = series.setdefault(r["method"], {})
        lam = r["settings"]["lambda"]
        pts[lam] = max(pts.get(lam, -float("inf")), value)
    label = {"exact": "mean exact match", "loss": "- mean loss",
             "entropy": "- mean entropy", "external": "--eval-cmd score"}[metric]
    svg = report.lines_svg({m: sorted(p.items()) for m, p in series.items()},
                           "tune: best score per lambda", "lambda", label)
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg)
