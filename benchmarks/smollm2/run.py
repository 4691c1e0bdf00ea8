"""Real-LLM quality benchmark: SmolLM2-135M-Instruct fine-tunes merged, settings chosen by
`mergekit-awd tune` on validation, test reported once.

    python benchmarks/smollm2/run.py WORK [--seeds 0,1] [--steps 25]   # ~1 h a seed on 2 CPU cores
    python benchmarks/smollm2/run.py WORK --tables                       # tables from results

Regimes (four chat tasks, each with its own answer format, benchmarks/smollm2/make.py):
  a        fine-tunes of the instruct model, merged with it as base_model
  b-inst   fine-tunes of a shared extra stage (terse answers to four other tasks),
           merged over the instruct model (the stage is part of every task vector)
  b-stage  the same fine-tunes merged over the stage checkpoint
Per (regime, seed): one `mergekit-awd tune` of the four static methods (METHODS), each
with its lambda searched within the same --budget of validation evaluations; tune
chooses on validation and scores on test, once, its choice, each other method's best
and the recipe as written (awd at its defaults). Then `tune --learn layer|model` for
awd and task_arithmetic, each from its method's static choice: fitted on 75% of the
validation prompts, the step kept on the other 25%, test scored once. Every stage is
cached in WORK (a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make  # noqa: E402

# the static methods: tune's default four, each with its lambda searched (no grid), the
# same --budget of validation evaluations per method; awd and awd_ties search at
# keep_delta 0 and 1 (two settings sharing the budget), ties and awd_ties at tune's
# default density (0.5)
METHODS = ("task_arithmetic", "ties", "awd", "awd_ties")
STATIC_ARGS = ("--keep-delta", "0,1")
GENERAL_PROMPTS = [
    "What is the capital of France?", "Give me two tips for sleeping better.",
    "Write a haiku about the sea.", "What does a CPU do?",
    "Explain photosynthesis in one sentence.", "Name three primary colors.",
    "How do I boil an egg?", "What is the opposite of 'ancient'?",
    "Suggest a name for a pet turtle.", "Why is the sky blue?",
    "Translate 'good morning' into Spanish.", "What is 12 times 12?",
    "Write a short greeting for a birthday card.", "What is a noun?",
    "List two benefits of exercise.", "Who wrote Romeo and Juliet?",
]


def general_answers(base: str, path: str, limit: int = 400) -> None:
    """The instruct model's own greedy answers: what a merge should keep of it. Only
    answers the model ended itself within ``limit`` tokens are kept (the score charges
    the end token: a cut answer would charge one the model never produced)."""
    if os.path.exists(path):
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with open(path, "w") as f:
        for prompt in GENERAL_PROMPTS:
            msgs = [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=limit, do_sample=False)
            new = out[0, ids.shape[1]:].tolist()
            if tok.eos_token_id not in new:
                print(f"general: no end within {limit} tokens, left out: {prompt!r}")
                continue
            answer = tok.decode(new, skip_special_tokens=True).strip()
            f.write(json.dumps(make.messages(prompt, answer)) + "\n")


def recipe(base: str, models, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump({"merge_method": "awd", "base_model": base, "dtype": "float32",
                        "models": [{"model": m} for m in models]}, f)
    return path


def tune(recipe_path: str, data: str, out: str, args, general: str = "general.jsonl") -> dict:
    """One `mergekit-awd tune` run (its progress in OUT/tune.log): choose on
    validation, score the choice and what it is compared with once on test. A run
    that stopped is continued by tune itself (OUT/record.jsonl); a finished one is
    read back."""
    result = os.path.join(out, "tune.json")
    if os.path.exists(result):
        with open(result) as f:
            done = json.load(f)
        if "process_seconds" in done:  # written below, once the command finished
            return done
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-awd"), "tune",
               recipe_path, "--out", out, *args]
    for task in make.TASKS:
        command += ["--data", f"{task}={data}/{task}.val.jsonl",
                    "--test", f"{task}={data}/{task}.test.jsonl"]
    command += ["--test", f"general={data}/{general}"]
    os.makedirs(out, exist_ok=True)
    began = time.time()
    with open(os.path.join(out, "tune.log"), "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(result) as f:
        out_json = json.load(f)
    out_json["process_seconds"] = time.time() - began
    with open(result, "w") as f:
        json.dump(out_json, f)
    return out_json


def _keep(scores: dict) -> dict:
    return {k: {m: v[m] for m in ("exact_each", "exact", "loss", "loss_each") if m in v}
            for k, v in scores.items()}


def static(t: dict) -> dict:
    """What the tables need of the static tune: every candidate's validation scores,
    the choice, and the test scores of everything tune scored on test (the choice,
    each other method's best, the recipe as written)."""
    tested = {t["test"]["candidate"]: _keep(t["test"]["scores"])}
    for c in t["comparisons"]:
        tested[c["other"]] = _keep(c["test_scores"])
    rows = [{"candidate": r["candidate"], "method": r["method"], "settings": r["settings"],
             "as_written": bool(r.get("as_written")), "error": r.get("error"),
             "val": r["mean"], "val_scores": _keep(r["scores"]),
             "form_seconds": r.get("form_seconds"), "score_seconds": r.get("score_seconds")}
            for r in t["candidates"]]
    return {"candidates": rows, "best": t["best"], "tested": tested,
            "lambda_search": t["lambda_search"], "budget": t["budget"],
            "gram_seconds": t["gram_seconds"], "seconds": t["process_seconds"]}


def score_folder(folder: str, data: str) -> dict:
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune as tune_mod

    tok = AutoTokenizer.from_pretrained(folder)
    specs = [f"{t}={data}/{t}.test.jsonl" for t in make.TASKS] + [f"general={data}/general.jsonl"]
    tasks = evaluate.load_tasks(specs, tok, folder)
    return evaluate.score(tune_mod.load_model(folder), tasks)


# learned coefficients (`tune --learn KIND`), each from its method's static choice
LEARNABLE = ("awd", "task_arithmetic")


def learned(entry: dict, path: str, data: str, folder: str, method: str, kind: str,
            learn_args) -> dict:
    """`tune --learn KIND` from the method's validation choice in the static tune: the
    learned merge's test scores (scored once, whether or not tune keeps it)."""
    import tables

    start = tables.chosen(entry, method)["settings"]
    args = ["--methods", method, "--lambda", f"{start['lambda']:g}", "--learn", kind,
            *learn_args]
    if "keep_delta" in start:
        args += ["--keep-delta", f"{start['keep_delta']:g}"]
    t = tune(path, data, os.path.join(folder, f"{method}-learned-{kind}"), args)
    (summary,) = t["learned"]
    kept = t["best_learned"] is not None
    test = t["test"] if kept else t["test_learned"][0]
    summary = {k: v for k, v in summary.items() if k != "history"} | {
        "held_out_path": [(h["step"], h["held_out"]) for h in summary["history"]]}
    return {"settings": {"from": t["candidates"][0]["candidate"]}, "summary": summary,
            "kept_by_tune": kept, "process_seconds": t["process_seconds"],
            "test": _keep(test["scores"])}


def run(work: str, seeds, steps: int, n: int, n_val: int, regimes=("a",),
        learn_args=(), budget: int = 12, learned_kinds=("layer", "model"),
        learn_seeds=None) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    base = os.path.join(work, "base")
    make.make_base(base)
    data = os.path.join(work, "data")
    held = make.write_data(data, n)
    _trim_val(data, n_val)
    general_answers(base, os.path.join(data, "general.jsonl"))
    stage = os.path.join(work, "stage")
    if any(r.startswith("b") for r in regimes):
        make.fine_tune(base, stage, "stage", set().union(*held.values()), 2 * steps, 8, 5e-5,
                       seed=999, tasks=make.STAGE_TASKS)
    results_path = os.path.join(work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    def fine_tunes(origin, seed):
        start_from = base if origin == "inst" else stage
        out = []
        for i, task in enumerate(make.TASKS):
            path = os.path.join(work, f"ft-{origin}-s{seed}", task)
            make.fine_tune(start_from, path, task, held[task], steps, 8, 5e-5,
                           seed=seed * 100 + i)
            out.append(path)
        return out

    # regime (a) of every seed first: it is the one the README leads with
    order = [(seed, r) for r in ("a",) if r in regimes for seed in seeds] + [
        (seed, r) for seed in seeds for r in ("b-inst", "b-stage") if r in regimes]
    def save():
        with open(results_path, "w") as f:
            json.dump(results, f)

    def prepare(seed, regime):
        merge_base = stage if regime == "b-stage" else base
        models = fine_tunes("inst" if regime == "a" else "stage", seed)
        entry = results.setdefault(f"{regime}/s{seed}", {})
        folder = os.path.join(work, "tune", regime, f"s{seed}")
        os.makedirs(folder, exist_ok=True)
        path = recipe(merge_base, models, os.path.join(folder, "recipe.yml"))
        if "individual" not in entry:
            cache = results.setdefault("folders", {})
            for m in [*models, merge_base]:
                if m not in cache:
                    cache[m] = _keep(score_folder(m, data))
            entry["individual"] = {os.path.basename(m): cache[m] for m in models}
            entry["base"] = cache[merge_base]
            save()
        return entry, path, folder

    # seed by seed: the static tune, then the learned fits (layer first); a run stopped
    # early has whole seeds
    for seed, regime in order:
        entry, path, folder = prepare(seed, regime)
        if "static" not in entry:
            t = tune(path, data, os.path.join(folder, "static"),
                     ["--methods", ",".join(METHODS), "--budget", str(budget),
                      *STATIC_ARGS])
            entry["static"] = static(t)
            save()
            st = entry["static"]
            chosen = st["candidates"][st["best"]]
            print(f"{regime}/s{seed} static: {chosen['candidate']} val "
                  f"{chosen['val']['exact']:.3f} test "
                  f"{_task_mean(st['tested'][chosen['candidate']]):.3f} "
                  f"({len(st['candidates'])} candidates, {st['seconds']:.0f} s; "
                  f"{time.time() - start:.0f} s)", flush=True)
        if learn_seeds is not None and seed not in learn_seeds:
            continue
        for kind in learned_kinds:
            for method in LEARNABLE:
                name = f"{method}/learned-{kind}"
                if name in entry:
                    continue
                entry[name] = learned(entry, path, data, folder, method, kind, learn_args)
                save()
                s = entry[name]["summary"]
                print(f"{regime}/s{seed} {name}: kept step {s['step_kept']}, held-out "
                      f"{s['held_out']['exact']:.3f} test "
                      f"{_task_mean(entry[name]['test']):.3f} (fit {s['seconds']:.0f} s, "
                      f"peak {s['peak_rss_gib']:.1f} GiB, process "
                      f"{entry[name]['process_seconds']:.0f} s; "
                      f"{time.time() - start:.0f} s)", flush=True)
    print(f"done in {time.time() - start:.0f} s")


def _trim_val(data: str, n_val: int) -> None:
    """Validation uses the first n_val prompts of each task (test keeps all n)."""
    for task in make.TASKS:
        path = os.path.join(data, f"{task}.val.jsonl")
        with open(path) as f:
            lines = f.readlines()
        with open(path, "w") as f:
            f.writelines(lines[:n_val])


def _task_mean(test: dict) -> float:
    return sum(test[t]["exact"] for t in make.TASKS) / len(make.TASKS)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--n", type=int, default=200, help="test prompts per task")
    parser.add_argument("--n-val", type=int, default=100, help="validation prompts per task")
    parser.add_argument("--regimes", default="a", help="a, b-inst, b-stage (comma-separated)")
    parser.add_argument("--learn-args", default="",
                        help="extra `tune --learn` options, e.g. '--learn-steps 80'")
    parser.add_argument("--budget", type=int, default=12,
                        help="validation evaluations per method (tune --budget)")
    parser.add_argument("--learned", default="layer,model",
                        help="which --learn kinds to run from the static choices ('' for none)")
    parser.add_argument("--learn-seeds", default=None,
                        help="seeds that get the learned fits (default: every seed)")
    parser.add_argument("--tables", action="store_true")
    args = parser.parse_args()
    if args.tables:
        import tables

        tables.main(os.path.join(args.work, "results.json"))
        return
    run(args.work, [int(s) for s in args.seeds.split(",")], args.steps, args.n, args.n_val,
        tuple(args.regimes.split(",")), tuple(args.learn_args.split()), args.budget,
        tuple(k for k in args.learned.split(",") if k),
        None if args.learn_seeds is None else [int(x) for x in args.learn_seeds.split(",")])


if __name__ == "__main__":
    main()
