"""`mergekit-awd`: report, sweep and merge, with mergekit-yaml's options and conventions."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional

import click
import yaml

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_awd  # noqa: F401  (registers the methods)
from mergekit_awd import report, scope
from mergekit_awd.merge_log import MergeLog

AWD_METHODS = ("awd", "awd_ties", "awd_dare_ties")


@click.group("mergekit-awd")
def main():
    """Adaptive Weight Disentanglement for mergekit: see what it does, tune it, merge."""


def _load(config_file: str):
    with open(config_file, "r", encoding="utf-8") as f:
        source = f.read()
    return MergeConfiguration.model_validate(yaml.safe_load(source)), source


def _collect(config: MergeConfiguration, options: MergeOptions) -> scope.Collected:
    """Plan the recipe as mergekit-yaml would and run the Gram pass over its tasks."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    if config.merge_method not in AWD_METHODS:
        raise click.UsageError(
            f"{config.merge_method!r} is not an AWD method; use one of {', '.join(AWD_METHODS)}"
        )
    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options)
    out_config = _model_out_config(config, arch_info, options.trust_remote_code)
    # plan_to_disk only plans (the writer is a task that is never run here);
    # mergekit 0.1.5's plan_in_memory cannot build its own return tasks
    planned = MergePlanner(config, arch_info, options, out_config).plan_to_disk("unused")
    tasks = [t.tensor_task for t in planned if hasattr(t, "tensor_task")]
    if not tasks:
        raise click.UsageError(
            "mergekit planned no tensor at all for this recipe (it would write a model "
            "with no weights): mergekit has no definition of this architecture and "
            "none of the weight names it inferred is in the checkpoints"
        )
    collected = scope.collect_tasks(
        config.merge_method, tasks, options.device, "cpu",
        quiet=options.quiet,
    )
    if not collected.tensors:
        raise click.UsageError("the recipe's select: selects no tensor")
    return collected


def analyze(collected: scope.Collected, **overrides) -> Dict:
    """The report of the recipe's solve(s) (one global, or one per tensor)."""
    s = dataclasses.replace(collected.settings, **overrides)
    log = MergeLog()
    if s.scope == "global":
        parts = [collected]
    else:
        parts = [dataclasses.replace(collected, tensors=[t]) for t in collected.tensors]
    for part in parts:
        taus = [t.taus for t in part.tensors if t.taus is not None]
        G = part.G
        solution = scope.solve(G, part.numel, s, taus)
        log.add(collected.models, s, [t.name for t in part.tensors], G,
                scope.disentangled(G, solution, taus), solution, part.numel)
    return log.report()


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
            cfg = config.model_copy(deep=True)
            cfg.parameters = dict(cfg.parameters or {}, alpha=alpha, **{"lambda": lam})
            _merge(cfg, cfg.to_yaml(), out, merge_options)
            click.echo(f"merged: {out}")


def _merge(config: MergeConfiguration, source: str, out_path: str, options: MergeOptions):
    """mergekit's run_merge; the awd report is written as it returns."""
    run_merge(config, out_path, options=options, config_source=source)


@main.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def merge_command(merge_options: MergeOptions, config_file: str, out_path: str):
    """`mergekit-yaml` with the plugin loaded explicitly, plus the awd report."""
    merge_options.apply_global_options()
    config, source = _load(config_file)
    _merge(config, source, out_path, merge_options)
