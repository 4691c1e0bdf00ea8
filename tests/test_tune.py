"""`mergekit-awd tune`: candidates formed in memory are mergekit-yaml's merges, the
choice is brute force's, the final merge reuses the Gram pass, bad input is named."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import reference
from conftest import mergekit_yaml

TASKS = ("reverse", "sort", "shift", "add")


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _data_args(data, split="val"):
    args = []
    for t in TASKS:
        args += ["--data" if split == "val" else "--test", f"{t}={data[f'{t}.{split}']}"]
    return args


def _tune(args, catch=False):
    from mergekit_awd.cli import main

    result = CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=catch)
    return result


def _former(recipe):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import tune

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(quiet=True)
    model = tune.load_model(recipe["base_model"])
    return config, tune.Former(config, options, 2**40, model, in_memory=True)


def _candidate(method, lam, alpha=None, keep_delta=None, density=None):
    from mergekit_awd import tune

    values = (("lambda", lam), ("alpha", alpha), ("keep_delta", keep_delta),
              ("density", density))
    return tune.Candidate(method, tuple((k, v) for k, v in values if v is not None))


@pytest.mark.parametrize("scope_, candidate", [
    ("global", ("awd", 0.4, 0.01, 0.0, None)),
    ("global", ("awd", 0.4, 0.003, 1.0, None)),          # keep_delta, another alpha
    ("tensor", ("awd", 0.6, 0.01, 0.0, None)),
    ("global", ("ties", 0.7, None, None, 0.5)),           # a mergekit built-in
])
def test_candidate_in_memory_equals_mergekit_yaml(example, tmp_path, scope_, candidate):
    from mergekit_awd import tune

    _, paths, _, recipe = example
    recipe = json.loads(json.dumps(recipe))
    recipe["parameters"]["scope"] = scope_
    config, former = _former(recipe)
    cand = _candidate(*candidate)
    former.prepare([_candidate("awd", 1.0, 0.01, 0.0), cand])
    assert former.in_memory
    formed = former.form(cand)

    written = tune.candidate_config(config, cand)
    assert written.merge_method == cand.method
    out = tmp_path / "merged"
    mergekit_yaml(yaml.safe_load(written.to_yaml()), out)
    merged = reference.load(str(out))
    base = reference.load(paths["base"])
    assert set(formed) == set(merged)
    for name, tensor in merged.items():
        moved = (tensor.double() - base[name].double()).norm()
        err = (formed[name].double() - tensor.double()).norm() / max(float(moved), 1e-12)
        assert err < 1e-5, (name, err)


def _counting(former):
    """Count the candidates ``former`` forms in full (mergekit's tasks run)."""
    calls, real = [], former._formed
    former._formed = lambda candidate, *a, **k: (calls.append(candidate), real(
        candidate, *a, **k))[1]
    return calls


@pytest.mark.parametrize("room", [True, False])
def test_a_setting_formed_before_is_taken_from_the_shelf(example, room):
    """After other settings were formed, a third lambda of the first setting (a
    method's best scored again on --test) forms nothing where the shelf has room and
    is bit for bit what a former that never left the setting gives; with no room the
    setting is formed again, with the same result."""
    _, _, _, recipe = example
    first = [_candidate("task_arithmetic", lam) for lam in (0.5, 1.0, 0.75)]
    other = [_candidate("ties", lam, density=0.5) for lam in (0.5, 1.0)]
    _, direct = _former(recipe)
    direct.prepare(first + other)
    for c in first[:2]:
        direct.form(c)
    expected = direct.form(first[2])

    _, former = _former(recipe)
    if not room:
        former.shelf.room = 0
    former.prepare(first + other)
    calls = _counting(former)
    for c in first[:2] + other:
        former.form(c)
    assert len(calls) == 4  # each setting: in full at its first lambda, f'(0) at its second
    again = former.form(first[2])
    assert len(calls) == (4 if room else 5)
    assert bool(former.shelf.lines) == room
    assert set(again) == set(expected)
    for name, tensor in expected.items():
        if room:
            assert torch.equal(again[name], tensor), name
        else:
            assert torch.allclose(again[name], tensor, rtol=0, atol=1e-6), name


def test_tune_chooses_what_brute_force_chooses(example, tmp_path):
    """Every candidate merged by mergekit-yaml and scored by the same evaluator."""
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    root, paths, data, recipe = example
    out = tmp_path / "tune"
    args = [_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
            "--methods", "awd,task_arithmetic", "--lambda", "0.3,0.9", "--keep-delta", "0,1",
            "--metric", "loss"]
    result = _tune(args)
    assert result.exit_code == 0, result.output
    with open(out / "tune.json") as f:
        table = json.load(f)
    rows = table["candidates"]
    assert len(rows) == 2 * 2 + 2 + 1  # and the recipe as written, compared last
    assert rows[-1]["as_written"] and rows[-1]["candidate"] == "awd (the recipe as written)"
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    tasks = evaluate.load_tasks([f"{t}={data[f'{t}.val']}" for t in TASKS], tokenizer, "base")
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(recipe)
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    brute = []
    for i, row in enumerate(rows):
        s = row["settings"]
        cand = tune.as_written(config) if row.get("as_written") else _candidate(
            row["method"], s["lambda"], s.get("alpha"), s.get("keep_delta"), s.get("density"))
        folder = tmp_path / f"c{i}"
        # what mergekit-yaml runs, in this process (the recipe through its YAML)
        written = MergeConfiguration.model_validate(
            yaml.safe_load(tune.candidate_config(config, cand).to_yaml()))
        run_merge(written, str(folder), options=MergeOptions(quiet=True))
        scores = evaluate.score(tune.load_model(str(folder)), tasks)
        means = {m: evaluate.mean(scores, m) for m in ("exact", "loss")}
        brute.append({"mean": means, **({"as_written": True} if row.get("as_written") else {})})
        assert means["exact"] == pytest.approx(row["mean"]["exact"], abs=1e-9)
        assert means["loss"] == pytest.approx(row["mean"]["loss"], rel=1e-4)
    assert tune.choose(brute, "loss") == table["best"]
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best["merge_method"] == rows[table["best"]]["method"]
    assert best["parameters"]["lambda"] == rows[table["best"]]["settings"]["lambda"]
    svg = (out / "tune-lambda.svg").read_text()
    assert svg.count("<polyline") == 2  # one line per method


def test_on_disk_forms_the_same_scores(example, tmp_path):
    """Over --max-memory each candidate is written and read back: same table."""
    root, paths, data, recipe = example
    tables = []
    for mode, extra in (("mem", []), ("disk", ["--max-memory", "0.000001"])):
        out = tmp_path / mode
        result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                        "--methods", "awd,ties", "--lambda", "0.4", *extra])
        assert result.exit_code == 0, result.output
        tables.append(json.loads((out / "tune.json").read_text()))
    assert [t["form"] for t in tables] == ["in memory", "on disk"]
    for a, b in zip(tables[0]["candidates"], tables[1]["candidates"]):
        assert a["mean"]["exact"] == b["mean"]["exact"]
        assert a["mean"]["loss"] == pytest.approx(b["mean"]["loss"], rel=1e-5)


