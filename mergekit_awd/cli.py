"""`mergekit-awd`: report, sweep and merge, with mergekit-yaml's options and conventions."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional

import click
import yaml

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_awd  # noqa: F401  (registers the methods)
from mergekit_awd import context, evaluate, mergekit_run, params, report, scope, stages, tune
from mergekit_awd import keep as keep_mod
from mergekit_awd import learn as learn_mod
from mergekit_awd.params import AWDParameterError
from mergekit_awd.record import RecordMismatch
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
              help="--learn: fraction of what --decide leaves of each task held out "
                   "from the fit: it picks the step to keep")
@click.option("--decide", type=float, default=0.25, show_default=True,
              help="--learn: fraction of each --data task set aside to decide learned vs "
                   "static (the search, the fit and the step choice never see it): the "
                   "learned merge replaces the static one only where the 95%% interval of "
                   "their difference on it excludes 0")
@click.option("--keep", "keep", multiple=True,
              help="JSONL of prompts (answers optional) the merged model must go on "
                   "answering as before, e.g. general chat prompts; repeatable. A prompt "
                   "alone is answered by the base model (or --keep-model) once; every "
                   "candidate's loss on those answers is reported (keep loss), and --learn "
                   "fits it too")
@click.option("--keep-model", "keep_model", default=None,
              help="--keep: the model whose greedy answers are the reference (default: "
                   "the base model), e.g. the instruct model the fine-tunes came from; "
                   "same tokenizer as the base model")
@click.option("--keep-weight", "keep_weight", type=float, default=None,
              help=f"--learn --keep: weight of the keep loss in the fit's objective "
                   f"(default {keep_mod.DEFAULT_WEIGHT:g}; 0 reports it without fitting it)")
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
@click.option("--restart", is_flag=True, default=False,
              help="start over in --out: drop its record of an earlier run (by default a "
                   "run continues its own record and refuses another run's)")
@add_merge_options
def tune_command(merge_options: MergeOptions, config_file: str, data, test, methods,
                 budget, metric, eval_cmd, learn, objective, holdout, decide, keep,
                 keep_model, keep_weight, learn_steps,
                 learn_lr, learn_batch, eval_every, max_new_tokens, out_dir, merge_to,
                 max_memory, batch_tokens, restart, **knobs):
    """Choose lambda, alpha, keep_delta (and the method) on your own held-out data.

    Every candidate is the recipe with those values replaced; the winner is written
    as best.yml, ready for mergekit-yaml. With --learn, coefficients per model (and
    layer) are learned on the data too, and written as learned.yml. Every scored
    candidate is kept in OUT/record.jsonl: the same command continues a run that
    stopped.
    """
    merge_options.apply_global_options()
    config, _ = _load(config_file)
    learning = None
    if learn:
        learning = learn_mod.Learning(learn, objective, holdout, learn_steps, learn_lr,
                                      learn_batch, eval_every, decide)
    request = stages.Request(
        config, merge_options, data, test, methods,
        {p.name: knobs[p.name] for p in params.TUNABLE}, metric, eval_cmd, out_dir,
        merge_to=merge_to, max_memory=max_memory, batch_tokens=batch_tokens,
        learning=learning, max_new_tokens=max_new_tokens, budget=budget, restart=restart,
        knob_values=_knob_values, keep=keep, keep_model=keep_model, keep_weight=keep_weight)
    try:
        interrupted = stages.run(request, _say(merge_options),
                                 lambda lines: click.echo("\n".join(lines)))
    except stages.UsageProblem as error:
        raise click.UsageError(str(error))
    except (evaluate.AWDDataError, AWDParameterError, stages.TuneError,
            RecordMismatch) as error:
        raise click.ClickException(str(error))
    if interrupted:
        sys.exit(130)


def _say(options):
    return (lambda text: None) if options.quiet else (lambda text: click.echo(text, err=True))
