"""`mergekit-awd tune` never loses a run: every scored candidate is in OUT/record.jsonl
as soon as it is scored, a run started again continues it (and ends with the same
table), another run's record is refused, and a learned method that fails leaves the
static results on disk while the run goes on."""

import json

import yaml
from click.testing import CliRunner

TASKS = ("reverse", "sort")
GRID = ["--methods", "awd,task_arithmetic", "--lambda", "0.3,0.6", "--keep-delta", "0"]


class Crash(BaseException):
    """What a lost machine looks like to the process: nothing catches it."""


def _run(example, tmp_path, out, *extra, catch=False, data=None, recipe=None):
    from mergekit_awd.cli import main

    data = data or example[2]
    recipe = recipe or example[3]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["tune", str(path), "--out", str(out), *GRID, *map(str, extra)]
    for t in TASKS:
        args += ["--data", f"{t}={data[f'{t}.val']}", "--test", f"{t}={data[f'{t}.test']}"]
    return CliRunner().invoke(main, args, catch_exceptions=catch)


def _without_timings(table: dict) -> dict:
    """tune.json less the seconds it measured (a reused row keeps its first run's)."""
    table = json.loads(json.dumps(table))
    table.pop("gram_seconds")
    for row in table["candidates"]:
        row.pop("form_seconds", None)
        row.pop("score_seconds", None)
    return table


def _crash_at(monkeypatch, n: int) -> list:
    """The n-th scoring call raises Crash; returns the list of calls."""
    from mergekit_awd import evaluate

    calls = []
    real = evaluate.Scorer.scores

    def scores(self, model, tasks):
        calls.append(len(tasks))
        if len(calls) == n:
            raise Crash()
        return real(self, model, tasks)

    monkeypatch.setattr(evaluate.Scorer, "scores", scores)
    return calls


def test_a_run_stopped_at_any_candidate_continues_to_the_same_table(example, tmp_path,
                                                                    monkeypatch):
    whole = tmp_path / "whole"
    result = _run(example, tmp_path, whole)
    assert result.exit_code == 0, result.output
    expected = json.loads((whole / "tune.json").read_text())
    n_rows = len(expected["candidates"])
    assert n_rows == 5  # 2 x 2 candidates, and the recipe as written
    for stop in (1, 4):  # before any row, and with three rows recorded
        out = tmp_path / f"stopped-{stop}"
        calls = _crash_at(monkeypatch, stop)
        try:
            _run(example, tmp_path, out)
            raise AssertionError("the crash did not stop the run")
        except Crash:
            pass
        recorded = (out / "record.jsonl").read_text().splitlines()
        assert len(recorded) == 1 + stop - 1  # the header and the rows scored before
        assert not (out / "tune.json").exists()
        monkeypatch.undo()
        calls = _crash_at(monkeypatch, 10**6)  # counts, never crashes
        result = _run(example, tmp_path, out)
        monkeypatch.undo()
        assert result.exit_code == 0, result.output
        # the rows recorded were not scored again: only the rest, and the test
        test_calls = 1 + len(expected["comparisons"])
        assert len(calls) == n_rows - (stop - 1) + test_calls
        if stop > 1:
            assert f"tune: reused {stop - 1} of {n_rows} candidates" in result.output
        got = json.loads((out / "tune.json").read_text())
        assert _without_timings(got) == _without_timings(expected)
        assert (out / "best.yml").read_text() == (whole / "best.yml").read_text()
        first = json.loads(recorded[1]) if stop > 1 else None
        if first is not None:  # a reused row is the recorded one, bit for bit
            assert got["candidates"][0] == first


def test_a_finished_run_started_again_scores_nothing_again(example, tmp_path, monkeypatch):
    out = tmp_path / "t"
    assert _run(example, tmp_path, out).exit_code == 0
    first = json.loads((out / "tune.json").read_text())
    calls = _crash_at(monkeypatch, 10**6)
    result = _run(example, tmp_path, out)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 + len(first["comparisons"])  # the test scores alone
    again = json.loads((out / "tune.json").read_text())
    assert again["candidates"] == first["candidates"]  # timings included: the same rows