def test_recipe_as_written_is_scored_when_its_method_is_not_compared(example, tmp_path):
    """An awd recipe tuned over task_arithmetic alone: the recipe as written still gets
    its row (its Gram pass is made too), the same scores as mergekit's own merge."""
    root, paths, data, recipe = example
    rows = []
    for mode, extra in (("mem", []), ("disk", ["--max-memory", "0.000001"])):
        out = tmp_path / mode
        result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                        "--methods", "task_arithmetic", "--lambda", "0.4", *extra])
        assert result.exit_code == 0, result.output
        (row,) = [r for r in json.loads((out / "tune.json").read_text())["candidates"]
                  if r.get("as_written")]
        assert "error" not in row, row["error"]
        rows.append(row)
    assert rows[0]["mean"]["loss"] == pytest.approx(rows[1]["mean"]["loss"], rel=1e-5)


def test_merge_to_reuses_the_gram_pass(example, tmp_path, monkeypatch):
    from mergekit_awd import scope

    root, paths, data, recipe = example
    passes = []
    real = scope.collect
    monkeypatch.setattr(scope, "collect", lambda ctx, run: passes.append(1) or real(ctx, run))
    merged = tmp_path / "merged"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), *_data_args(data, "test"),
                    "--out", tmp_path / "t", "--methods", "awd", "--lambda", "0.3,0.6",
                    "--alpha", "0.01,0.002", "--merge-to", merged])
    assert result.exit_code == 0, result.output
    assert len(passes) == 1  # tune's own; the final merge made none
    assert "test (awd" in result.output
    rep = json.loads((merged / "awd_report.json").read_text())
    chosen = json.loads((tmp_path / "t" / "tune.json").read_text())
    best = chosen["candidates"][chosen["best"]]["settings"]
    assert rep["parameters"]["alpha"] == best["alpha"]
    assert rep["parameters"]["lambda"] == best["lambda"]
    # the written model is the chosen recipe's mergekit-yaml merge
    again = tmp_path / "again"
    mergekit_yaml(yaml.safe_load((tmp_path / "t" / "best.yml").read_text()), again)
    a, b = reference.load(str(merged)), reference.load(str(again))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_known_gram_is_not_used_for_other_solver_settings(example, tmp_path, monkeypatch):
    """A Gram pass offered for other settings (alpha) must not stand in for the merge's."""
    from mergekit.options import MergeOptions

    from mergekit_awd import context, scope

    _, paths, _, recipe = example
    config, former = _former(recipe)
    former.prepare([_candidate("awd", 0.5, 0.01, 0.0)])
    known = former.known_gram(_candidate("awd", 0.5, 0.02, 0.0))  # other alpha
    passes = []
    real = scope.collect
    monkeypatch.setattr(scope, "collect", lambda ctx, run: passes.append(1) or real(ctx, run))
    context.run_merge(config, str(tmp_path / "m"), MergeOptions(quiet=True), known=known)
    assert len(passes) == 1  # the merge made its own
    rep = json.loads((tmp_path / "m" / "awd_report.json").read_text())
    assert rep["parameters"]["alpha"] == 0.01


