"""Wall time of `mergekit-yaml` runs of this version and an earlier checkout (or a
patched copy), alternated round by round on the 100M synthetic Llama (K = 4).

    python benchmarks/ab_cost.py ROUNDS VARIANT,... [--before DIR]

A variant is SCOPE:WHO with SCOPE in ta, global, tensor and WHO in new, before
(``before``: the mergekit_awd found at DIR, put first on PYTHONPATH). Prints each
run's wall seconds and the median per variant.
"""

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import merge_cost as mc  # noqa: E402


def main():
    rounds, variants = int(sys.argv[1]), sys.argv[2].split(",")
    before = sys.argv[sys.argv.index("--before") + 1] if "--before" in sys.argv else None
    paths = mc.family(os.path.join(tempfile.gettempdir(), "awd-bench"), "100m", 4)
    res = {}
    with tempfile.TemporaryDirectory() as wd:
        mc.measure(mc.recipe(paths, "task_arithmetic"), wd, "warm")
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                scope, who = v.split(":")
                cfg = (mc.recipe(paths, "task_arithmetic") if scope == "ta"
                       else mc.recipe(paths, "awd", steps=1000, scope=scope))
                w, _ = mc.measure(cfg, wd, v.replace(":", "_"), before if who == "before" else None)
                res.setdefault(v, []).append(w)
    for v, ws in res.items():
        print(v, " ".join(f"{w:.2f}" for w in ws), "median", f"{statistics.median(ws):.2f}")


if __name__ == "__main__":
    main()
