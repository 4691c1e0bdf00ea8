"""`mergekit-awd tune --keep`: what the merged model must go on doing.

What is checked: the keep loss tune reports is a merge's loss on the reference model's
own greedy answers (a naive token-by-token reference, through the model mergekit-yaml
writes from best.yml); the fit sees only the keep examples it owns, the report and
the decision the others (that the term moves the fit is checked in test_learn.py,
on a fixture where the tasks and the keep set pull apart); a learned merge that
forgets is not adopted; a recorded run gains its keep losses without being scored
again; bad input gets one line and writes nothing.
"""

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import EXAMPLE_TASKS, mergekit_yaml

CONTEXT = 20  # the example models' max_position_embeddings


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _data_args(data):
    return [a for t in EXAMPLE_TASKS for a in ("--data", f"{t}={data[f'{t}.val']}")]


def _tune(args, catch=False):
    from mergekit_awd.cli import main

    return CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=catch)


def _keep_file(tmp_path, data, n=4, given=1):
    """Prompts alone from each task's test split, and ``given`` with their answer."""
    lines = []
    for t in EXAMPLE_TASKS:
        rows = [json.loads(x) for x in open(data[f"{t}.test"])][:n]
        lines += [{"prompt": r["prompt"]} for r in rows[given:]]
        lines += rows[:given]
    path = tmp_path / "keep.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, lines


def _naive_answer(model, prompt, ends, limit):
    seq = list(prompt)
    with torch.no_grad():
        while len(seq) - len(prompt) < limit:
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] in ends:
                break
    return seq[len(prompt):]


def _naive_loss(model, pairs):
    losses = []
    with torch.no_grad():
        for prompt, answer in pairs:
            logits = model(torch.tensor([prompt + answer])).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            losses.append(float(-logp[range(len(answer)), answer].mean()))
    return float(np.mean(losses))


@pytest.mark.parametrize("reference", ["base", "sort"])
def test_keep_loss_is_the_loss_on_the_reference_models_own_answers(example, tmp_path,
                                                                   reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths, data, recipe = example
    keep, lines = _keep_file(tmp_path, data)
    out = tmp_path / "t"
    extra = [] if reference == "base" else ["--keep-model", paths[reference]]
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "awd", "--lambda", "0.3,0.9", "--keep", keep,
                    "--max-new-tokens", "8", *extra])
    assert result.exit_code == 0, result.output
    head = next(x for x in result.output.splitlines() if x.strip().startswith("candidate"))
    assert "keep loss  chosen - this" in head
    table = json.loads((out / "tune.json").read_text())
    losses = [r["keep"]["loss"] for r in table["candidates"]]
    assert all(r["keep"]["examples"] == len(lines) for r in table["candidates"])
    assert len(set(np.round(losses, 6))) == len(losses)  # the merges differ in what they keep
    # independently: the reference's greedy answers, the merge of best.yml, its loss on them
    tok = AutoTokenizer.from_pretrained(paths["base"])
    ref = AutoModelForCausalLM.from_pretrained(paths[reference], dtype=torch.float32).eval()
    pairs = []
    for line in lines:
        prompt = tok(line["prompt"], add_special_tokens=True)["input_ids"]
        if "completion" in line:
            answer = tok(line["completion"], add_special_tokens=False)["input_ids"]
            answer.append(tok.eos_token_id)
        else:
            answer = _naive_answer(ref, prompt, {tok.eos_token_id}, min(8, CONTEXT - len(prompt)))
        pairs.append((prompt, answer))
    merged = tmp_path / "merged"
    mergekit_yaml(yaml.safe_load((out / "best.yml").read_text()), merged)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    best = table["candidates"][table["best"]]
    assert best["keep"]["loss"] == pytest.approx(_naive_loss(model, pairs), rel=1e-4)


def _learn(example, tmp_path, name, weight, monkeypatch=None, seen=None):
    from mergekit_awd import learn, stages

    _, paths, data, recipe = example
    keep, lines = _keep_file(tmp_path, data, n=8, given=0)
    if seen is not None:
        real = learn._step

        def step(*a, **k):
            seen.append((a[5], a[9]))
            return real(*a, **k)

        real_decide = stages.decide

        def decide(req, ins, *a):
            seen.append(ins.keep)
            return real_decide(req, ins, *a)

        monkeypatch.setattr(learn, "_step", step)
        monkeypatch.setattr(stages, "decide", decide)
    out = tmp_path / name
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "task_arithmetic", "--lambda", "0.8", "--keep", keep,
                    "--keep-weight", weight, "--learn", "layer", "--learn-steps", "8",
                    "--eval-every", "4", "--learn-lr", "0.1", "--metric", "loss",
                    "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "tune.json").read_text()), lines, result.output


