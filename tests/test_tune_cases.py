"""`mergekit-awd tune` on the recipes and failures a user meets: per-model knobs,
methods without lambda, randomized methods, recipes that change the model's shape,
NaN scores, a failing candidate, memory and remote-code settings."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

import reference
from conftest import EXAMPLE_TASKS, mergekit_yaml
from conftest import data_args as _data_args, write_yaml as _write


def _tune(args, catch=False):
    from mergekit_awd.cli import main

    return CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=catch)


def _copy(recipe):
    return json.loads(json.dumps(recipe))


def test_per_model_density_is_the_default_grid_point_and_stays_in_best_yml(example, tmp_path):
    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["merge_method"] = "ties"
    recipe["parameters"] = {"lambda": 0.5}
    densities = [0.7, 0.3, 0.5, 0.9]
    for entry, d in zip(recipe["models"], densities):
        entry["parameters"] = {"density": d, "weight": 1.0}
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", out, "--methods", "ties", "--lambda", "0.5"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "tune.json").read_text())["candidates"]
    assert [r["candidate"] for r in rows] == ["ties lambda=0.5 density=recipe's"]
    best = yaml.safe_load((out / "best.yml").read_text())
    assert [m["parameters"]["density"] for m in best["models"]] == densities
    # --density replaces them
    out2 = tmp_path / "t2"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", out2, "--methods", "ties", "--lambda", "0.5", "--density", "0.6"])
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((out2 / "best.yml").read_text())
    assert best["parameters"]["density"] == 0.6
    assert all("density" not in m["parameters"] for m in best["models"])


def test_methods_without_lambda_are_tuned_and_the_picture_skips_them(example, tmp_path):
    _, paths, data, recipe = example
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    *_data_args(data, "test", tasks=("sort",)), "--out", out,
                    "--methods", "model_stock,task_arithmetic", "--lambda", "0.3,0.6",
                    "--merge-to", tmp_path / "m"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "tune.json").read_text())["candidates"]
    assert [r["candidate"] for r in rows] == [
        "model_stock ", "task_arithmetic lambda=0.3", "task_arithmetic lambda=0.6",
        "awd (the recipe as written)"]
    assert (out / "tune-lambda.svg").read_text().count("<polyline") == 1
    assert "test (" in result.output and (tmp_path / "m" / "config.json").exists()


def test_a_method_that_cannot_merge_the_recipe_is_refused_up_front(example, tmp_path):
    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["parameters"]["t"] = 0.5  # slerp's own parameter is there: it is the 4 models
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", tmp_path / "t", "--methods", "awd,slerp"], catch=True)
    assert result.exit_code != 0
    assert "--methods: slerp cannot merge this recipe" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_nan_scores_never_win():
    from mergekit_awd import tune

    rows = [{"mean": {"exact": 0.9, "loss": math.nan}}, {"mean": {"exact": 0.5, "loss": 0.3}},
            {"mean": {"exact": 0.95, "loss": 0.2}, "error": "failed"}]
    assert tune.choose(rows, "exact") == 1
    assert tune.choose(rows, "loss") == 1
    with pytest.raises(RuntimeError):
        tune.choose(rows[:1], "exact")


def test_a_failing_candidate_is_a_row_and_the_run_goes_on(example, tmp_path):
    """lambda 1e9 overflows float16 (the kernel refuses to write inf): that candidate
    fails, the table, the test score and best.yml still come out."""
    _, paths, data, recipe = example
    recipe = _copy(recipe)
    recipe["dtype"] = "float16"
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    *_data_args(data, "test", tasks=("sort",)), "--out", out,
                    "--methods", "awd", "--lambda", "0.3,1e9"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    failed = table["candidates"][1]
    assert "overflow" in failed["error"] and failed["candidate"] == "awd lambda=1e+09 alpha=0.01 keep_delta=0"
    assert table["best"] == 0 and "test" in table
    assert any("lambda=1e+09" in line and "failed: AWDInputError" in line
               for line in result.output.splitlines())
    assert yaml.safe_load((out / "best.yml").read_text())["parameters"]["lambda"] == 0.3


def test_every_candidate_failing_the_same_way_stops_with_one_line(example, tmp_path):
    _, paths, data, recipe = example
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", tmp_path / "t", "--methods", "awd", "--lambda", "0.3,0.5,0.7",
                    "--eval-cmd", "exit 3"], catch=True)
    assert result.exit_code != 0
    assert "the first 2 candidates all failed the same way" in result.output, result.output
    assert "--eval-cmd failed (exit 3)" in result.output


def test_randomized_method_scored_is_bitwise_what_mergekit_yaml_writes(example, tmp_path,
                                                                        monkeypatch):
    from mergekit_awd import tune

    _, paths, data, recipe = example
    scored = {}
    real = tune.load_model

    def load(path, *a, **k):
        model = real(path, *a, **k)
        if path != paths["base"]:
            scored[path] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        return model

    monkeypatch.setattr(tune, "load_model", load)
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", out, "--methods", "dare_ties", "--lambda", "0.6",
                    "--density", "0.5", "--random-seed", "7"])
    assert result.exit_code == 0, result.output
    text = (out / "best.yml").read_text()
    assert "--random-seed 7" in text.splitlines()[0]
    assert json.loads((out / "tune.json").read_text())["random_seed"] == 7
    (tensors,) = scored.values()
    merged = tmp_path / "m"
    mergekit_yaml(yaml.safe_load(text), merged, "--random-seed", "7")
    written = reference.load(str(merged))
    assert written and all(torch.equal(tensors[n], t) for n, t in written.items())
    other = tmp_path / "m2"  # another seed draws other masks: the check can fail
    mergekit_yaml(yaml.safe_load(text), other, "--random-seed", "8")
    assert not all(torch.equal(tensors[n], t) for n, t in reference.load(str(other)).items())


def test_a_slices_recipe_with_fewer_layers_is_scored_as_written(example, tmp_path):
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    _, paths, data, recipe = example
    recipe = {"merge_method": "task_arithmetic", "base_model": paths["base"],
              "slices": [{"sources": [{"model": m, "layer_range": [0, 2]}
                                      for m in [paths["base"]] + [paths[t] for t in EXAMPLE_TASKS]]}],
              "parameters": {"lambda": 0.5, "weight": 1.0}, "dtype": "float32"}
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", out, "--methods", "task_arithmetic", "--lambda", "0.5"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["form"] == "on disk"
    merged = tmp_path / "m"
    mergekit_yaml(yaml.safe_load((out / "best.yml").read_text()), merged)
    model = tune.load_model(str(merged))
    assert model.config.num_hidden_layers == 2
    tasks = evaluate.load_tasks([f"sort={data['sort.val']}"],
                                AutoTokenizer.from_pretrained(paths["base"]), "m")
    brute = evaluate.score(model, tasks)["sort"]
    row = table["candidates"][0]["scores"]["sort"]
    assert row["exact"] == brute["exact"] and row["loss"] == pytest.approx(brute["loss"], 1e-5)


def test_memory_estimate_reads_the_files_and_the_recipes_dtype(example):
    import os

    from mergekit.config import MergeConfiguration

    from mergekit_awd import tune

    _, paths, _, recipe = example
    files = sum(os.path.getsize(os.path.join(p, "model.safetensors"))
                for p in [paths["base"]] + [paths[t] for t in EXAMPLE_TASKS])
    assert tune.input_bytes(MergeConfiguration.model_validate(recipe)) == files
    half = dict(_copy(recipe), dtype="bfloat16")
    assert tune.input_bytes(MergeConfiguration.model_validate(half)) == pytest.approx(
        files / 2, rel=1e-3)


def test_no_scoring_model_under_eval_cmd_and_remote_code_reaches_the_scorer(
        example, tmp_path, monkeypatch):
    import sys

    import transformers

    from mergekit_awd import tune

    _, paths, data, recipe = example
    loads = []
    monkeypatch.setattr(tune, "load_model", lambda *a, **k: loads.append(a) or None)
    script = tmp_path / "s.py"
    script.write_text("print(1.0)\n")
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", tmp_path / "t", "--methods", "awd", "--lambda", "0.3",
                    "--eval-cmd", f"{sys.executable} {script} {{model}}"])
    assert result.exit_code == 0, result.output
    assert loads == []
    monkeypatch.undo()

    seen = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, path, *a, _real=real, _name=cls.__name__, **k):
            seen.setdefault(_name, []).append(k.get("trust_remote_code"))
            return _real(klass, path, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data, tasks=("sort",)),
                    "--out", tmp_path / "t2", "--methods", "awd", "--lambda", "0.3",
                    "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert seen["AutoTokenizer"] == [True] and seen["AutoModelForCausalLM"] == [True]


def test_load_model_passes_the_revision(monkeypatch):
    import transformers

    from mergekit_awd import tune

    seen = {}

    class Stop(Exception):
        pass

    def spy(path, **k):
        seen.update(k)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(Stop):
        tune.load_model("org/model", revision="v2", trust_remote_code=True)
    assert seen["revision"] == "v2" and seen["trust_remote_code"] is True


def test_default_methods_leave_out_data_free_rules_too_slow_at_this_size(example, monkeypatch):
    """A default tune runs wudi, tsv, iso_c and awd_wudi where they are cheap enough to
    form and leaves each out, with its reason, above its size on CPU; --methods names them anyway."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import cli, params, stages, tune

    _, paths, data, recipe = example
    config = MergeConfiguration.model_validate(recipe)
    parameters = sum(t.numel() for t in reference.load(paths["base"]).values())

    def plan(methods=None):
        req = stages.Request(config, MergeOptions(quiet=True), (), (), methods,
                             {p.name: None for p in params.TUNABLE}, None, None, "out",
                             knob_values=cli._knob_values)
        return stages.plan(req)

    small = plan()
    assert {"wudi", "tsv", "iso_c", "awd_wudi"} <= set(small.methods) and not small.left_out
    monkeypatch.setattr(tune, "COSTLY_DEFAULTS", {"wudi": parameters * 0.99,
                                                  "awd_wudi": parameters * 0.99,
                                                  "tsv": parameters * 1.01})
    large = plan()
    assert set(large.left_out) == {"wudi", "awd_wudi"}
    assert "forming it takes hours" in large.left_out["wudi"]
    assert "tsv" in large.methods and "wudi" not in large.methods
    assert "wudi" in plan("awd,wudi").methods  # named: run at any size
