"""tune's answer you can trust and afford: intervals on the choice, a lambda search
with no grid edges, every lambda of a setting one scaled add away."""

import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import reference
from conftest import EXAMPLE_TASKS, mergekit_yaml
from conftest import data_args as _data_args, write_yaml as _write


def _tune(args):
    from mergekit_awd.cli import main

    return CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=False)


def _copy(recipe):
    return json.loads(json.dumps(recipe))


# -- intervals ------------------------------------------------------------------------


def test_interval_is_the_bootstrap_of_paired_differences_within_tasks():
    """Two tasks of three examples: every one of the 3^3 x 3^3 resamples enumerated
    gives the exact bootstrap distribution of the mean over tasks of the paired
    differences; the interval's ends are its 2.5% and 97.5% quantiles."""
    from mergekit_awd import tune

    a = {"x": {"exact_each": [1.0, 1.0, 0.0]}, "y": {"exact_each": [1.0, 0.0, 1.0]}}
    b = {"x": {"exact_each": [0.0, 1.0, 1.0]}, "y": {"exact_each": [0.0, 0.0, 0.0]}}
    d = {t: np.subtract(a[t]["exact_each"], b[t]["exact_each"]) for t in a}  # x 1 0 -1, y 1 0 1
    means = sorted((d["x"][list(i)].mean() + d["y"][list(j)].mean()) / 2
                   for i in itertools.product(range(3), repeat=3)
                   for j in itertools.product(range(3), repeat=3))
    low, high = np.quantile(means, [0.025, 0.975])
    c = tune.compare(a, b, "exact", resamples=200_000)
    assert c["difference"] == pytest.approx((0 / 3 + 2 / 3) / 2)
    # the Monte Carlo quantile lands on the exact distribution's atom (spacing 1/6)
    assert c["ci95"][0] == pytest.approx(low, abs=1e-9)
    assert c["ci95"][1] == pytest.approx(high, abs=1e-9)
    assert not c["separated"]
    # from the paired variance, at 80% power: n = (1.96 + 0.8416)^2 (s_x^2 + s_y^2) /
    # (T^2 D^2) examples per task
    var = (np.var(d["x"], ddof=1) + np.var(d["y"], ddof=1)) / 4
    assert c["examples_per_task_to_separate"] == int(
        np.ceil((1.96 + 0.8416) ** 2 * var / (1 / 3) ** 2))
    assert "would, at 80% power" in tune.comparison_line("A", "B", c)
    assert "optimistic" not in tune.comparison_line("A", "B", c)
    chosen = tune.compare(a, b, "exact", selected=True)
    assert "(taken after choosing on these data: optimistic)" in tune.comparison_line(
        "A", "B", chosen)


def test_an_interval_that_excludes_zero_separates():
    from mergekit_awd import tune

    a = {"x": {"loss_each": [1.0 + 0.01 * i for i in range(40)]}}
    b = {"x": {"loss_each": [1.5 + 0.01 * ((7 * i) % 40) for i in range(40)]}}
    c = tune.compare(a, b, "loss")
    assert c["difference"] == pytest.approx(-0.5)
    assert c["ci95"][1] < 0 and c["separated"]
    assert c["examples_per_task_to_separate"] is None
    assert "the data separate the two" in tune.comparison_line("A", "B", c)


def test_tune_shows_the_intervals_against_each_method_and_the_recipe(example, tmp_path):
    _, paths, data, recipe = example
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data),
                    *_data_args(data, "test"), "--out", out,
                    "--methods", "awd,task_arithmetic", "--lambda", "0.3,0.6",
                    "--keep-delta", "0"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    rows, best = table["candidates"], table["best"]
    assert rows[-1]["as_written"]
    whys = [c["why"] for c in table["comparisons"]]
    other = "task_arithmetic" if rows[best]["method"] == "awd" else "awd"
    assert f"best {other}" in whys
    assert "the recipe as written" in whys and not rows[best].get("as_written")
    for c in table["comparisons"]:
        j = [r["candidate"] for r in rows].index(c["other"])
        # the validation difference is the paired difference of the two rows' examples
        want = np.mean([np.mean(np.subtract(rows[best]["scores"][t]["exact_each"],
                                            rows[j]["scores"][t]["exact_each"]))
                        for t in EXAMPLE_TASKS])
        assert c["validation"]["difference"] == pytest.approx(want)
        assert c["validation"]["ci95"][0] <= want <= c["validation"]["ci95"][1]
        assert set(c["test"]) >= {"difference", "ci95", "separated"}
        # the compared candidate's own test scores are kept: the test difference is
        # the chosen one's test examples minus these
        want_test = np.mean([np.mean(np.subtract(
            table["test"]["scores"][t]["exact_each"], c["test_scores"][t]["exact_each"]))
            for t in EXAMPLE_TASKS])
        assert c["test"]["difference"] == pytest.approx(want_test)
        assert c["test_mean"]["loss"] == pytest.approx(np.mean(
            [c["test_scores"][t]["loss"] for t in EXAMPLE_TASKS]))
        # another merge: its per-example test losses are not the chosen one's
        assert any(c["test_scores"][t]["loss_each"] != table["test"]["scores"][t]["loss_each"]
                   for t in EXAMPLE_TASKS)
        assert f"validation ({c['why']}): {rows[best]['candidate']} - {c['other']}" \
            in result.output
        assert f"test ({c['why']}, scored once): " in result.output
    assert "chosen - this (95% CI)" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("best: ") and f"(vs {table['comparisons'][0]['other']}: " in last