def test_learn_fits_the_keep_part_and_reports_on_the_other(example, tmp_path, monkeypatch):
    seen = []
    table, lines, output = _learn(example, tmp_path, "t", 1, monkeypatch, seen)
    summary = table["learned"][0]
    *steps, keep = seen
    assert len(steps) == 8 and all(weight == 1 for _, (_, weight) in steps)
    tokens = lambda rows: sum(len(p) + len(a) for p, a in rows)  # noqa: E731
    for examples, (kept, _) in steps:  # within 40% of the step's task tokens, or one
        assert len(kept) == 1 or tokens(kept) <= 0.4 * tokens(examples)
    fitted = {str(p) for _, (kept, _) in steps for p, _ in kept}
    fit, report = ({str(p) for p, _ in part.examples} for part in (keep.fit, keep.report))
    assert fitted and fitted <= fit and not fit & report
    reported = summary["keep"]["examples"]
    assert reported == len(report) == round(0.25 * len(lines))  # --holdout's share
    assert [h["step"] for h in summary["history"]] == [0, 4, 8]
    assert all("keep_loss" in h for h in summary["history"])
    assert summary["history"][0]["keep_loss"] == pytest.approx(summary["static_keep_loss"],
                                                               rel=1e-5)
    static = table["candidates"][table["best"]]
    assert static["keep"]["examples"] == reported
    assert "keep" in table["decision"] and "decision, keep loss" in output
    assert "fit loss + 1 x keep" in output


@pytest.mark.parametrize("keep_learned, adopted", [
    ([0.5] * 20, True),  # keeps as much as the static merge: adopted on its gain
    ([0.9] * 19 + [0.5], False),  # forgets: separated as worse
])
def test_a_learned_merge_that_forgets_is_not_adopted(keep_learned, adopted):
    from mergekit_awd import learn

    wrap = lambda v: {"t": {"exact": float(np.mean(v)), "exact_each": v}}  # noqa: E731
    keeps = ({"loss_each": keep_learned}, {"loss_each": [0.5] * 19 + [0.6]})
    verdict = learn.verdict(wrap([1] * 18 + [0] * 2), wrap([1] * 4 + [0] * 16), "exact", keeps)
    assert verdict["adopted"] is adopted
    assert verdict["keep"]["difference"] == pytest.approx(np.mean(keep_learned) - 0.505)
    assert ("forgets" in verdict.get("why_not", "")) is not adopted


def test_a_recorded_run_gains_keep_losses_without_scoring_again(example, tmp_path,
                                                                 monkeypatch):
    from mergekit_awd import evaluate

    _, paths, data, recipe = example
    keep, _ = _keep_file(tmp_path, data)
    out = tmp_path / "t"
    args = [_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
            "--methods", "awd", "--lambda", "0.3,0.9", "--max-new-tokens", "8"]
    assert _tune(args).exit_code == 0
    scored = []
    real = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda model, tasks, *a, **k: (
        scored.append([t.name for t in tasks]), real(model, tasks, *a, **k))[1])
    result = _tune(args + ["--keep", keep])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    assert result.output.count("reused from the record") == len(table["candidates"]) == 3
    assert [n for n in scored if n] == [["keep"]] * 3  # the tasks were not scored again
    assert result.output.count(": keep loss ") == 3
    assert all("keep" in r for r in table["candidates"])
    result = _tune(args + ["--keep", keep])  # the record has them now
    assert result.exit_code == 0 and result.output.count(": keep loss ") == 0


@pytest.mark.parametrize("args, message", [
    (["--keep", "missing.jsonl"], "--keep missing.jsonl: no such file"),
    (["--keep", "EMPTY"], "the file is empty"),
    (["--keep", "KEEP", "--keep-weight", "-1"], "--keep-weight must be a number >= 0"),
    (["--keep", "KEEP", "--keep-weight", "nan"], "do not fit it); got nan"),
    (["--keep-weight", "2"], "--keep-weight is given without --keep"),
    (["--keep-model", "x"], "--keep-model is given without --keep"),
    (["--keep", "KEEP", "--eval-cmd", "echo 1"], "--keep is scored by the built-in scorer"),
    (["--keep", "LONG"], "example 2 does not fit the model's context of 20 tokens"),
    (["--keep", "KEEP", "--keep-model", "NOWHERE"], "--keep-model NOWHERE"),
])
def test_keep_bad_input_is_one_line_and_writes_nothing(example, tmp_path, args, message):
    _, paths, data, recipe = example
    files = {"EMPTY": "\n", "KEEP": '{"prompt": "R|abc>"}\n',
             "LONG": '{"prompt": "R|abc>"}\n{"prompt": "' + "a" * 30 + '"}\n'}
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    args = [str(tmp_path / f"{a}.jsonl") if a in files else
            str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    message = message.replace("NOWHERE", str(tmp_path / "nowhere"))
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out",
                    tmp_path / "t", "--methods", "awd", "--lambda", "0.3", *args], catch=True)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not (tmp_path / "t").exists()