def test_a_record_of_another_run_is_refused_in_one_line(example, tmp_path):
    out = tmp_path / "t"
    assert _run(example, tmp_path, out).exit_code == 0
    before = (out / "record.jsonl").read_text()
    result = _run(example, tmp_path, out, "--alpha", "0.003", catch=True)
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1]
    assert "record.jsonl: the record of another tune run (its values differs" in message
    assert "--restart" in message
    assert (out / "record.jsonl").read_text() == before  # untouched
    result = _run(example, tmp_path, out, "--alpha", "0.003", "--restart")
    assert result.exit_code == 0, result.output
    assert "reused" not in result.output
    assert json.loads((out / "record.jsonl").read_text().splitlines()[0])["values"][
        "alpha"] == [0.003]


def test_a_changed_data_file_or_model_is_another_run(example, tmp_path):
    import os
    import shutil

    _, paths, data, recipe = example
    data = {k: shutil.copy(v, tmp_path / os.path.basename(v)) for k, v in data.items()}
    add = shutil.copytree(paths["add"], tmp_path / "add")
    recipe = json.loads(json.dumps(recipe))
    recipe["models"] = [{"model": str(add) if m["model"] == paths["add"] else m["model"]}
                        for m in recipe["models"]]
    out = tmp_path / "t"
    assert _run(example, tmp_path, out, data=data, recipe=recipe).exit_code == 0
    with open(data["sort.val"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "S|ba>", "completion": "ab"}) + "\n")
    result = _run(example, tmp_path, out, catch=True, data=data, recipe=recipe)
    assert result.exit_code != 0 and "its data differs" in result.output, result.output
    shutil.copy(example[2]["sort.val"], data["sort.val"])
    os.utime(add / "model.safetensors")  # rewritten in place: another model to the record
    result = _run(example, tmp_path, out, catch=True, data=data, recipe=recipe)
    assert result.exit_code != 0 and "its models differs" in result.output, result.output


def test_a_row_cut_short_by_a_crash_is_scored_again(example, tmp_path, monkeypatch):
    out = tmp_path / "t"
    assert _run(example, tmp_path, out).exit_code == 0
    lines = (out / "record.jsonl").read_text().splitlines()
    (out / "record.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    calls = _crash_at(monkeypatch, 10**6)
    result = _run(example, tmp_path, out)
    assert result.exit_code == 0, result.output
    assert "reused 2 of 5 candidates" in result.output
    assert len(json.loads((out / "tune.json").read_text())["candidates"]) == 5
    assert len(calls) == 3 + 3  # three rows again, then the test


def test_a_failing_learned_method_leaves_the_static_run_and_the_run_goes_on(
        example, tmp_path, monkeypatch):
    from mergekit_awd import learn

    out = tmp_path / "t"
    seen = []
    real = learn.learn

    def failing(former, model, static, *args, **kwargs):
        # the static stage is on disk before any learned method starts
        table = json.loads((out / "tune.json").read_text())
        seen.append((static.method, len(table["candidates"]), (out / "best.yml").exists()))
        if static.method == "awd":
            raise MemoryError("out of memory in build_basis")
        return real(former, model, static, *args, **kwargs)

    monkeypatch.setattr(learn, "learn", failing)
    result = _run(example, tmp_path, out, "--learn", "model", "--learn-steps", "2",
                  "--eval-every", "1", "--metric", "loss")
    assert result.exit_code == 0, result.output
    assert seen == [("awd", 5, True), ("task_arithmetic", 5, True)]
    assert "learn awd: failed: MemoryError: out of memory in build_basis" in result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["learned"][0] == {"method": "awd",
                                   "error": "MemoryError: out of memory in build_basis"}
    assert table["learned"][1]["method"] == "task_arithmetic"
    assert "test" in table  # the run went on to the test
    assert (out / "best.yml").exists() and (out / "learned-task_arithmetic.yml").exists()