def test_the_recipe_as_written_is_compared_never_chosen():
    from mergekit_awd import tune

    rows = [{"mean": {"exact": 0.5, "loss": 1.0}},
            {"mean": {"exact": 0.9, "loss": 0.1}, "as_written": True}]
    assert tune.choose(rows, "exact") == 0


# -- the lambda search ----------------------------------------------------------------


def test_search_extends_past_the_grid_and_refines_within_its_budget():
    from mergekit_awd import tune

    coarse = (0.25, 0.5, 0.75, 1.0, 1.5)
    for optimum in (3.1, 0.6, 0.05):
        path = tune.search_lambda(lambda lam: (abs(lam - optimum),), coarse, 14)
        lams = [lam for lam, _ in path]
        assert lams[:5] == list(coarse) and len(path) <= 14
        best = min(lams, key=lambda lam: abs(lam - optimum))
        assert abs(best - optimum) <= 0.05 * optimum + 1e-9, (optimum, path)
    up = tune.search_lambda(lambda lam: (abs(lam - 3.1),), coarse, 14)
    assert [p for _, p in up][5:7] == ["extend", "extend"]
    # the budget is a hard limit; a failed lambda is an edge the search does not cross
    assert len(tune.search_lambda(lambda lam: (-lam,), coarse, 6)) == 6
    failed = tune.search_lambda(lambda lam: None if lam > 1.2 else (-lam,), coarse, 12)
    assert max(lam for lam, _ in failed) == 1.5
    # bounds: the search never leaves [LAMBDA_LOW, LAMBDA_HIGH]
    far = tune.search_lambda(lambda lam: (-lam,), coarse, 30)
    assert max(lam for lam, _ in far) == tune.LAMBDA_HIGH


def test_tune_finds_the_best_lambda_outside_the_default_grid(example, tmp_path):
    """Per-model weights 0.1: the best lambda of task arithmetic lies far above the
    default grid's top (1.5; near 2.6 on the loss here). Brute force over a fine grid, formed and scored the same
    way, knows where; tune's search (no --lambda) must get there."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["merge_method"] = "task_arithmetic"
    recipe["parameters"] = {}
    for entry in recipe["models"]:
        entry["parameters"] = {"weight": 0.1}
    tasks = ("sort", "reverse")
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=tasks),
                    "--out", out, "--methods", "task_arithmetic", "--metric", "loss",
                    "--budget", "12"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    (search,) = table["lambda_search"]
    assert len(search["path"]) <= 12
    chosen = table["candidates"][table["best"]]
    assert chosen["settings"]["lambda"] > 1.5

    config = MergeConfiguration.model_validate(recipe)
    model = tune.load_model(paths["base"])
    former = tune.Former(config, MergeOptions(quiet=True), 2**40, model, in_memory=True)
    brute = [round(x, 2) for x in np.arange(0.25, 6.01, 0.25)]
    former.prepare([tune.Candidate("task_arithmetic", (("lambda", brute[0]),))])
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    val = evaluate.load_tasks([f"{t}={data[f'{t}.val']}" for t in tasks], tokenizer, "base")
    losses = {}
    for lam in brute:
        tune.swap_in(model, former.form(tune.Candidate("task_arithmetic", (("lambda", lam),))))
        losses[lam] = evaluate.mean(evaluate.score(model, val), "loss")
    best_lam = min(losses, key=losses.get)
    assert best_lam > 1.5  # the fixture: outside the default grid
    # tune's choice is as good as the fine grid's best (to its spacing) ...
    assert chosen["mean"]["loss"] <= losses[best_lam] + 1e-3
    assert abs(chosen["settings"]["lambda"] - best_lam) <= 0.25 + 1e-9
    # ... and its path is in the picture
    svg = (out / "tune-lambda.svg").read_text()
    assert svg.count("<polyline") == 1


# -- every lambda of a setting for one scaled add -------------------------------------


def _counted_former(example, scope_):
    """(config, base model path, a Former of the example recipe at ``scope_``, the
    candidates it forms in full, in order)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import tune

    _, paths, _, recipe = example
    recipe = _copy(recipe)
    recipe["parameters"]["scope"] = scope_
    config = MergeConfiguration.model_validate(recipe)
    model = tune.load_model(recipe["base_model"])
    former = tune.Former(config, MergeOptions(quiet=True), 2**40, model, in_memory=True)
    calls = []
    full = former._formed
    former._formed = lambda c, cfg=None, deltas=False: calls.append(c) or full(c, cfg, deltas)
    return config, paths["base"], former, calls


