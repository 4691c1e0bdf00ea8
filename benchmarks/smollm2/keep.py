"""`tune --learn layer --keep` on SmolLM2-135M-Instruct, regime (a): does a learned merge
keep what the instruct model did, at what cost to its tasks?

    python benchmarks/smollm2/keep.py WORK [--seeds 1,0] [--weights 1,0.3,0.1]  # ~45 min a seed
    python benchmarks/smollm2/keep.py WORK --tables

WORK is the folder of benchmarks/smollm2/run.py (base/, data/, ft-inst-sSEED/; what is
missing is made). The general set: GENERAL, 120 prompts none of the four tasks touches,
answered by the instruct model (greedy, chat template; answers it did not end within
400 tokens are left out), split by position: even ones are `--keep` (prompts alone:
tune makes the reference answers itself, with the base model, which is the instruct
model here), odd ones are the report set, scored once on test as task `general`.

Per seed, tunes of task_arithmetic (the static choice: lambda searched, default
budget; then `--learn layer` from it, tune's defaults: 60 steps, --decide 0.25,
--holdout 0.25): one per `--keep keep-fit.jsonl --keep-weight W` and one without
--keep (the first run's record copied to the others, so the static search is the
same rows). Each scores on test, once: the static choice, the learned merge, and
`general` (the report set). The fine-tunes are scored on their own task's test
prompts (the 100% line). The weight is picked on validation alone (`chosen_weight`:
tune's step part and its own keep report part, never the test or the report set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make  # noqa: E402
import run  # noqa: E402

_COUNTRIES = ["France", "Japan", "Canada", "Egypt", "Brazil", "Italy", "Kenya", "Norway",
              "India", "Mexico", "Australia", "Spain"]
_CONCEPTS = ["photosynthesis", "gravity", "inflation", "democracy", "evolution",
             "a black hole", "the water cycle", "machine learning", "a vaccine",
             "supply and demand", "an ecosystem", "electricity"]
_TIPS = ["sleeping better", "learning a new language", "saving money", "staying focused",
         "cooking rice", "running a first marathon", "writing an email", "reducing stress",
         "keeping houseplants alive", "making friends in a new city"]
_POEMS = ["the sea", "autumn leaves", "a city at night", "the moon", "a quiet forest",
          "morning coffee", "a thunderstorm", "an old bridge", "snow", "a lighthouse"]
_PHRASES = [("good morning", "Spanish"), ("thank you", "French"), ("see you later", "German"),
            ("where is the station", "Italian"), ("I am hungry", "Spanish"),
            ("happy birthday", "French"), ("good night", "German"),
            ("how are you", "Portuguese"), ("welcome", "Italian"), ("excuse me", "Spanish")]
_OPPOSITES = ["ancient", "generous", "brave", "noisy", "shallow", "early", "fragile",
              "victory", "expand", "rare"]
_BOOKS = ["Romeo and Juliet", "Pride and Prejudice", "1984", "Don Quixote", "Hamlet",
          "The Odyssey", "War and Peace", "Moby-Dick", "Frankenstein", "Great Expectations"]
_HOWTO = ["boil an egg", "change a flat tire", "make a cup of tea", "tie a tie",
          "plant a tree", "start a budget", "clean a laptop screen", "fold a paper airplane",
          "brew coffee with a French press", "wash a wool sweater"]
_PETS = ["pet turtle", "goldfish", "black cat", "puppy", "parrot", "hamster"]
_WHY = ["is the sky blue", "do leaves change color in autumn", "do we have seasons",
        "is the ocean salty", "do cats purr", "does ice float", "do birds migrate",
        "do we dream", "does bread rise", "is exercise good for the heart"]
_JOBS = ["nurse", "librarian", "architect", "pilot", "chef", "electrician", "journalist",
         "firefighter", "pharmacist", "teacher"]
_WORDS = ["serendipity", "ephemeral", "resilient", "meticulous", "nostalgia", "candid",
          "benevolent", "ubiquitous", "frugal", "eloquent"]

GENERAL = (
    [f"What is the capital of {c}?" for c in _COUNTRIES]
    + [f"Explain {c} in one sentence." for c in _CONCEPTS]
    + [f"Give me two tips for {t}." for t in _TIPS]
    + [f"Write a short poem about {p}." for p in _POEMS]
    + [f"Translate '{p}' into {lang}." for p, lang in _PHRASES]
    + [f"What is the opposite of '{w}'?" for w in _OPPOSITES]
    + [f"Who wrote {b}?" for b in _BOOKS]
    + [f"How do I {h}?" for h in _HOWTO]
    + [f"Suggest a name for a {p}." for p in _PETS]
    + [f"Why {w}?" for w in _WHY]
    + [f"What does a {j} do?" for j in _JOBS]
    + [f"Define the word '{w}'." for w in _WORDS]
)


def general_sets(base: str, data: str, limit: int = 400) -> tuple:
    """keep-fit.jsonl (prompts alone) and general-report.jsonl (with the instruct
    model's answers), written once."""
    fit, report = os.path.join(data, "keep-fit.jsonl"), os.path.join(data, "general-report.jsonl")
    if os.path.exists(report):
        return fit, report
    import torch
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune as tune_mod

    tok = AutoTokenizer.from_pretrained(base)
    model = tune_mod.load_model(base)
    ends = evaluate.answer_ends(tok, base)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in GENERAL]
    with torch.no_grad():
        answers = evaluate.greedy_answers(model, prompts, ends, limit)
    lines_fit, lines_report = [], []
    for i, (prompt, answer) in enumerate(zip(GENERAL, answers)):
        if i % 2 == 0:
            lines_fit.append({"messages": [{"role": "user", "content": prompt}]})
        elif answer and answer[-1] in ends:
            text = tok.decode(answer, skip_special_tokens=True).strip()
            lines_report.append(make.messages(prompt, text))
        else:
            print(f"general: no end within {limit} tokens, left out: {prompt!r}")
    for path, lines in ((fit, lines_fit), (report, lines_report)):
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    return fit, report


