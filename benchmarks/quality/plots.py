"""Tables and plots of the quality benchmark: results.json -> markdown + PNGs.

    python benchmarks/quality/plots.py [--work DIR] [--out docs]
"""

import argparse
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def table(res):
    tasks = list(res["individual"])
    head = "| method | setting (chosen on validation) | " + " | ".join(tasks) + " | mean acc | normalized |"
    rows = [head, "|" + "---|" * (len(tasks) + 4)]

    def row(name, setting, acc, norm):
        cells = " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
        mean = 100 * sum(acc.values()) / len(acc)
        return f"| {name} | {setting} | {cells} | {mean:.1f} | {norm} |"

    rows.append(row("pretrained", "", res["pretrained"],
                    f"{sum(res['pretrained'][t] / res['individual'][t] for t in tasks) / len(tasks):.3f}"))
    rows.append(row("individual", "", res["individual"], "1.000"))
    for name, m in res["methods"].items():
        setting = ", ".join(f"{k}={v}" for k, v in m["setting"].items())
        rows.append(row(name, setting, m["test"], f"{m['test_normalized']:.3f}"))
    return "\n".join(rows)


def panels(results, out, name, title, xlabel, draw):
    """One panel per regime, drawn by ``draw(ax, res)``; saved as ``name``."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.4), squeeze=False)
    for ax, (regime, res) in zip(axes[0], results.items()):
        draw(ax, res)
        ax.set_title(f"{regime}: {title}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_lambda(ax, res):
    for name, m in res["methods"].items():
        if "by_lambda" in m:
            xs = sorted(m["by_lambda"], key=float)
            ax.plot([float(x) for x in xs], [m["by_lambda"][x] for x in xs], marker="o", label=name)


def draw_tasks(ax, res):
    for name, by_k in res["by_tasks"].items():
        ks = sorted(by_k, key=int)
        mean = [by_k[k]["mean"] for k in ks]
        lo = [by_k[k]["mean"] - by_k[k]["min"] for k in ks]
        hi = [by_k[k]["max"] - by_k[k]["mean"] for k in ks]
        ax.errorbar([int(k) for k in ks], mean, yerr=[lo, hi], marker="o", capsize=3, label=name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "awd-quality"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs"))
    args = parser.parse_args()
    with open(os.path.join(args.work, "results.json")) as f:
        results = json.load(f)
    img = os.path.join(args.out, "img")
    os.makedirs(img, exist_ok=True)
    panels(results, img, "quality-lambda.png", "normalized score vs lambda", "lambda", draw_lambda)
    panels(results, img, "quality-tasks.png", "normalized score vs number of tasks",
           "tasks merged", draw_tasks)
    for regime in results:
        src = os.path.join(args.work, f"awd-{regime}_cosine.png")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(img, f"quality-cosine-{regime}.png"))
    for regime, res in results.items():
        c = res["cosines"]
        print(f"\n### Regime: {regime}\n")
        print(f"Mean off-diagonal |cos| of the task vectors: {c['mean_abs_cosine_before']:.3f} before, "
              f"{c['mean_abs_cosine_after']:.3f} after disentangling (AWD global sgd, default alpha); "
              f"||delta|| / RMS ||tau|| = {c['delta_norm_relative']:.3f}.\n")
        print(f"![cosines, {regime}](img/quality-cosine-{regime}.png)\n")
        print(table(res))


if __name__ == "__main__":
    main()