def _assert_mergekit_yaml(config, base_path, candidate, tensors, out):
    """``tensors`` are what mergekit-yaml writes for ``candidate`` (to 1e-5 of each
    tensor's move from the base)."""
    from mergekit_awd import tune

    written = tune.candidate_config(config, candidate)
    mergekit_yaml(yaml.safe_load(written.to_yaml()), out)
    merged = reference.load(str(out))
    base = reference.load(base_path)
    assert set(tensors) == set(merged)
    for name, tensor in merged.items():
        moved = (tensor.double() - base[name].double()).norm()
        err = (tensors[name].double() - tensor.double()).norm() / max(float(moved), 1e-12)
        assert err < 1e-5, (candidate.label, name, err)


@pytest.mark.parametrize("method, scope_, extra", [
    ("task_arithmetic", "global", {}),
    ("ties", "global", {"density": 0.5}),
    ("breadcrumbs", "global", {"density": 0.8}),
    ("awd", "global", {"keep_delta": 1.0}),
    ("awd", "tensor", {}),
    ("awd_ties", "global", {"keep_delta": 1.0, "density": 0.6}),
    ("tsv", "global", {}),
    ("wudi", "global", {}),
    ("awd_iso_c", "global", {"keep_delta": 1.0}),
])
def test_lambda_scaled_candidate_equals_mergekit_yaml(example, tmp_path, method, scope_,
                                                      extra):
    from mergekit_awd import tune

    config, base_path, former, calls = _counted_former(example, scope_)
    knobs = {"alpha": 0.01, **extra} if method.startswith("awd") else extra

    def cand(lam):
        values = [("lambda", lam)] + [(k, v) for k, v in knobs.items()]
        return tune.Candidate(method, tuple(values))

    former.prepare([cand(0.5)])
    former.form(cand(0.5))
    formed = former.form(cand(1.3))  # the second lambda of this setting: scaled
    assert [c.method for c in calls] == [method, tune.zero_of(cand(1.3)).method]
    assert former.line.zero is not None
    formed_again = former.form(cand(0.8))  # a third: no formation at all
    assert len(calls) == 2

    for lam, tensors in ((1.3, formed), (0.8, formed_again)):
        _assert_mergekit_yaml(config, base_path, cand(lam), tensors, tmp_path / f"m{lam}")


@pytest.mark.parametrize("method, scope_, first", [
    ("awd_ties", "global", (0.5, 1.3)),
    ("awd_ties", "global", (0.5,)),                      # f'(0) of keep_delta 0 not formed yet
    ("awd", "tensor", (0.5, 1.3)),
])
def test_another_keep_delta_reuses_the_line(example, tmp_path, method, scope_, first):
    """keep_delta adds keep_delta * delta, which does not depend on it: a setting that
    differs only in keep_delta is the line just formed, moved; its TIES combination is
    not formed again, and it is mergekit-yaml's merge."""
    from mergekit_awd import tune

    config, base_path, former, calls = _counted_former(example, scope_)
    extra = (("density", 0.6),) if method == "awd_ties" else ()

    def cand(lam, keep_delta):
        return tune.Candidate(method, (("lambda", lam), ("alpha", 0.01),
                                       ("keep_delta", keep_delta)) + extra)

    former.prepare([cand(0.5, 0.0)])
    for lam in first:
        former.form(cand(lam, 0.0))
    formed = {lam: former.form(cand(lam, 1.0)) for lam in (0.8, 1.3)}
    # past the first lambda of keep_delta 0, only the cheap f'(0)s (awd at lambda 0)
    assert calls[0] == cand(first[0], 0.0)
    assert all(c.method == "awd" and c.overrides()["lambda"] == 0 for c in calls[1:])
    assert len(calls) == 3

    for lam, tensors in formed.items():
        _assert_mergekit_yaml(config, base_path, cand(lam, 1.0), tensors,
                              tmp_path / f"m{lam}")


def test_sixteen_bit_candidates_are_formed_in_full_at_every_lambda(example):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import tune

    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["dtype"] = "bfloat16"
    config = MergeConfiguration.model_validate(recipe)
    model = tune.load_model(recipe["base_model"])
    former = tune.Former(config, MergeOptions(quiet=True), 2**40, model, in_memory=True)
    cand = lambda lam: tune.Candidate("ties", (("lambda", lam), ("density", 0.5)))
    former.prepare([cand(0.5)])
    calls = []
    full = former._formed
    former._formed = lambda c, cfg=None, deltas=False: calls.append(c) or full(c, cfg, deltas)
    for lam in (0.5, 1.0, 1.5):
        direct = tune.cast(*full(cand(lam)))
        formed = former.form(cand(lam))
        assert all(torch.equal(formed[n], direct[n]) for n in direct)
    assert [c.overrides()["lambda"] for c in calls] == [0.5, 1.0, 1.5]