@pytest.mark.parametrize("share_prefix", [False, True])
def test_teacher_forced_exact_is_greedy_generation(example, share_prefix):
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    _, paths, data, _ = example
    tokenizer = AutoTokenizer.from_pretrained(paths["sort"])
    tasks = evaluate.load_tasks([data["sort.val"], data["add.val"]], tokenizer, "m")
    model = tune.load_model(paths["sort"])
    assert evaluate.shared_prefix(tasks[0].examples) > 0  # the prefix is really shared
    scores = evaluate.score(model, tasks, batch_tokens=64, share_prefix=share_prefix)
    seen = set()
    for task in tasks:
        for (prompt, answer), got in zip(task.examples, scores[task.name]["exact_each"]):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(answer) + 2,
                                 do_sample=False, pad_token_id=0, eos_token_id=2)
            greedy = out[0, len(prompt):].tolist()
            assert got == float(greedy[:len(answer)] == answer), (prompt, answer, greedy)
            seen.add(got)
    assert seen == {0.0, 1.0}  # both outcomes occur: the check is not vacuous


def test_interrupt_keeps_the_table_so_far(example, tmp_path, monkeypatch):
    from mergekit_awd import evaluate

    root, paths, data, recipe = example
    real, calls = evaluate.score, []

    def score(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "score", score)
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "awd", "--lambda", "0.2,0.4,0.6,0.8"])
    assert result.exit_code == 130, result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["interrupted"] and len(table["candidates"]) == 2
    assert (out / "best.yml").exists()


def test_eval_cmd_chooses(example, tmp_path):
    """An external evaluator: here it prefers lambda 0.6 by reading the written recipe."""
    import sys

    root, paths, data, recipe = example
    script = tmp_path / "score.py"
    script.write_text(
        "import sys, yaml\n"
        "cfg = yaml.safe_load(open(sys.argv[1] + '/mergekit_config.yml'))\n"
        "print('some log line')\n"
        "print(-abs(cfg['parameters']['lambda'] - 0.6))\n")
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "awd", "--lambda", "0.3,0.6,0.9",
                    "--eval-cmd", f"{sys.executable} {script} {{model}}"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["candidates"][table["best"]]["settings"]["lambda"] == 0.6
    assert [r["mean"]["external"] for r in table["candidates"]] == [
        pytest.approx(-0.3), 0.0, pytest.approx(-0.3),
        pytest.approx(-0.1)]  # the recipe as written (lambda 0.5): a reference, never chosen
    assert table["candidates"][-1]["as_written"]
    assert table["comparisons"] == []  # no per-example values to compare


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "R|abc>", "completion": "cba"}\n{"prompt": "R|ab>", \n',
     "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "R|abc>"}\n', "bad.jsonl:1: missing field 'completion'"),
    ('\n\n', "bad.jsonl: no examples (the file is empty)"),
    ('{"messages": [{"role": "user", "content": "R|abc>"}, '
     '{"role": "assistant", "content": "cba"}]}\n',
     "bad.jsonl:1: 'messages' needs a chat template"),
    ('{"messages": [{"role": "user", "content": "R|abc>"}]}\n',
     "bad.jsonl:1: the last message must be the assistant's answer"),
])
def test_bad_data_is_named(example, tmp_path, content, message):
    root, paths, data, recipe = example
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = _tune([_write(tmp_path / "r.yml", recipe), "--data", f"x={bad}",
                    "--out", tmp_path / "t"], catch=True)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args, message", [
    (["--alpha", "-1"], "awd parameter 'alpha' must be a finite number >= 0; got -1.0"),
    (["--keep-delta", "0,-2"], "awd parameter 'keep_delta' must be a finite number >= 0"),
    (["--density", "1.5"], "awd parameter 'density' must be a number in (0, 1]; got 1.5"),
    (["--lambda", "0.5,x"], "expected comma-separated numbers"),
    (["--methods", "awd,tiez"], "mergekit has no merge method 'tiez'"),
    (["--eval-cmd", "echo 1", "--test", "x=nowhere.jsonl"], "--test is scored by the built-in"),
])
def test_bad_grid_is_named(example, tmp_path, args, message):
    root, paths, data, recipe = example
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data),
                    "--out", tmp_path / "t", *args], catch=True)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not (tmp_path / "t").exists()
