"""A cost model of `mergekit-yaml` merges fitted to benchmarks/large_cost.py's
measurements, and its predictions at the sizes users merge.

    python benchmarks/cost_model.py benchmarks/results/large_cost_3b.json [--bandwidth GiB/s]

Terms (P parameters, a fraction f of them selected, K fine-tunes, b bytes per
parameter, B the disk's read bandwidth, all inputs read cold):

    read_all   = (K + 1) P b / B                  every input once (task arithmetic too)
    t_TA       = read_all + c_TA P                c_TA: task arithmetic's compute + writing
    kernel     = c_K f P                          awd's float32 combination minus TA's bf16
                                                  one (negative where awd's is cheaper)
    gram       = c_G f P K                        G in float64 from the inputs
    pass_read  = max(0, (K + 1) f P b - cache) / B  the Gram pass's second read
    pass_extra = c_P f P (K + 1)                  loading the selected tensors again

    t_global      = t_TA + kernel + gram + pass_read + pass_extra
    t_global_kept = t_TA + kernel                 (the Gram pass kept by report / tune)
    t_tensor      = t_TA + kernel + gram

c_TA, c_K, c_G, c_P are fitted on the measured run (medians over its rounds);
``cache`` (what the page cache still holds of the first pass) is the measured
second read's saving. Compute terms are this machine's (its core count); the
read terms scale with the bandwidth given.
"""

from __future__ import annotations

import argparse
import json
import statistics


def fit(m: dict) -> dict:
    runs = m["runs"]
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    P, f, K, b = m["params"], m["selected_params"] / m["params"], m["k"], 2
    gib = 2**30
    B = m["input_gib"] / m["cold_read_s"]  # GiB/s
    read_all = m["cold_read_s"]
    sel_gib = (K + 1) * f * P * b / gib
    cache_gib = max(0.0, sel_gib - m["warm_read_s"] * B)  # held by the page cache
    c_TA = (med["task_arithmetic"] - read_all) / P
    c_K = (med["awd_global_kept_gram"] - med["task_arithmetic"]) / (f * P)
    c_G = (med["awd_tensor"] - med["awd_global_kept_gram"]) / (f * P * K)
    pass_read = max(0.0, sel_gib - cache_gib) / B
    c_P = (med["awd_global"] - med["awd_tensor"] - pass_read) / (f * P * (K + 1))
    return {"B": B, "f": f, "K": K, "b": b, "c_TA": c_TA, "c_K": c_K, "c_G": c_G,
            "c_P": c_P, "cache_gib": cache_gib, "medians": med, "P": P}


def predict(model: dict, P: float, B: float, K: int = 4, cache_gib: float = 0.0) -> dict:
    f, b, gib = model["f"], model["b"], 2**30
    read_all = (K + 1) * P * b / gib / B
    t_TA = read_all + model["c_TA"] * P
    kernel = model["c_K"] * f * P
    gram = model["c_G"] * f * P * K
    pass_read = max(0.0, (K + 1) * f * P * b / gib - cache_gib) / B
    pass_extra = model["c_P"] * f * P * (K + 1)
    return {"inputs_gib": (K + 1) * P * b / gib, "read_all": read_all, "ta": t_TA,
            "global": t_TA + kernel + gram + pass_read + pass_extra,
            "global_kept": t_TA + kernel, "tensor": t_TA + kernel + gram,
            "floor_global": t_TA + pass_read}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--check", default=None,
                        help="another large_cost.py result: its medians against the model")
    parser.add_argument("--bandwidth", type=float, action="append",
                        help="disk read bandwidth in GiB/s (repeatable; default: measured)")
    args = parser.parse_args()
    with open(args.results) as f:
        m = json.load(f)
    model = fit(m)
    print(f"fitted on {m['size']} (P = {model['P'] / 1e9:.2f}B, K = {model['K']}): "
          f"B = {model['B']:.2f} GiB/s, c_TA = {model['c_TA'] * 1e9:.2f} s/B-param, "
          f"c_K = {model['c_K'] * 1e9:.2f}, c_G = {model['c_G'] * 1e9:.2f}, "
          f"c_P = {model['c_P'] * 1e9:.2f} s per 1e9 (selected) parameters [x task vector], "
          f"page cache held {model['cache_gib']:.1f} GiB of the second read")
    check = predict(model, model["P"], model["B"], model["K"], model["cache_gib"])
    print("\ncheck on the fitted run (measured median vs model):")
    names = {"ta": "task_arithmetic", "global": "awd_global",
             "global_kept": "awd_global_kept_gram", "tensor": "awd_tensor"}
    for key, name in names.items():
        print(f"  {name}: measured {model['medians'][name]:.1f} s, model {check[key]:.1f} s")
    if args.check:
        with open(args.check) as f:
            other = json.load(f)
        o = fit(other)  # only its measured bandwidth, cache and medians are used
        p = predict(model, other["params"], o["B"], other["k"], o["cache_gib"])
        print(f"\ncheck on {other['size']} (P = {other['params'] / 1e9:.2f}B, not fitted; "
              f"its bandwidth {o['B']:.2f} GiB/s, page cache {o['cache_gib']:.1f} GiB):")
        for key, name in names.items():
            got = o["medians"][name]
            print(f"  {name}: measured {got:.1f} s, predicted {p[key]:.1f} s "
                  f"({p[key] / got - 1:+.0%})")
    print("\n| model | inputs (K = 4, bf16) | disk GiB/s | task arithmetic | awd global | "
          "awd global, Gram pass kept | awd tensor | awd global / TA | floor of global |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, P in (("7B", 7.0e9), ("70B", 70.0e9), ("405B", 405.0e9)):
        for B in args.bandwidth or [model["B"]]:
            p = predict(model, P, B)
            h = lambda s: f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"  # noqa: E731
            print(f"| {label} | {p['inputs_gib']:.0f} GiB | {B:g} | {h(p['ta'])} | "
                  f"{h(p['global'])} | {h(p['global_kept'])} | {h(p['tensor'])} | "
                  f"{p['global'] / p['ta']:.2f}x | {h(p['floor_global'])} |")


if __name__ == "__main__":
    main()