def test_a_budget_too_small_for_the_coarse_grid_is_one_line(example, tmp_path):
    from mergekit_awd.cli import main

    _, paths, data, recipe = example
    result = CliRunner().invoke(main, ["tune", _write(tmp_path / "r.yml", recipe),
                                       *_data_args(data, tasks=("sort",)), "--out",
                                       str(tmp_path / "t"), "--methods", "awd",
                                       "--keep-delta", "0,1", "--budget", "8"])
    assert result.exit_code != 0
    assert ("--budget 8 is too small for awd: 2 setting(s) of its other knobs x the 5 "
            "coarse lambda values need 10") in result.output
    assert not (tmp_path / "t").exists()


def test_the_default_budget_is_per_setting():
    """Without --budget each setting of a method's other knobs gets PER_SETTING
    evaluations (two keep_delta values: twice the evaluations, never refused);
    --budget N caps the method, shared by its settings."""
    from mergekit_awd import params, tune

    values = {p.name: [None] for p in params.TUNABLE}
    values.update({"lambda": [0.25, 0.5, 0.75, 1.0, 1.5], "alpha": [0.001],
                   "keep_delta": [0.0, 1.0], "density": [0.5]})
    per = {m: p for m, _, p in tune.plan(["awd", "task_arithmetic"], values, True, None)}
    assert per == {"awd": 6, "task_arithmetic": 6}
    per = {m: p for m, _, p in tune.plan(["awd", "task_arithmetic"], values, True, 12)}
    assert per == {"awd": 6, "task_arithmetic": 12}
    assert "6 evaluations per setting" in tune.plan_line(
        tune.plan(["awd"], values, True, None), True, None)
    # the search stops at the budget: the coarse grid and one step
    path = tune.search_lambda(lambda lam: (-lam,), [0.25, 0.5, 0.75, 1.0, 1.5], 6)
    assert [p for p, _ in path] == [0.25, 0.5, 0.75, 1.0, 1.5, 3.0]


def test_a_search_that_stops_short_says_so():
    """The edge of what was tried, or a last gap wider than the resolution: one line
    naming it; a search that got there: nothing."""
    from mergekit_awd import tune

    coarse = [0.25, 0.5, 0.75, 1.0, 1.5]
    rising = {}
    tune.search_lambda(lambda lam: rising.setdefault(lam, (-lam,)), coarse, 6)
    assert tune.unfinished(rising) == (
        "the best lambda is the largest tried (3): the score may still improve above it")
    falling = {}
    tune.search_lambda(lambda lam: falling.setdefault(lam, (lam,)), coarse, 6)
    assert tune.unfinished(falling).startswith("the best lambda is the smallest tried (0.125)")
    at_bound = {lam: (-lam,) for lam in (1.0, 16.0)}
    assert tune.unfinished(at_bound).endswith("the search goes no further than 16")
    peak = {}
    tune.search_lambda(lambda lam: peak.setdefault(lam, (abs(lam - 0.8),)), coarse, 6)
    assert tune.unfinished(peak) == ("the best lambda (0.8455) is known to 18% only (its "
                                     "neighbours tried: 0.75 and 1), not to 5%")
    done = {}
    tune.search_lambda(lambda lam: done.setdefault(lam, (abs(lam - 0.8),)), coarse, 30)
    assert tune.unfinished(done) is None
    assert tune.unfinished({0.5: None, 1.0: None}) is None  # nothing scored
    # a failed lambda is an edge too: the best beside it is not inside what was scored
    assert tune.unfinished({0.5: (2,), 1.0: (1,), 1.5: None}) is not None


def test_tune_marks_a_search_that_stopped_at_its_edge(example, tmp_path):
    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["merge_method"] = "task_arithmetic"
    recipe["parameters"] = {}
    for entry in recipe["models"]:
        entry["parameters"] = {"weight": 0.1}  # the best lambda is far above the grid
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", out, "--methods", "task_arithmetic", "--metric", "loss"])
    assert result.exit_code == 0, result.output
    (search,) = json.loads((out / "tune.json").read_text())["lambda_search"]
    assert search["not_done"] == ("the best lambda is the largest tried (3): the score may "
                                  "still improve above it")
    assert ("lambda search not done (task_arithmetic ): the best lambda is the largest "
            "tried (3)") in result.output
    assert "6 evaluations a setting, 1 after the 5 coarse lambdas" in result.output