def own_scores(models, data: str) -> dict:
    """Each fine-tune on its own task's test prompts."""
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune as tune_mod

    out = {}
    for task, folder in zip(make.TASKS, models):
        tok = AutoTokenizer.from_pretrained(folder)
        tasks = evaluate.load_tasks([f"{task}={data}/{task}.test.jsonl"], tok, folder)
        out[task] = run._keep(evaluate.score(tune_mod.load_model(folder), tasks))[task]
    return out


def tested(t: dict) -> dict:
    """The static choice's and the learned merge's test scores from a tune.json."""
    adopted = t["best_learned"] is not None
    learned = t["test"] if adopted else t["test_learned"][0]
    static = t["test_static"] if adopted else t["test"]
    summary = t["learned"][0]
    return {"static": run._keep(static["scores"]), "learned": run._keep(learned["scores"]),
            "static_label": static["candidate"], "adopted": adopted,
            "decision": {k: v for k, v in t["decision"].items() if k in (
                "difference", "ci95", "adopted", "why_not", "keep")},
            "step_kept": summary["step_kept"], "fit_seconds": summary["fit_seconds"],
            "held_out": summary["held_out"], "static_held_out": summary["static_held_out"],
            "keep_val": (summary.get("keep") or {}).get("loss"),
            "static_keep_val": summary.get("static_keep_loss"),
            "learn_seconds": summary["seconds"], "keep_loss": summary.get("keep"),
            "seconds": t["process_seconds"]}


def one_seed(work: str, seed: int, weights, results: dict, save, variant: str = "") -> None:
    """The tunes of one seed; ``variant`` names runs of another version of the keep
    term (their names and folders get it; the static search's record is reused)."""
    base, data = os.path.join(work, "base"), os.path.join(work, "data")
    make.make_base(base)
    held = make.write_data(data, 200)
    run._trim_val(data, 100)
    fit, report = general_sets(base, data)
    models = []
    for i, task in enumerate(make.TASKS):
        path = os.path.join(work, f"ft-inst-s{seed}", task)
        make.fine_tune(base, path, task, held[task], 25, 8, 5e-5, seed=seed * 100 + i)
        models.append(path)
    entry = results.setdefault(f"s{seed}", {})
    if "own" not in entry:
        entry["own"] = own_scores(models, data)
        save()
    folder = os.path.join(work, "keep", f"s{seed}")
    os.makedirs(folder, exist_ok=True)
    recipe = run.recipe(base, models, os.path.join(folder, "recipe.yml"))
    common = ["--methods", "task_arithmetic", "--learn", "layer"]
    first = os.path.join(folder, f"keep-w{weights[0]:g}{variant}")
    if variant:
        first = os.path.join(folder, "no-keep")  # the record to reuse
    # a variant reuses the run without --keep's static search: that run goes first
    for weight in [None, *weights] if variant else [*weights[:1], None, *weights[1:]]:
        name = "no keep" if weight is None else f"keep w={weight:g}{variant}"
        out = os.path.join(folder, "no-keep" if weight is None
                           else f"keep-w{weight:g}{variant}")
        if out != first and not os.path.exists(os.path.join(out, "record.jsonl")):
            os.makedirs(out, exist_ok=True)  # the same static search, reused
            shutil.copy(os.path.join(first, "record.jsonl"), out)
        extra = [] if weight is None else ["--keep", fit, "--keep-weight", str(weight)]
        t = run.tune(recipe, data, out, common + extra, general=os.path.basename(report))
        fresh = name not in entry
        entry[name] = tested(t)  # (a finished tune is read back, not run again)
        save()
        if fresh:
            print(f"s{seed} {name}: {_line(entry[name])}", flush=True)


