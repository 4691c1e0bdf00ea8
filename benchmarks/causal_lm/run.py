"""Causal-LM quality benchmark: AWD vs mergekit's methods on fine-tunes that share
an instruct stage, over several seeds, with hyper-parameters chosen on validation.

    python benchmarks/causal_lm/run.py [--work DIR] [--seeds 0,1,2]

Models (data.py): a Llama (4 layers, hidden 256, 4.2M parameters) pretrained from
scratch on a mixed corpus, a shared instruct stage on a mixture of instruction
formats, and eight task fine-tunes per seed, from the instruct checkpoint and,
separately, from the pretrained one. Regimes (all merged through mergekit's
``run_merge``, in this process):

- ``shared-over-pretrained``: fine-tunes of the instruct model merged
  over the pretrained model (the instruct stage is inside every task vector);
- ``shared-over-instruct``: the same fine-tunes over the instruct model;
- ``independent``: fine-tunes of the pretrained model, merged over it.

Per method and seed, lambda (and keep_delta where listed) is chosen on the
validation prompts from a grid that is extended until the choice is not on its
edge; the chosen merge is scored on the test prompts. Everything is cached under
--work (a rerun skips what is done); results go to results.json there and the
tables/plots to docs via tables.py. The run behind docs/benchmarks.md is kept as
results.json.gz next to this file (gunzip it into --work to redo the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import data as D  # noqa: E402

N_VAL, N_TEST = 60, 200
# lambda ladder; each method starts on a window of it and widens it while the
# best validation score sits on an edge
LADDER = [0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
SUM_START = (0.07, 0.1, 0.15, 0.2, 0.3)      # methods that add K task vectors
MEAN_START = (0.5, 0.7, 1.0, 1.5, 2.0)       # methods that normalize by the weights
KEEP_DELTA = (0.0, 1.0, 2.0)                 # extended to 3, 4 if 2 wins

ADAM = {"optimizer": "adam", "steps": 200, "lr": 0.01}
METHODS = {
    # name: (mergekit method, fixed parameters, lambda start window, keep_delta grid)
    "task arithmetic": ("task_arithmetic", {}, SUM_START, None),
    "TIES": ("ties", {"density": 0.3}, MEAN_START, None),
    "DARE-TIES": ("dare_ties", {"density": 0.5}, SUM_START, None),
    "breadcrumbs-TIES": ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01}, SUM_START, None),
    "DELLA": ("della", {"density": 0.5, "epsilon": 0.15}, MEAN_START, None),
    "AWD global sgd": ("awd", {}, SUM_START, (0.0,)),
    "AWD global sgd + keep_delta": ("awd", {}, SUM_START, KEEP_DELTA),
    "AWD tensor sgd": ("awd", {"scope": "tensor"}, SUM_START, (0.0,)),
    "AWD global adam": ("awd", ADAM, SUM_START, (0.0,)),
    "AWD-TIES": ("awd_ties", {"density": 0.3}, MEAN_START, (0.0,)),
    "AWD-TIES + keep_delta": ("awd_ties", {"density": 0.3}, MEAN_START, KEEP_DELTA),
    "AWD-DARE-TIES": ("awd_dare_ties", {"density": 0.5}, SUM_START, (0.0,)),
}
BUILT_IN = ("task arithmetic", "TIES", "DARE-TIES", "breadcrumbs-TIES", "DELLA")
DEFAULTS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della",
            "awd", "awd_ties", "awd_dare_ties")
REGIMES = {
    # name: (base model stage, fine-tunes' stage)
    "shared-over-pretrained": ("pretrained", "instruct"),
    "shared-over-instruct": ("instruct", "instruct"),
    "independent": ("pretrained", "pretrained"),
}

# BENCH_THREADS: run two benchmarks side by side on a small machine (1 thread each)
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --- training ---------------------------------------------------------------------

def new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(D.VOCAB), hidden_size=256, intermediate_size=1024,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=D.SEQ_LEN, tie_word_embeddings=False,
        bos_token_id=D.BOS, eos_token_id=D.EOS, pad_token_id=D.PAD))


def train(model, batches, steps, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * max(0.1, 1 - i / steps))
    model.train()
    for _ in range(steps):
        ids, labels = batches()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def load(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def stage(path, make):
    if not os.path.exists(os.path.join(path, "config.json")):
        start = time.perf_counter()
        model, loss = make()
        model.save_pretrained(path)
        log(f"trained {path} (last loss {loss:.3f}, {time.perf_counter() - start:.0f}s)")
    return path


class Stages:
    def __init__(self, work, held_out, steps):
        self.work, self.held_out, self.steps = work, held_out, steps

    def pretrained(self):
        def make():
            torch.manual_seed(0)
            model, rng = new_model(), random.Random(0)
            return model, train(model, lambda: D.pretrain_batch(rng, 64),
                                self.steps["pretrain"], 1e-3, 0)
        return stage(os.path.join(self.work, "pretrained"), make)

    def instruct(self):
        base = self.pretrained()

        def make():
            model, rng = load(base), random.Random(1)
            return model, train(model, lambda: D.instruct_batch(rng, 64, self.held_out),
                                self.steps["instruct"], 5e-4, 1)
        return stage(os.path.join(self.work, "instruct"), make)

    def finetunes(self, start, seed):
        base = getattr(self, start)()
        out = {}
        for i, task in enumerate(D.TASKS):
            s = 1000 * (seed + 1) + i

            def make(task=task, s=s):
                model, rng = load(base), random.Random(s)
                return model, train(model, lambda: D.task_batch(task, rng, 32, self.held_out),
                                    self.steps["finetune"], 3e-4, s)
            out[task] = stage(os.path.join(self.work, f"ft-{start}", f"seed{seed}", task), make)
        return out


# --- scoring ----------------------------------------------------------------------

class Scorer:
    def __init__(self, sets):
        self.sets = sets

    def __call__(self, model_dir, split, tasks=None):
        """{task: [bool per prompt]}"""
        model = load(model_dir)
        return {t: D.exact_match(model, self.sets[t][split], t) for t in (tasks or D.TASKS)}


def mean_acc(per_task):
    return 100 * sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)


# --- merging ----------------------------------------------------------------------

def merge(method, models, base, out, parameters, per_model):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_awd  # noqa: F401

    if os.path.exists(os.path.join(out, "config.json")):
        return out
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": base, "dtype": "float32",
        "models": [{"model": m, "parameters": dict(per_model)} for m in models],
        "parameters": parameters})
    run_merge(config, out, MergeOptions(quiet=True, copy_tokenizer=False,
                                        write_model_card=False, random_seed=0))
    return out


class Cache:
    """Scores by key in a JSON-lines file: a rerun skips merges already scored."""

    def __init__(self, path):
        self.path, self.data = path, {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["value"]

    def get(self, key, compute):
        if key not in self.data:
            self.data[key] = compute()
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": self.data[key]}) + "\n")
        return self.data[key]


def split_params(method, fixed):
    per_model = {"weight": 1.0}
    shared = dict(fixed)
    for k in ("density", "gamma", "epsilon"):
        if k in shared:
            per_model[k] = shared.pop(k)
    return shared, per_model


def run_method(name, models, base, score, cache, tmp, prefix):
    """Grid over lambda (widened off its edges) x keep_delta on validation; test of the best."""
    method, fixed, start, keep = METHODS[name]
    shared, per_model = split_params(method, fixed)
    tried = {}

    def point(lam, kd):
        params = dict(shared, **{"lambda": lam})
        if kd is not None:
            params["keep_delta"] = kd
        key = json.dumps([prefix, method, params, per_model, "val"], sort_keys=True)
        out = os.path.join(tmp, f"{len(tried)}")

        def compute():
            shutil.rmtree(out, ignore_errors=True)
            merge(method, models, base, out, params, per_model)
            val = score(out, "val")
            return {"val": mean_acc(val), "out": out}
        res = cache.get(key, compute)
        tried[(lam, kd)] = res["val"]
        return res["val"]

    kds = list(keep or (None,))
    lams = list(start)
    while True:
        for kd in kds:
            for lam in lams:
                if (lam, kd) not in tried:
                    point(lam, kd)
        best_lam, best_kd = max(tried, key=lambda k: (tried[k], -k[0]))
        grew = False
        i = LADDER.index(best_lam)
        if best_lam == lams[0] and i > 0:
            lams.insert(0, LADDER[i - 1])
            grew = True
        if best_lam == lams[-1] and i + 1 < len(LADDER):
            lams.append(LADDER[i + 1])
            grew = True
        if len(keep or ()) > 1 and best_kd == kds[-1] and best_kd < 4.0:
            kds.append(best_kd + 1.0)
            grew = True
        if not grew:
            break
    params = dict(shared, **{"lambda": best_lam})
    if best_kd is not None:
        params["keep_delta"] = best_kd
    key = json.dumps([prefix, method, params, per_model, "test"], sort_keys=True)

    def compute():
        out = os.path.join(tmp, "chosen")
        shutil.rmtree(out, ignore_errors=True)
        merge(method, models, base, out, params, per_model)
        return score(out, "test")
    test = cache.get(key, compute)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "setting": {"lambda": best_lam, **({"keep_delta": best_kd} if keep else {})},
        "grid": [[lam, kd, v] for (lam, kd), v in sorted(tried.items(), key=lambda x: (x[0][1] or 0, x[0][0]))],
        "val": tried[(best_lam, best_kd)],
        "test": test,
        "test_mean": mean_acc(test),
        "lambda_edge": best_lam in (LADDER[0], LADDER[-1]),
    }


def run_defaults(method, models, base, score, cache, tmp, prefix):
    per_model = {"weight": 1.0}  # mergekit requires a weight per model (no default)
    key = json.dumps([prefix, method, "defaults", "test"])

    def compute():
        out = os.path.join(tmp, "defaults")
        shutil.rmtree(out, ignore_errors=True)
        merge(method, models, base, out, {}, per_model)
        res = score(out, "test")
        shutil.rmtree(out, ignore_errors=True)
        return res
    test = cache.get(key, compute)
    return {"test": test, "test_mean": mean_acc(test)}


def awd_analysis(models, base):
    """What `mergekit-awd report` says about these task vectors (global sgd, defaults)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import cli

    config = MergeConfiguration.model_validate({
        "merge_method": "awd", "base_model": base,
        "models": [{"model": m} for m in models]})
    rep = cli.analyze(cli._collect(config, MergeOptions(quiet=True)))
    keys = ("mean_abs_cosine_before", "mean_abs_cosine_after", "delta_norm_relative",
            "delta_cosine_with_mean_task_vector", "advice", "cosine_before", "cosine_after")
    return {k: rep.get(k) for k in keys}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "awd-causal-lm"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pretrain-steps", type=int, default=2500)
    parser.add_argument("--instruct-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.makedirs(args.work, exist_ok=True)
    begin = time.perf_counter()
    sets = D.eval_sets(N_VAL, N_TEST)
    stages = Stages(args.work, D.held_out_inputs(sets),
                    {"pretrain": args.pretrain_steps, "instruct": args.instruct_steps,
                     "finetune": args.finetune_steps})
    score = Scorer(sets)
    cache = Cache(os.path.join(args.work, "scores.jsonl"))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"setup": {"seeds": seeds, "n_val": N_VAL, "n_test": N_TEST,
                         "steps": stages.steps, "methods": {k: list(v[:2]) + [list(v[3] or [])]
                                                             for k, v in METHODS.items()}},
               "stages": {}, "regimes": {}}
    for st in ("pretrained", "instruct"):
        path = getattr(stages, st)()
        results["stages"][st] = {t: 100 * sum(v) / len(v)
                                 for t, v in cache.get(json.dumps([st, "test"]),
                                                       lambda: score(path, "test")).items()}
        log(f"{st}: test exact match in the task formats {results['stages'][st]}")
    for regime in args.regimes.split(","):
        base_stage, ft_stage = REGIMES[regime]
        res = results["regimes"][regime] = {"seeds": {}}
        for seed in seeds:
            ft = stages.finetunes(ft_stage, seed)
            base = getattr(stages, base_stage)()
            prefix = f"{regime}|{seed}"
            r = res["seeds"][seed] = {"individual": {}, "methods": {}, "defaults": {}}
            for t, d in ft.items():
                r["individual"][t] = 100 * sum(cache.get(json.dumps([d, t, "test"]),
                                                         lambda: score(d, "test", [t]))[t]) / N_TEST
            log(f"[{regime} seed {seed}] individual fine-tunes: {r['individual']}")
            r["awd_report"] = cache.get(json.dumps([prefix, "report"]),
                                        lambda: awd_analysis(list(ft.values()), base))
            tmp = os.path.join(args.work, "tmp")
            for name in args.methods.split(","):
                t0 = time.perf_counter()
                r["methods"][name] = run_method(name, list(ft.values()), base, score, cache,
                                                tmp, prefix)
                m = r["methods"][name]
                log(f"[{regime} seed {seed}] {name}: {m['setting']} val {m['val']:.1f} "
                    f"test {m['test_mean']:.1f} ({len(m['grid'])} merges, "
                    f"{time.perf_counter() - t0:.0f}s)")
            for method in DEFAULTS:
                r["defaults"][method] = run_defaults(method, list(ft.values()), base, score,
                                                     cache, tmp, prefix)
            log(f"[{regime} seed {seed}] defaults: " + ", ".join(
                f"{k} {v['test_mean']:.1f}" for k, v in r["defaults"].items()))
    results["wall_s"] = time.perf_counter() - begin
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f)
    log(f"done in {results['wall_s']:.0f}s: {os.path.join(args.work, 'results.json')}")


if __name__ == "__main__":
    main()
