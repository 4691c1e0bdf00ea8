"""`mergekit-awd`: report, sweep and merge, with mergekit-yaml's options and conventions."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import click
import yaml

from mergekit.config import MergeConfiguration, evaluate_setting
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import mergekit_awd  # noqa: F401  (registers the methods)
from mergekit_awd import cli_context, global_scope, merge_log, report
from mergekit_awd.params import AWDParameterError

AWD_METHODS = ("awd", "awd_ties", "awd_dare_ties")


@click.group("mergekit-awd")
def main():
    """Adaptive Weight Disentanglement for mergekit: see what it does, tune it, merge."""


def _load(config_file: str):
    with open(config_file, "r", encoding="utf-8") as f:
        source = f.read()
    return MergeConfiguration.model_validate(yaml.safe_load(source)), source


def _settings(config: MergeConfiguration, overrides: Optional[Dict] = None):
    """(base, models, weights, params) of a `models:` recipe, each a single value."""
    from mergekit.merge_methods import get

    if config.merge_method not in AWD_METHODS:
        raise click.UsageError(
            f"{config.merge_method!r} is not an AWD method; use one of {', '.join(AWD_METHODS)}"
        )
    if config.base_model is None:
        raise click.UsageError("the recipe needs base_model: AWD works on task vectors")
    if not config.models:
        raise click.UsageError(
            "report and sweep read recipes written with models: (not slices: or modules:)"
        )
    spec = get(config.merge_method).spec
    raw = dict(config.parameters or {})
    raw.update(overrides or {})
    params = {}
    for p in spec.shared_parameters:
        setting = raw.get(p.name, p.default)
        if not isinstance(setting, (bool, int, float, str)):
            raise AWDParameterError(
                f"{p.name} is given per tensor (a filter or gradient); report and sweep "
                f"solve one problem for the whole model and need a single value"
            )
        params[p.name] = p.validate(setting)
    base = config.base_model
    models, weights = [], []
    weight_spec = next(p for p in spec.parameters if p.name == "weight")
    for m in config.models:
        if m.model == base:
            continue
        setting = (m.parameters or {}).get("weight", 1.0)
        models.append(m.model)
        weights.append(evaluate_setting("", setting, 0, validate=weight_spec.validate))
    return base, models, weights, params


def _gram(options: MergeOptions, base, models, params):
    from mergekit.io.tasks import LoaderCache

    LoaderCache().setup(options)
    return global_scope.gram_pass(
        base,
        tuple(models),
        params["select"],
        options.device,
        keep_taus=params["optimizer"] == "adam" and params["steps"] > 0,
        max_gb=params["adam_max_gb"],
    )


def analyze(gram, base, models, weights, params) -> Dict:
    """The report of the recipe's solve(s), from one Gram pass."""
    names, G, numel, taus, per_tensor = gram
    if not names:
        raise click.UsageError(f"select: {params['select']!r} selects no tensor")
    log = merge_log.MergeLog(models=tuple(models), weights=list(weights), params=params)
    if params["scope"] == "global":
        solution = global_scope.solve(G, numel, params, list(taus.values()))
        H = global_scope.disentangled(G, solution, list(taus.values()))
        log.add(names, G, H, solution, numel)
    else:
        for name in names:
            G_t, P, _ = per_tensor[name]
            t = [taus[name]] if name in taus else []
            solution = global_scope.solve(G_t, P, params, t)
            H = global_scope.disentangled(G_t, solution, t)
            log.add([name], G_t, H, solution, P)
    return log.report()


@main.command("report", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.option("--out", "out_dir", default="awd-report", show_default=True,
              help="folder for awd_report.json and the PNGs")
@add_merge_options
def report_command(merge_options: MergeOptions, config_file: str, out_dir: str):
    """Run only the Gram pass and the solver of a recipe; write a report, no model."""
    merge_options.apply_global_options()
    cli_context.set_options(quiet=merge_options.quiet)
    config, _ = _load(config_file)
    base, models, weights, params = _settings(config)
    start = time.perf_counter()
    rep = analyze(_gram(merge_options, base, models, params), base, models, weights, params)
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
    cli_context.set_options(quiet=merge_options.quiet)
    config, _ = _load(config_file)
    base, models, weights, params = _settings(config)
    alphas = _floats(alphas) or [params["alpha"]]
    lambdas = _floats(lambdas) or [params["lambda"]]
    gram = _gram(merge_options, base, models, params)
    click.echo(f"{'alpha':>10s} {'lambda':>7s} {'mean|cos| after':>16s} "
               f"{'||delta||rel':>12s}  lambda * coefficients")
    rows = []
    for alpha in alphas:
        _, _, _, p = _settings(config, {"alpha": alpha})
        rep = analyze(gram, base, models, weights, p)
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
    cli_context.set_options(quiet=options.quiet, out_path=out_path)
    run_merge(config, out_path, options=options, config_source=source)
    return merge_log.finish(out_path)


@main.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def merge_command(merge_options: MergeOptions, config_file: str, out_path: str):
    """`mergekit-yaml` with the plugin loaded explicitly, plus the awd report."""
    merge_options.apply_global_options()
    config, source = _load(config_file)
    paths = _merge(config, source, out_path, merge_options)
    if paths:
        click.echo(f"awd: {merge_log.summary_line()}\nawd report: {paths[0]}", err=True)