def _mean(scores: dict) -> float:
    return sum(scores[t]["exact"] for t in make.TASKS) / len(make.TASKS)


def _line(e: dict) -> str:
    return (f"static {100 * _mean(e['static']):.1f} general {e['static']['general']['loss']:.3f}; "
            f"learned {100 * _mean(e['learned']):.1f} general "
            f"{e['learned']['general']['loss']:.3f} (step {e['step_kept']}, fit "
            f"{e['fit_seconds']:.0f} s, adopted {e['adopted']})")


def chosen_weight(e: dict, weights) -> float:
    """The weight validation alone picks: the best held-out task score (tune's step
    part) among the weights whose keep loss on tune's own keep report part is no
    higher than the static choice's; the largest weight where none is."""
    ok = [w for w in weights if e[f"keep w={w:g}"]["keep_val"]
          <= e[f"keep w={w:g}"]["static_keep_val"]]
    if not ok:
        return max(weights)
    return max(ok, key=lambda w: (e[f"keep w={w:g}"]["held_out"]["exact"], w))


def tables(results: dict, weights) -> None:
    from mergekit_awd import evaluate

    keeps = [f"keep w={w:g}" for w in weights]
    seeds = sorted(k for k in results if k.startswith("s")
                   and all(x in results[k] for x in ["no keep", *keeps]))
    if not seeds:
        print("no seed has every run yet")
        return
    first = results[seeds[0]][keeps[0]]
    rows = [("fine-tunes (each on its own task)", lambda e: e["own"], None),
            ("static choice (task_arithmetic, lambda searched)", lambda e: e[keeps[0]]["static"],
             None),
            ("learned per layer, no --keep", lambda e: e["no keep"]["learned"], "no keep")]
    rows += [(f"learned per layer, --keep-weight {w:g}",
              lambda e, k=k: e[k]["learned"], k) for w, k in zip(weights, keeps)]
    others = sorted({k for s in seeds for k in results[s] if k.startswith("keep w=")
                     and k not in keeps})  # --variant runs
    rows += [(f"learned per layer, {k}", lambda e, k=k: e[k]["learned"], k) for k in others]
    print(f"test exact match (%), {len(seeds)} seed(s): {', '.join(seeds)}; general = loss on "
          f"the instruct model's answers to {len(first['static']['general']['loss_each'])} general "
          f"prompts that no fit saw (lower keeps more of the instruct model)\n")
    print("| merge | seed | " + " | ".join(make.TASKS) + " | mean | % of fine-tunes | "
          "general loss | fit s | adopted by tune |")
    print("|---|---|" + "---:|" * (len(make.TASKS) + 5))
    for label, get, key in rows:
        for s in seeds:
            e, own = results[s], _mean(results[s]["own"])
            if key is not None and key not in e:
                continue
            sc = get(e)
            general = f"{sc['general']['loss']:.3f}" if "general" in sc else "-"
            fit_s = f"{e[key]['fit_seconds']:.0f}" if key else "-"
            adopted = str(e[key]["adopted"]) if key else "-"
            print(f"| {label} | {s} | " + " | ".join(f"{100 * sc[t]['exact']:.1f}"
                                                      for t in make.TASKS)
                  + f" | {100 * _mean(sc):.1f} | {100 * _mean(sc) / own:.0f}% | {general} | "
                  f"{fit_s} | {adopted} |")
    for label, get, key in rows[1:]:
        have = [s for s in seeds if key is None or key in results[s]]
        got = sum(_mean(get(results[s])) for s in have) / len(have)
        own = sum(_mean(results[s]["own"]) for s in have) / len(have)
        print(f"pooled over {', '.join(have)}: {label}: {100 * got:.1f} = "
              f"{100 * got / own:.1f}% of the fine-tunes ({100 * own:.1f})")
    if len(weights) > 1:
        print("\nthe weight validation picks (tune's step part and keep report part only): "
              + ", ".join(f"{s} {chosen_weight(results[s], weights):g}" for s in seeds))
    print("validation per weight (held-out exact at the kept step; keep loss on tune's keep "
          "report part, static's in brackets):")
    for s in seeds:
        for w, k in zip(weights, keeps):
            e = results[s][k]
            print(f"  {s} w={w:g}: held-out {e['held_out']['exact']:.3f} (static "
                  f"{e['static_held_out']['exact']:.3f}), keep {e['keep_val']:.3f} "
                  f"[{e['static_keep_val']:.3f}]")
        e = results[s]["no keep"]
        print(f"  {s} no keep: held-out {e['held_out']['exact']:.3f}")
    print("\npaired test differences, pooled over seeds (each seed a stratum, examples "
          "resampled within it; 95% bootstrap):\n")
    print("| difference | task exact (points) | 95% CI | general loss | 95% CI |")
    print("|---|---:|---|---:|---|")
    pairs = [(f"--keep-weight {w:g} - static", k, "learned", keeps[0], "static")
             for w, k in zip(weights, keeps)]
    pairs += [(f"--keep-weight {w:g} - no keep", k, "learned", "no keep", "learned")
              for w, k in zip(weights, keeps)]
    pairs += [("no keep - static", "no keep", "learned", keeps[0], "static")]
    pairs += [(f"{k} - static", k, "learned", keeps[0], "static") for k in others]
    pairs += [(f"{k} - no keep", k, "learned", "no keep", "learned") for k in others]
    for label, ka, pa, kb, pb in pairs:
        have = [s for s in seeds if ka in results[s]]
        for part in ([have] + ([[s] for s in have] if len(have) > 1 else [])):
            cells = []
            for metric, tasks, scale in (("exact", make.TASKS, 100), ("loss", ("general",), 1)):
                a = {f"{s}/{t}": results[s][ka][pa][t][f"{metric}_each"] for s in part
                     for t in tasks}
                b = {f"{s}/{t}": results[s][kb][pb][t][f"{metric}_each"] for s in part
                     for t in tasks}
                d, lo, hi = evaluate.paired_interval(a, b)
                cells.append(f"{scale * d:+.3f} | [{scale * lo:+.3f}, {scale * hi:+.3f}]")
            print(f"| {label} ({', '.join(part)}) | " + " | ".join(cells) + " |")
    print("\nfit seconds (60 steps, the same 7 evaluations; a run with other work beside it "
          "is slower):")
    for s in seeds:
        base = results[s]["no keep"]["fit_seconds"]
        print(f"  {s}: no keep {base:.0f} s; " + ", ".join(
            f"{k} {results[s][k]['fit_seconds']:.0f} s "
            f"({results[s][k]['fit_seconds'] / base:.2f}x)"
            for k in (*keeps, *others) if k in results[s]))
    for s in seeds:
        for key in (*keeps, *others, "no keep"):
            if key not in results[s]:
                continue
            d = results[s][key]["decision"]
            print(f"{s} {key}: tune's decision learned - static {d['difference']:+.4f} "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], adopted {d['adopted']}"
                  + (f" ({d['why_not']})" if "why_not" in d else "")
                  + (f"; keep loss {d['keep']['difference']:+.4f} [{d['keep']['ci95'][0]:+.4f}, "
                     f"{d['keep']['ci95'][1]:+.4f}]" if "keep" in d else ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--seeds", default="1,0")
    parser.add_argument("--weights", default="1,0.3,0.1",
                        help="--keep-weight values, the first one's record shared")
    parser.add_argument("--variant", default="",
                        help="a suffix for the keep runs of another version of the keep term")
    parser.add_argument("--tables", action="store_true")
    args = parser.parse_args()
    path = os.path.join(args.work, "keep_results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    weights = [float(w) for w in args.weights.split(",")]

    def save():
        with open(path, "w") as f:
            json.dump(results, f)

    if not args.tables:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        began = time.time()
        for seed in (int(s) for s in args.seeds.split(",")):
            one_seed(args.work, seed, weights, results, save, args.variant)
        print(f"done in {time.time() - began:.0f} s")
    tables(results, weights)


if __name__ == "__main__":
    main()
