"""`mergekit-awd`: report, sweep and merge, with mergekit-yaml's options and conventions."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, List, Optional

import click
import yaml

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_awd  # noqa: F401  (registers the methods)
from mergekit_awd import context, evaluate, mergekit_run, params, report, scope, tune
from mergekit_awd import learn as learn_mod
from mergekit_awd.params import AWDParameterError
from mergekit_awd.scope import AWD_METHODS


@click.group("mergekit-awd")
def main():
    """Adaptive Weight Disentanglement for mergekit: see what it does, tune it, merge."""


def _load(config_file: str):
    with open(config_file, "r", encoding="utf-8") as f:
        source = f.read()
    return MergeConfiguration.model_validate(yaml.safe_load(source)), source


def _collect(config: MergeConfiguration, options: MergeOptions) -> scope.Collected:
    """Plan the recipe as mergekit-yaml would and run the Gram pass over its tasks."""
    if config.merge_method not in AWD_METHODS:
        raise click.UsageError(
            f"{config.merge_method!r} is not an AWD method; use one of {', '.join(AWD_METHODS)}"
        )
    collected = scope.collect_tasks(context.RunContext(options=options), config.merge_method,
                                    _planned(config, options), options.device, "cpu")
    if not collected.tensors:
        raise click.UsageError("the recipe's select: selects no tensor")
    return collected


def _planned(config: MergeConfiguration, options: MergeOptions) -> list:
    """The recipe's tensor tasks as mergekit-yaml plans them; a clear error for none."""
    tasks = mergekit_run.plan_tensor_tasks(config, options)
    if not tasks:
        raise click.UsageError(
            "mergekit planned no tensor at all for this recipe (it would write a model "
            "with no weights): mergekit has no definition of this architecture and "
            "none of the weight names it inferred is in the checkpoints"
        )
    return tasks


def analyze(collected: scope.Collected, **overrides) -> Dict:
    """The report of the recipe's solve(s) (one global, or one per tensor)."""
    s = collected.settings.replace(**overrides)
    run = context.RunContext()
    if s.scope == "global":
        parts = [collected]
    else:
        parts = [dataclasses.replace(collected, tensors=[t]) for t in collected.tensors]
    for part in parts:
        run.solve(collected.models, s, [t.name for t in part.tensors], part.G, part.numel,
                  [t.taus for t in part.tensors if t.taus is not None])
    return run.log.report()


@main.command("report", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.option("--out", "out_dir", default="awd-report", show_default=True,
              help="folder for awd_report.json and the PNGs")
@add_merge_options
def report_command(merge_options: MergeOptions, config_file: str, out_dir: str):
    """Run only the Gram pass and the solver of a recipe; write a report, no model."""
    merge_options.apply_global_options()
    config, _ = _load(config_file)
    start = time.perf_counter()
    rep = analyze(_collect(config, merge_options))
    rep["seconds"] = time.perf_counter() - start
    paths = report.write(rep, out_dir)
    click.echo(report.table(rep))
    click.echo(f"report: {', '.join(paths)}")


def _floats(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}")


@main.command("sweep", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.option("--alpha", "alphas", help="comma-separated alpha values (default: the recipe's)")
@click.option("--lambda", "lambdas", help="comma-separated lambda values (default: the recipe's)")
@click.option("--merge-to", "merge_to", default=None,
              help="write one merged model per setting under this folder")
@add_merge_options
def sweep_command(merge_options: MergeOptions, config_file: str, alphas, lambdas,
                  merge_to: Optional[str]):
    """One Gram pass, one solve per alpha: a table of cosines, ||delta|| and coefficients."""
    merge_options.apply_global_options()
    config, _ = _load(config_file)
    collected = _collect(config, merge_options)
    alphas = _floats(alphas) or [collected.settings.alpha]
    lambdas = _floats(lambdas) or [collected.settings.lam]
    click.echo(f"{'alpha':>10s} {'lambda':>7s} {'mean|cos| after':>16s} "
               f"{'||delta||rel':>12s}  lambda * coefficients")
    rows = []
    for alpha in alphas:
        rep = analyze(collected, alpha=alpha)
        for lam in lambdas:
            coefs = rep["coefficients"]
            shown = "element-wise" if coefs is None else " ".join(f"{lam * c:.3f}" for c in coefs)
            click.echo(f"{alpha:10.4g} {lam:7.3g} {rep['mean_abs_cosine_after']:16.4f} "
                       f"{rep['delta_norm_relative']:12.4f}  {shown}")
            rows.append((alpha, lam))
    click.echo(f"(mean |cos| before: {rep['mean_abs_cosine_before']:.4f})")
    if merge_to:
        for alpha, lam in rows:
            out = os.path.join(merge_to, f"alpha{alpha:g}_lambda{lam:g}")
            cfg = tune.candidate_config(config, tune.Candidate(
                config.merge_method, (("lambda", lam), ("alpha", alpha))))
            context.run_merge(cfg, out, merge_options, source=cfg.to_yaml())
            click.echo(f"merged: {out}")


@main.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def merge_command(merge_options: MergeOptions, config_file: str, out_path: str):
    """`mergekit-yaml` with the plugin loaded explicitly, plus the awd report."""
    merge_options.apply_global_options()
    config, source = _load(config_file)
    context.run_merge(config, out_path, merge_options, source=source)


def _knob_options(command):
    """One ``--NAME`` option per tune knob (``params.TUNABLE``)."""
    for p in reversed(params.TUNABLE):
        if p.tune == ():
            default = "the recipe's"
        else:
            default = ",".join(f"{x:g}" for x in p.tune)
            default = f"the recipe's, else {default}" if p.tune_recipe_first else default
        where = " for methods that sparsify" if p.per_model else (
            " for AWD methods" if p.role == "solver" or p.tune == () else "")
        command = click.option(f"--{p.name.replace('_', '-')}", p.name, default=None,
                               help=f"comma-separated {p.name} values{where} "
                                    f"(default: {default})")(command)
    return command


def _knob_values(p, given: Optional[str], config) -> List[Optional[float]]:
    """The values ``--NAME`` gives, else the knob's default ones: the recipe's value
    where it sets one (None: its per-model values, kept as they are)."""
    if given is not None:
        return _floats(given)
    recipe = (config.parameters or {}).get(p.name)
    if recipe is not None and (p.tune == () or p.tune_recipe_first):
        return [recipe] if isinstance(recipe, (int, float)) else [None]  # a filter/gradient
    if p.per_model and p.tune_recipe_first and any(
            p.name in (m.parameters or {}) for m in config.models or []):
        return [None]
    return list(p.tune) or [p.default]


@main.command("tune", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.option("--data", "data", multiple=True, required=True,
              help="held-out JSONL that chooses the setting: name=path or path; repeat "
                   "for several tasks (scores are averaged over tasks)")
@click.option("--test", "test", multiple=True,
              help="test JSONL (name=path): the chosen setting is scored once, never used "
                   "to choose")
@click.option("--methods", default=None,
              help="comma-separated merge methods to compare (default: the recipe's, "
                   "task_arithmetic, ties, awd, awd_ties; with --learn: the recipe's if "
                   "it can be learned, and task_arithmetic)")
@_knob_options
@click.option("--budget", type=int, default=None,
              help=f"evaluations per method for the lambda search when --lambda is not "
                   f"given, shared by the method's settings (default: "
                   f"{tune.PER_SETTING} per setting)")
@click.option("--metric", type=click.Choice(["exact", "loss", "entropy"]), default=None,
              help="the score that chooses: exact match of the greedy answer (higher is "
                   "better), mean completion loss or, for prompts without completions, "
                   "the entropy of the model's own answers (lower is better). Default: "
                   "exact, or entropy when some example has no completion")
@click.option("--eval-cmd", "eval_cmd", default=None,
              help="score each candidate with this command instead: '{model}' is replaced "
                   "by the merged model's folder; the last line of its output must be one "
                   "number, higher is better")
@click.option("--learn", type=click.Choice(learn_mod.KINDS), default=None,
              help="also learn one coefficient per input model (model) or per model and "
                   "layer (layer) on --data, starting from each method's best static "
                   "candidate (awd and task_arithmetic)")
@click.option("--objective", type=click.Choice(["loss", "entropy"]), default=None,
              help="what --learn minimises: the completion loss (default when every "
                   "example has a completion) or the entropy of the model's own answers "
                   "(AdaMerging's; prompts alone suffice)")
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="fraction of each --data task held out from --learn's fit: it picks "
                   "the step to keep and decides learned vs static")
@click.option("--learn-steps", type=int, default=60, show_default=True,
              help="--learn: optimizer steps")
@click.option("--learn-lr", type=float, default=0.05, show_default=True,
              help="--learn: Adam's learning rate for the coefficients")
@click.option("--learn-batch", type=int, default=8, show_default=True,
              help="--learn: examples per step (round-robin over tasks)")
@click.option("--eval-every", type=int, default=10, show_default=True,
              help="--learn: steps between held-out evaluations")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="length limit of the model's own answers (entropy)")
@click.option("--out", "out_dir", default="awd-tune", show_default=True,
              help="folder for tune.json, tune-lambda.svg and best.yml")
@click.option("--merge-to", "merge_to", default=None,
              help="write the chosen setting's merged model here (reusing the Gram pass)")
@click.option("--max-memory", "max_memory", type=float, default=None,
              help="GiB allowed for forming candidates in memory and for --learn "
                   "(default: 70%% of the memory available); over it, each candidate is "
                   "written to a temporary folder, and --learn is refused")
@click.option("--batch-tokens", "batch_tokens", type=int, default=4096, show_default=True,
              help="tokens per scoring batch")
@add_merge_options
def tune_command(merge_options: MergeOptions, config_file: str, data, test, methods,
                 budget, metric, eval_cmd, learn, objective, holdout, learn_steps, learn_lr,
                 learn_batch, eval_every, max_new_tokens, out_dir, merge_to, max_memory,
                 batch_tokens, **knobs):
    """Choose lambda, alpha, keep_delta (and the method) on your own held-out data.

    Every candidate is the recipe with those values replaced; the winner is written
    as best.yml, ready for mergekit-yaml. With --learn, coefficients per model (and
    layer) are learned on the data too, and written as learned.yml.
    """
    merge_options.apply_global_options()
    config, _ = _load(config_file)
    learning = None
    if learn:
        learning = learn_mod.Learning(learn, objective, holdout, learn_steps, learn_lr,
                                      learn_batch, eval_every)
    try:
        _tune(config, merge_options, data=data, test=test, methods=methods,
              knobs={p.name: knobs[p.name] for p in params.TUNABLE}, metric=metric,
              eval_cmd=eval_cmd, out_dir=out_dir, merge_to=merge_to, max_memory=max_memory,
              batch_tokens=batch_tokens, learning=learning, max_new_tokens=max_new_tokens,
              budget=budget)
    except (evaluate.AWDDataError, AWDParameterError) as error:
        raise click.ClickException(str(error))


def _tune(config, options, *, data, test, methods, knobs, metric, eval_cmd, out_dir,
          merge_to, max_memory, batch_tokens, learning=None, max_new_tokens=64,
          budget=None):
    import json
    import shlex
    import subprocess
    import sys

    from transformers import AutoTokenizer

    if config.base_model is None:
        raise click.UsageError("tune compares task-vector merges: the recipe needs base_model")
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise click.UsageError("tune scores with the base model's tokenizer: remove "
                               "tokenizer_source/tokenizer from the recipe to tune it")
    if config.base_model.lora is not None:
        raise click.UsageError("tune loads base_model as the model to score: give it "
                               "without a LoRA adapter")
    if eval_cmd and test:
        raise click.UsageError("--test is scored by the built-in scorer; with --eval-cmd, "
                               "run your evaluator on the merge of best.yml (--merge-to)")
    if learning is not None:
        learning.check()
        if eval_cmd:
            raise click.UsageError("--learn fits and stops on the built-in scores; it "
                                   "cannot be combined with --eval-cmd")
        if config.slices or config.modules:
            raise click.UsageError("--learn writes per-model weights into a 'models:' "
                                   "recipe; this recipe has slices/modules")
    base_path = str(config.base_model.model.path)
    recipe_method = config.merge_method
    if methods:
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
    elif learning is not None:
        method_list = list(dict.fromkeys(
            [m for m in (recipe_method, "task_arithmetic") if m in learn_mod.LEARNABLE]))
    else:
        method_list = list(dict.fromkeys([recipe_method, *tune.DEFAULT_METHODS]))
    if learning is not None:
        learn_mod.refuse_unlearnable(method_list)
    values = {p.name: _knob_values(p, knobs[p.name], config) for p in params.TUNABLE}
    searched = knobs["lambda"] is None  # --lambda: an exact grid; else a search
    plan = tune.plan(method_list, values, searched, budget)
    left_out = tune.check_methods(config, method_list, options, given=bool(methods))
    plan = [(m, settings, per) for m, settings, per in plan if m not in left_out]
    method_list = [m for m in method_list if m not in left_out]
    candidates = [c for _, settings, _ in plan for c in settings]

    remote = bool(getattr(options, "trust_remote_code", False))
    revision = config.base_model.model.revision
    tokenizer = AutoTokenizer.from_pretrained(base_path, revision=revision,
                                              trust_remote_code=remote)
    # prompts alone only where entropy was asked for (elsewhere a missing completion
    # is a mistake, named as one)
    prompts_only = metric == "entropy" or (learning is not None
                                           and learning.objective == "entropy")
    tasks = evaluate.load_tasks(data, tokenizer, base_path, need_answers=not prompts_only)
    complete = all(a is not None for t in tasks for _, a in t.examples)
    if metric is None:
        metric = "exact" if complete else "entropy"
    if metric != "entropy" and not complete:
        where = next(t.path for t in tasks if any(a is None for _, a in t.examples))
        raise evaluate.AWDDataError(
            f"{where}: some examples have no completion, which --metric {metric} needs; "
            f"give --metric entropy to score prompts alone")
    if learning is not None:
        learning.objective = learning.objective or "loss"
    test_tasks = evaluate.load_tasks(test, tokenizer, base_path) if test else []
    end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    device = options.device or "cpu"
    # the model that scores in-process (none where nothing is scored in-process)
    model = None if eval_cmd else tune.load_model(base_path, device, revision, remote)
    scorer = evaluate.Scorer(metric, end_ids, max_new_tokens, batch_tokens,
                             model is not None and evaluate.prefix_agrees(model, tasks))
    limit = int(max_memory * 2**30) if max_memory else tune.default_max_memory()
    former = tune.Former(config, options, limit, model, in_memory=eval_cmd is None)
    if learning is not None:
        k = len([m for m in config.models or [] if m.model != config.base_model])
        fitting = learn_mod.memory_needed(k, sum(p.numel() for p in model.parameters()))
        inputs = tune.input_bytes(config)
        need = int(learn_mod.ALLOCATOR * (fitting + inputs))
        if not former.in_memory or need > limit:
            raise click.ClickException(
                f"--learn needs about {need / 2**30:.1f} GiB: the inputs read once "
                f"({inputs / 2**30:.1f} GiB) and, for the fit, K + 4 = {k + 4} copies of "
                f"the model in float32 ({fitting / 2**30:.1f} GiB), plus "
                f"{learn_mod.ALLOCATOR - 1:.0%} for activations and the allocator; that "
                f"is over --max-memory {limit / 2**30:.1f} GiB"
                + (f" ({former.reason})" if former.reason else ""))
    say = (lambda text: None) if options.quiet else (lambda text: click.echo(text, err=True))
    for method, reason in left_out.items():
        say(f"tune: leaving out {method}: it cannot merge this recipe ({reason})")
    say(f"tune: {tune.plan_line(plan, searched, budget)}; "
        f"{len(tasks)} task(s), {sum(len(t.examples) for t in tasks)} examples")
    former.prepare(candidates)
    candidates = []  # the candidates evaluated, in order (rows[i] is candidates[i])
    say("tune: forming candidates " + ("in memory" if former.in_memory
                                        else f"on disk ({former.reason})"))
    if learning is not None and not former.in_memory:
        raise click.ClickException(f"--learn needs the candidates formed in memory: "
                                   f"{former.reason}")
    if not former.in_memory:  # each candidate's own folder is loaded to score it
        model = former.model = None
    if former.collected is not None:
        say(f"tune: one Gram pass for every AWD candidate ({former.gram_seconds:.1f} s)")

    metric_name = "external" if eval_cmd else metric

    def run_candidate(candidate, on_tasks):
        start = time.perf_counter()
        if eval_cmd:
            with former.on_disk(candidate) as folder:
                formed = time.perf_counter()
                command = eval_cmd.replace("{model}", shlex.quote(folder))
                proc = subprocess.run(command, shell=True, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"--eval-cmd failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-500:]}")
            lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
            try:
                value = float(lines[-1].split()[-1])
            except (IndexError, ValueError):
                raise RuntimeError(f"--eval-cmd printed no number on its last line: "
                                   f"{(lines or [''])[-1][:200]!r}")
            return {}, {"external": value}, formed - start, time.perf_counter() - formed
        if former.in_memory and candidate.method not in tune.RANDOMIZED:
            tune.swap_in(model, former.form(candidate))
            formed = time.perf_counter()
            scores = scorer.scores(model, on_tasks)
        else:
            with former.on_disk(candidate) as folder:  # mergekit's run_merge, seeded
                formed = time.perf_counter()
                scores = scorer.scores(tune.load_model(folder, device, None, remote),
                                       on_tasks)
        return scores, scorer.means(scores), formed - start, time.perf_counter() - formed

    rows: list = []
    searches: list = []

    def evaluate_one(candidate) -> Optional[tuple]:
        """Score one candidate: a row (and its rank), or a failed row (None)."""
        i = len(rows) + 1
        row = {"candidate": candidate.label, "method": candidate.method,
               "settings": candidate.overrides()}
        if candidate.as_written:
            row["as_written"] = True
        candidates.append(candidate)
        try:
            scores, means, form_s, score_s = run_candidate(candidate, tasks)
        except Exception as error:  # one candidate's failure: a row, and go on
            row.update(scores={}, mean={}, error=_one_line(error))
            rows.append(row)
            say(f"[{i}] {candidate.label}: failed: {row['error']}")
            if len(rows) >= 2 and all(r.get("error") == row["error"] for r in rows):
                raise click.ClickException(
                    f"tune: the first {len(rows)} candidates all failed the same way, "
                    f"so the rest would too: {row['error']}")
            return None
        row.update(scores=scores, mean=means, form_seconds=form_s, score_seconds=score_s)
        rows.append(row)
        say(f"[{i}] {candidate.label}: " + " ".join(f"{k} {v:.4g}" for k, v in means.items())
            + f"  (formed {form_s:.2f} s, scored {score_s:.2f} s)")
        rank = evaluate.rank(means, metric_name)
        return None if any(math.isnan(v) for v in means.values()) else rank

    interrupted = False
    try:
        for method, settings, per_setting in plan:
            for setting in settings:
                if per_setting is None:  # an exact grid, or no lambda
                    evaluate_one(setting)
                    continue
                path = tune.search_lambda(
                    lambda lam, c=setting: evaluate_one(tune.with_lambda(c, lam)),
                    values["lambda"], per_setting)
                searches.append({"setting": tune.line_key(setting)[0] + " " + " ".join(
                    f"{k}={v:g}" if v is not None else f"{k}=recipe's"
                    for k, v in setting.values if k != "lambda"),
                    "path": [{"lambda": lam, "phase": phase} for lam, phase in path]})
        recipe_candidate = tune.as_written(config)
        written = tune.candidate_config(config, recipe_candidate).to_yaml()
        if not any(tune.candidate_config(config, c).to_yaml() == written
                   for c in candidates):
            evaluate_one(recipe_candidate)
    except KeyboardInterrupt:
        interrupted = True
        say(f"tune: interrupted after {len(rows)} candidates; writing the table so far")
    if not any("error" not in r for r in rows):
        raise click.ClickException(
            "tune: no candidate was scored" + (f" ({rows[0]['error']})" if rows else ""))
    try:
        best = tune.choose(rows, metric_name)
    except RuntimeError:
        raise click.ClickException("tune: no candidate has a score that is a number "
                                   "(every one is NaN or failed)")
    best_candidate = candidates[best]
    best_cfg = tune.candidate_config(config, best_candidate)
    result = {
        "recipe": config.to_yaml(), "metric": metric_name, "form": (
            "in memory" if former.in_memory else "on disk"),
        "gram_seconds": former.gram_seconds, "candidates": rows, "best": best,
        "shared_prefix_scoring": scorer.share_prefix,
        "interrupted": interrupted, "random_seed": tune.seed_of(options),
        "lambda_search": searches, "budget": budget if searched else None,
        "budget_per_setting": {m: per for m, _, per in plan if per is not None},
        "comparisons": [],
    }
    rivals = tune.rivals(rows, candidates, best, metric_name, config)
    if metric_name != "external":
        for j in rivals:
            result["comparisons"].append({
                "other": rows[j]["candidate"], "why": rivals[j],
                "validation": tune.compare(rows[best]["scores"], rows[j]["scores"],
                                           metric_name)})
    chosen_label, chosen_tensors = best_candidate.label, None
    learned = []
    if learning is not None and not interrupted:
        learned, interrupted = learn_mod.learn_all(former, model, scorer, learning, tasks,
                                                   rows, candidates, options, say)
        result["learned"] = [entry.summary for entry in learned]
        result["interrupted"] = interrupted
        winner = learn_mod.winner(learned, rows, best, scorer, say)
        result["best_learned"] = winner
        if winner is not None:
            entry = learned[winner]
            chosen_label, chosen_tensors, best_cfg = entry.label, entry.tensors, entry.config
    os.makedirs(out_dir, exist_ok=True)
    if test_tasks and not interrupted:
        tested = [(chosen_label, chosen_tensors, "chosen")] + [
            (e.label, e.tensors, "learned, not chosen") for e in learned
            if e.tensors is not chosen_tensors]
        result["test"] = {}
        for label, tensors, role in tested:
            if tensors is None:
                scores, means, _, _ = run_candidate(best_candidate, test_tasks)
            else:
                tune.swap_in(model, tensors)
                scores = scorer.scores(model, test_tasks)
                means = scorer.means(scores)
            if role == "chosen":
                result["test"].update({"candidate": label, "scores": scores, "mean": means})
            else:
                result.setdefault("test_learned", []).append(
                    {"candidate": label, "scores": scores, "mean": means})
        for comparison, j in zip(result["comparisons"], rivals):
            scores, means, _, _ = run_candidate(candidates[j], test_tasks)
            comparison["test"] = tune.compare(result["test"]["scores"], scores, metric_name)
            comparison["test_scores"], comparison["test_mean"] = scores, means
    with open(os.path.join(out_dir, "best.yml"), "w", encoding="utf-8") as f:
        f.write(tune.recipe_text(best_cfg, best_cfg.merge_method, options))
    for entry in learned:
        entry.write(out_dir)
    if learned:
        top = learned[result["best_learned"]] if result["best_learned"] is not None else \
            min(learned, key=lambda e: scorer.rank(e.summary["held_out"]))
        top.write(out_dir, name="learned")
    with open(os.path.join(out_dir, "tune.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    _tune_picture(rows, metric_name, os.path.join(out_dir, "tune-lambda.svg"))
    click.echo(_tune_table(rows, best, metric_name, result["comparisons"]))
    for c in result["comparisons"]:
        click.echo(f"validation ({c['why']}): " + tune.comparison_line(
            rows[best]["candidate"], c["other"], c["validation"]))
    for entry in learned:
        click.echo(entry.line())
    for t in ([result["test"]] if "test" in result else []) + result.get("test_learned", []):
        click.echo(f"test ({t['candidate']}, scored once): "
                   + " ".join(f"{name} " + "/".join(f"{s[m]:.3f}" for m in scorer.names)
                              for name, s in t["scores"].items())
                   + "  mean " + ", ".join(f"{m} {v:.4f}" for m, v in t["mean"].items()))
    for c in result["comparisons"]:
        if "test" in c:
            click.echo(f"test ({c['why']}, scored once): " + tune.comparison_line(
                result["test"]["candidate"], c["other"], c["test"]))
    summary = ""
    if result["comparisons"]:
        c = result["comparisons"][0]
        low, high = c["validation"]["ci95"]
        summary = (f"  (vs {c['other']}: {c['validation']['difference']:+.4f} "
                   f"[{low:+.4f}, {high:+.4f}], "
                   + ("separated" if c["validation"]["separated"] else "not separated")
                   + " on validation)")
    click.echo(f"best: {chosen_label}  ->  {os.path.join(out_dir, 'best.yml')}{summary}")
    if merge_to and not interrupted:
        if chosen_tensors is None:
            former.merge(best_candidate, merge_to)
        else:
            context.run_merge(best_cfg, merge_to, options, source=best_cfg.to_yaml(),
                              known=former.known_gram(learned[result["best_learned"]].static))
        click.echo(f"merged: {merge_to}")
    if interrupted:
        sys.exit(130)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _tune_table(rows, best: int, metric: str, comparisons=()) -> str:
    scored = rows[best]
    tasks = list(scored["scores"])
    width = max(len(r["candidate"]) for r in rows) + 2
    head = f"  {'candidate':{width}s}" + "".join(f"{t[:10]:>11s}" for t in tasks)
    head += "".join(f"{m:>11s}" for m in scored["mean"])
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
        c = against.get(r["candidate"])
        if c is not None:
            cells += (f"  {c['difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                      + ("" if c["separated"] else " ?"))
        lines.append(f"{mark}{r['candidate']:{width}s}{cells}")
    what = {"exact": "exact match", "loss": "loss", "entropy": "entropy",
            "external": "--eval-cmd"}[metric]
    lines.append((f"(per-task columns: {what}; * = chosen on {what}" if tasks
                  else f"(* = chosen on {what}")
                 + ("; ? = the data cannot separate it from the chosen one)" if comparisons
                    else ")"))
    return "\n".join(lines)


def _tune_picture(rows, metric: str, path: str) -> None:
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
