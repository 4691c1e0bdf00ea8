"""`mergekit-awd tune --learn`: coefficients per model and layer learned on data.

What is checked: the learned recipe, merged by mergekit-yaml, is the model that was
scored; the gradient is the objective's; per-layer coefficients recover a model no
single lambda reaches; held-out early stopping keeps the held-out best; the keep term
keeps what the base model did; the entropy score is what its definition says; bad
input gets one line and writes nothing.
"""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import reference
from conftest import EXAMPLE_TASKS, mergekit_yaml


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _data_args(data, split="val"):
    flag = "--data" if split == "val" else "--test"
    return [a for t in EXAMPLE_TASKS for a in (flag, f"{t}={data[f'{t}.{split}']}")]


def _tune(args, catch=False):
    from mergekit_awd.cli import main

    return CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=catch)


def _former(recipe, options=None):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import tune

    config = MergeConfiguration.model_validate(recipe)
    options = options or MergeOptions(quiet=True)
    model = tune.load_model(recipe["base_model"])
    return config, options, model, tune.Former(config, options, 2**40, model, in_memory=True)


def _static(method, **values):
    from mergekit_awd import tune

    return tune.Candidate(method, tuple(values.items()))


def _assert_same_model(formed, merged, base):
    assert set(formed) == set(merged)
    for name, tensor in merged.items():
        moved = (tensor.double() - base[name].double()).norm()
        err = (formed[name].double() - tensor.double()).norm() / max(float(moved), 1e-12)
        assert err < 1e-5, (name, err)


# -- the recipe is the model --------------------------------------------------------


@pytest.mark.parametrize("method, extra, static", [
    ("awd", {"scope": "global"}, {"lambda": 0.4, "alpha": 0.01, "keep_delta": 0.0}),
    # per-tensor solves, delta kept in part, the norms and embeddings by task arithmetic
    ("awd", {"scope": "tensor", "select": "mlp"}, {"lambda": 0.6, "alpha": 0.01,
                                                   "keep_delta": 0.5}),
    ("task_arithmetic", {}, {"lambda": 0.3}),
])
def test_learned_recipe_through_mergekit_yaml_is_the_scored_model(example, tmp_path, method,
                                                                  extra, static):
    from mergekit_awd import learn

    _, paths, _, recipe = example
    recipe = json.loads(json.dumps(recipe))
    recipe["parameters"].update(extra)
    recipe["models"][1]["parameters"] = {"weight": 0.7}  # the start honours the weights
    config, options, model, former = _former(recipe)
    candidate = _static(method, **static)
    former.prepare([candidate])
    setup = learn.prepare(former, candidate, "layer", options)
    assert setup.groups.labels == ["layer 0", "layer 1", "layer 2", "other"]
    lam = static["lambda"]
    assert np.allclose(setup.gamma0[:, 0], [lam, 0.7 * lam, lam, lam])
    gamma = setup.gamma0 + np.random.default_rng(0).normal(0, 0.3, setup.gamma0.shape)
    formed = setup.tensors(gamma)

    written = yaml.safe_load(setup.config(gamma).to_yaml())
    assert written["merge_method"] == method
    assert written["parameters"]["lambda"] == 1.0
    filters = written["models"][0]["parameters"]["weight"]
    assert [f.get("filter") for f in filters] == [
        "model.layers.0.", "model.layers.1.", "model.layers.2.", None]
    out = tmp_path / "merged"
    mergekit_yaml(written, out)
    _assert_same_model(formed, reference.load(str(out)), reference.load(paths["base"]))


# -- the gradient ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float64_family(tmp_path_factory):
    from synthetic import make_family

    return make_family(str(tmp_path_factory.mktemp("f64")), n_models=3, shared=0.05,
                       noise=0.2, dtype=torch.float64, seed=3)


@pytest.mark.parametrize("objective", ["loss", "entropy"])
def test_gradient_matches_finite_differences(float64_family, objective, monkeypatch):
    from transformers.models.llama import modeling_llama

    from mergekit_awd import learn

    # Llama's RMSNorm computes in float32 whatever the model's dtype: that rounding
    # (1e-7) would swamp a float64 finite difference
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", lambda self, x: (
        self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)))

    recipe = {"merge_method": "awd", "base_model": float64_family["base"],
              "models": [{"model": m} for m in float64_family["fts"]],
              "parameters": {"lambda": 0.5, "alpha": 0.01, "steps": 100},
              "dtype": "float64"}
    config, options, model, former = _former(recipe)
    model.double()
    candidate = _static("awd", **{"lambda": 0.5})
    former.prepare([candidate])
    setup = learn.prepare(former, candidate, "layer", options)
    assert next(iter(setup.basis.vectors.values())).dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, 64, (5,), generator=g).tolist(),
                 torch.randint(0, 64, (3,), generator=g).tolist()) for _ in range(4)]
    gamma = torch.tensor(setup.gamma0, dtype=torch.float64) + 0.1
    value, grad = learn.gradient(model, setup.basis, setup.groups, gamma, examples, objective)
    assert grad.shape == gamma.shape and grad.abs().max() > 1e-4
    h = 1e-4
    for k in range(gamma.shape[0]):
        for j in range(gamma.shape[1]):
            up, down = gamma.clone(), gamma.clone()
            up[k, j] += h
            down[k, j] -= h
            f_up, _ = learn.gradient(model, setup.basis, setup.groups, up, examples, objective)
            f_down, _ = learn.gradient(model, setup.basis, setup.groups, down, examples,
                                       objective)
            numeric = (f_up - f_down) / (2 * h)
            assert numeric == pytest.approx(float(grad[k, j]), rel=1e-5, abs=1e-10), (k, j)


# -- per-layer coefficients are what a layered fixture needs ------------------------------


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """Two fine-tunes of a 4-layer model: A's useful change is in layers 0-1 and noise
    in layers 2-3, B the other way round. The ideal model takes each useful change
    alone; its greedy answers to random prompts are the data."""
    from transformers import LlamaForCausalLM

    from synthetic import tiny_llama_config

    root = tmp_path_factory.mktemp("layered")
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=4, initializer_range=0.2)  # peaked outputs
    model = LlamaForCausalLM(config).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)

    def change(layers, scale):
        out = {}
        for k, v in base.items():
            if v.ndim == 2 and any(f"layers.{i}." in k for i in layers):
                out[k] = scale * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g)
        return out

    useful = {"a": change((0, 1), 1.0), "b": change((2, 3), 1.0)}
    noise = {"a": change((2, 3), 1.5), "b": change((0, 1), 1.5)}
    paths = {}

    def save(name, *parts):
        state = {k: v.clone() for k, v in base.items()}
        for part in parts:
            for k, v in part.items():
                state[k] += v
        model.load_state_dict(state)
        model.save_pretrained(str(root / name))
        paths[name] = str(root / name)

    save("base")
    save("a", useful["a"], noise["a"])
    save("b", useful["b"], noise["b"])
    save("ideal", useful["a"], useful["b"])
    ideal = LlamaForCausalLM.from_pretrained(paths["ideal"]).eval()
    prompts = torch.randint(3, 64, (96, 6), generator=g)
    with torch.no_grad():
        out = ideal.generate(prompts, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                             eos_token_id=None, pad_token_id=0)
    examples = [(p.tolist(), a.tolist()) for p, a in zip(prompts, out[:, 6:])]
    return paths, examples


def _loss_tasks(examples):
    from mergekit_awd import evaluate

    return [evaluate.Task("a", "a", examples[:len(examples) // 2]),
            evaluate.Task("b", "b", examples[len(examples) // 2:])]


class _Learning:
    def __init__(self, kind, steps, lr, eval_every=10):
        self.kind, self.objective, self.steps, self.lr = kind, "loss", steps, lr
        self.batch, self.eval_every = 16, eval_every


def test_per_layer_coefficients_close_the_gap_no_single_lambda_can(layered):
    from mergekit_awd import evaluate, learn, tune

    paths, examples = layered
    fit_tasks, held_tasks = _loss_tasks(examples[:64]), _loss_tasks(examples[64:])
    scorer = evaluate.Scorer("loss", [], 8, 4096)
    ideal = scorer.measure(tune.load_model(paths["ideal"]), held_tasks)["loss"]
    recipe = {"merge_method": "task_arithmetic", "base_model": paths["base"],
              "models": [{"model": paths["a"]}, {"model": paths["b"]}],
              "parameters": {"lambda": 1.0}, "dtype": "float32"}
    config, options, model, former = _former(recipe)
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    candidates = [_static("task_arithmetic", **{"lambda": lam}) for lam in lambdas]
    former.prepare(candidates)
    static = {}
    for c in candidates:
        tune.swap_in(model, former.form(c))
        static[c] = scorer.measure(model, held_tasks)["loss"]
    best = min(static, key=static.get)
    gaps = {}
    for kind in ("layer", "model"):
        entry = learn.learn(former, model, best, _Learning(kind, 150, 0.05), fit_tasks,
                            held_tasks, scorer, options)
        gaps[kind] = (static[best] - entry.summary["held_out"]["loss"]) / (static[best] - ideal)
    assert static[best] - ideal > 0.5  # a gap worth closing
    assert gaps["layer"] > 0.75, gaps  # per layer: most of it
    assert gaps["model"] < 0.5, gaps   # one coefficient per model cannot


def _layered_fit_from_ta(layered):
    """The layered fixture's examples, the base model's own greedy answers to the
    prompts of examples 64-, and a per-layer fit's setup from task arithmetic at
    lambda 0.25 (model, setup, scorer)."""
    from mergekit_awd import evaluate, learn, tune

    paths, examples = layered
    base = tune.load_model(paths["base"])
    prompts = [p for p, _ in examples[64:]]
    own = list(zip(prompts, evaluate.greedy_answers(base, prompts, [], 4)))
    recipe = {"merge_method": "task_arithmetic", "base_model": paths["base"],
              "models": [{"model": paths["a"]}, {"model": paths["b"]}],
              "parameters": {"lambda": 1.0}, "dtype": "float32"}
    config, options, model, former = _former(recipe)
    candidate = _static("task_arithmetic", **{"lambda": 0.25})
    former.prepare([candidate])
    setup = learn.prepare(former, candidate, "layer", options)
    return examples, own, model, setup, evaluate.Scorer("loss", [], 8, 4096)


def test_early_stopping_keeps_the_held_out_best(layered):
    """Fit towards the ideal model's answers, hold out the base model's: the held-out
    score gets worse as the fit proceeds, and the coefficients kept are those of the
    best held-out evaluation, not the last."""
    from mergekit_awd import learn

    examples, own, model, setup, scorer = _layered_fit_from_ta(layered)
    fit_tasks = _loss_tasks(examples[:64])
    held_tasks = _loss_tasks(own)
    result = learn.fit(model, setup.basis, setup.groups, setup.gamma0, fit_tasks, held_tasks,
                       scorer.measure, scorer.rank, steps=40, lr=0.05, batch=16,
                       eval_every=5)
    losses = [h["held_out"]["loss"] for h in result.history]
    best = int(np.argmin(losses))
    assert result.step == result.history[best]["step"]
    assert torch.allclose(result.gamma, torch.tensor(result.history[best]["gamma"]))
    assert best < len(losses) - 1 and losses[-1] > losses[best] + 1e-3  # not vacuous


def test_the_keep_term_keeps_what_the_base_model_did(layered):
    """The tasks pull towards the ideal model, the keep set is the base model's own
    answers to other prompts: the same fit with a keep weight ends with a keep loss
    (on keep examples no step saw) far below the fit without it, and below the static
    start. (On the example models the tasks' and the base's answers barely conflict,
    and the two fits' keep losses differed by less than the noise of 8 prompts, in a
    direction that changed with the CPU.)"""
    from mergekit_awd import evaluate, learn
    from mergekit_awd.keep import Keep

    examples, own, model, setup, scorer = _layered_fit_from_ta(layered)
    history = {}
    for weight in (0, 5):
        keep = Keep(report=evaluate.Task("keep", "keep", own[16:]),
                    fit=evaluate.Task("keep", "keep", own[:16]), weight=weight, digest="-")
        history[weight] = learn.fit(
            model, setup.basis, setup.groups, setup.gamma0, _loss_tasks(examples[:48]),
            _loss_tasks(examples[48:64]), scorer.measure, scorer.rank, steps=20, lr=0.05,
            batch=16, eval_every=10, keep=keep).history
    none, heavy = (history[w][-1]["keep_loss"] for w in (0, 5))
    assert heavy < 0.75 * none, (heavy, none)  # measured: 0.46 to 0.5 of it, 4 seeds
    assert heavy < history[5][0]["keep_loss"]


# -- entropy --------------------------------------------------------------------------------


def test_self_entropy_is_the_entropy_over_the_models_own_greedy_answer(example):
    from mergekit_awd import evaluate, tune

    _, paths, _, _ = example
    model = tune.load_model(paths["sort"])
    import examples

    prompts = [[1] + examples.encode(text) for text in ("S|4213>", "R|ab>", "S|987123>")]
    with torch.no_grad():  # the end token: what the model says first after prompt 0
        first = int(model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    tasks = [evaluate.Task("t", "t", [(p, None) for p in prompts])]
    got = evaluate.self_entropy(model, tasks, [first], max_new_tokens=5)["t"]["entropy_each"]
    for prompt, value in zip(prompts, got):
        seq, entropies = list(prompt), []
        for _ in range(5):  # greedy, one full forward per token, no cache
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].double()
            p = torch.softmax(logits, -1)
            entropies.append(float(-(p * p.log()).sum()))
            seq.append(int(logits.argmax()))
            if seq[-1] == first:
                break
        assert value == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert len(set(round(v, 6) for v in got)) == 3


# -- the command ------------------------------------------------------------------------------


def test_tune_learn_writes_the_recipe_it_scored(example, tmp_path, monkeypatch):
    from mergekit_awd import learn

    _, paths, data, recipe = example
    made = []
    real = learn.learn
    monkeypatch.setattr(learn, "learn", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), *_data_args(data, "test"),
                    "--out", out, "--methods", "awd", "--lambda", "0.3,0.6", "--learn", "layer",
                    "--learn-steps", "6", "--eval-every", "2", "--learn-lr", "0.1",
                    "--metric", "loss"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    (entry,) = made
    summary = table["learned"][0]
    assert summary["groups"] == ["layer 0", "layer 1", "layer 2", "other"]
    assert np.array(summary["gamma"]).shape == (4, 4)
    assert [h["step"] for h in summary["history"]] == [0, 2, 4, 6]
    assert summary["step_kept"] > 0  # the loss went down: gamma moved
    assert np.abs(np.array(summary["gamma"]) - np.array(summary["gamma_start"])).max() > 0.05
    assert (out / "learned.yml").read_text() == (out / "learned-awd.yml").read_text()
    assert (out / "learned.svg").read_text().count("<rect") == 1 + 4 * 4
    assert "test (awd learned per layer" in result.output
    # what mergekit-yaml makes of learned.yml is what tune scored
    merged = tmp_path / "merged"
    mergekit_yaml(yaml.safe_load((out / "learned.yml").read_text()), merged)
    _assert_same_model(entry.tensors, reference.load(str(merged)), reference.load(paths["base"]))
    chosen = table["best_learned"] is not None
    assert ((out / "best.yml").read_text() == (out / "learned.yml").read_text()) == chosen


def test_static_stays_best_when_learning_does_not_beat_it(example, tmp_path):
    from mergekit.config import MergeConfiguration

    from mergekit_awd import tune

    _, paths, data, recipe = example
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "awd,task_arithmetic", "--lambda", "0.3", "--learn", "model",
                    "--learn-steps", "0"])
    assert result.exit_code == 0, result.output
    assert "no fit moved from its static start (step 0 kept)" in result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["best_learned"] is None
    best = table["candidates"][table["best"]]
    cand = tune.Candidate(best["method"], tuple(best["settings"].items()))
    expected = tune.candidate_config(MergeConfiguration.model_validate(recipe), cand)
    assert (out / "best.yml").read_text() == expected.to_yaml()
    assert (out / "learned.yml").exists()


def test_interrupt_keeps_the_best_coefficients_so_far(example, tmp_path, monkeypatch):
    from mergekit_awd import learn

    _, paths, data, recipe = example
    real, calls = learn._step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(learn, "_step", step)
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out", out,
                    "--methods", "awd", "--lambda", "0.3", "--learn", "layer",
                    "--learn-steps", "20", "--eval-every", "2", "--metric", "loss"])
    assert result.exit_code == 130, result.output
    table = json.loads((out / "tune.json").read_text())
    summary = table["learned"][0]
    assert table["interrupted"] and summary["interrupted"]
    assert [h["step"] for h in summary["history"]] == [0, 2, 4]
    kept = min(summary["history"], key=lambda h: h["held_out"]["loss"])
    assert summary["step_kept"] == kept["step"]
    assert (out / "learned.yml").exists() and (out / "best.yml").exists()


def _prompts(tasks):
    return {(t.name, str(p)) for t in tasks for p, _ in t.examples}


def test_fit_step_and_decision_use_disjoint_examples(example, tmp_path, monkeypatch):
    """Each stage of --learn sees examples no earlier stage used: the search and the fit
    never score the decision part; the fit never the step part; the decision, scored on
    both merges, decides best.yml; --test scores both and keeps their paired difference."""
    from mergekit_awd import evaluate, learn, stages

    _, paths, data, recipe = example
    seen, parts = [], {}
    scores = evaluate.Scorer.scores
    monkeypatch.setattr(evaluate.Scorer, "scores", lambda self, model, tasks: (
        seen.append(_prompts(tasks)), scores(self, model, tasks))[1])
    real_learn, real_decide = learn.learn, stages.decide

    def learn_(*a, **k):
        parts["fit"], parts["step"] = _prompts(a[4]), _prompts(a[5])
        return real_learn(*a, **k)

    def decide_(req, ins, *a):
        parts["decide"], parts["before"] = _prompts(ins.decide_tasks), list(seen)
        return real_decide(req, ins, *a)

    monkeypatch.setattr(learn, "learn", learn_)
    monkeypatch.setattr(stages, "decide", decide_)
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), *_data_args(data, "test"),
                    "--out", out, "--methods", "awd", "--lambda", "0.3,0.6", "--learn", "model",
                    "--learn-steps", "4", "--eval-every", "2", "--learn-lr", "0.2",
                    "--metric", "loss"])
    assert result.exit_code == 0, result.output
    everything = sum(1 for t in EXAMPLE_TASKS for _ in open(data[f"{t}.val"]))
    fit, step, decide = parts["fit"], parts["step"], parts["decide"]
    assert fit and step and decide
    assert not fit & step and not (fit | step) & decide and len(fit | step | decide) == everything
    assert all(not s & decide for s in parts["before"])  # search, fit, step: never the decision
    table = json.loads((out / "tune.json").read_text())
    d = table["decision"]
    assert sum(d["examples"].values()) == len(decide)
    assert (table["best_learned"] is not None) == d["adopted"]
    assert d["adopted"] == (d["ci95"][1] < 0)  # loss: lower is better
    assert ((out / "best.yml").read_text() == (out / "learned.yml").read_text()) == d["adopted"]
    # --test: the learned merge and the static choice both scored, their paired difference kept
    by = {t["candidate"]: t for t in [table["test"], *table.get("test_learned", []),
                                       *([table["test_static"]] if "test_static" in table else [])]}
    diff = np.mean([np.mean(np.subtract(by[d["learned"]]["scores"][t]["loss_each"],
                                        by[d["static"]]["scores"][t]["loss_each"]))
                    for t in EXAMPLE_TASKS])
    assert d["test"]["difference"] == pytest.approx(diff, abs=1e-9)
    assert "test (learned - static, scored once): " in result.output


@pytest.mark.parametrize("metric, learned, static, adopted", [
    ("exact", [1] * 12 + [0] * 8, [0] * 6 + [1] * 10 + [0] * 4, False),  # +0.1 in noise
    ("exact", [1] * 18 + [0] * 2, [1] * 4 + [0] * 16, True),
    ("loss", [0.5] * 20, [0.6] * 19 + [0.4], True),
    ("loss", [0.6] * 20, [0.5] * 20, False),  # the learned merge is worse
])
def test_learned_merge_is_adopted_only_where_the_interval_excludes_zero(
        metric, learned, static, adopted):
    from mergekit_awd import learn

    wrap = lambda v: {"t": {metric: float(np.mean(v)), f"{metric}_each": v}}  # noqa: E731
    verdict = learn.verdict(wrap(learned), wrap(static), metric)
    assert verdict["adopted"] is adopted
    assert verdict["difference"] == pytest.approx(np.mean(learned) - np.mean(static))


@pytest.mark.parametrize("args, message", [
    (["--methods", "awd,ties"], "--learn: ties is not a weighted sum of task vectors"),
    (["--decide", "1"], "--decide must be in (0, 1); got 1"),
    (["--methods", "slerp"], "--learn works with awd and task_arithmetic"),
    (["--eval-cmd", "echo 1"], "--learn fits and stops on the built-in scores"),
    (["--holdout", "1.5"], "must be in (0, 1); got 1.5"),
    (["--max-memory", "0.000001"], "--learn needs about"),
    (["--objective", "loss", "--prompts-only"], "p.jsonl:1: missing field 'completion'"),
    (["--metric", "loss", "--objective", "entropy", "--prompts-only"],
     "some examples have no completion, which --metric loss needs"),
])
def test_learn_bad_input_is_one_line_and_writes_nothing(example, tmp_path, args, message):
    _, paths, data, recipe = example
    if "--prompts-only" in args:
        args = [a for a in args if a != "--prompts-only"]
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "R|abc>"}\n{"prompt": "R|ab>"}\n')
        data_args = ["--data", f"p={prompts}"]
    else:
        data_args = _data_args(data)
    result = _tune([_write(tmp_path / "r.yml", recipe), *data_args, "--out", tmp_path / "t",
                    "--learn", "layer", *args], catch=True)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not (tmp_path / "t").exists()


def test_learn_refuses_adam_naming_why(example, tmp_path):
    _, paths, data, recipe = example
    recipe = json.loads(json.dumps(recipe))
    recipe["parameters"].update(optimizer="adam", steps=5)
    result = _tune([_write(tmp_path / "r.yml", recipe), *_data_args(data), "--out",
                    tmp_path / "t", "--methods", "awd", "--lambda", "0.3", "--learn",
                    "model"], catch=True)
    assert result.exit_code != 0
    assert "optimizer: adam's delta is not in their span" in result.output, result.output
    assert not (tmp_path / "t").exists()


def test_entropy_objective_learns_from_prompts_alone(example, tmp_path):
    _, paths, data, recipe = example
    prompts = {}
    for t in ("reverse", "sort"):
        lines = [json.loads(x) for x in open(data[f"{t}.val"])]
        path = tmp_path / f"{t}.jsonl"
        path.write_text("".join(json.dumps({"prompt": x["prompt"]}) + "\n" for x in lines))
        prompts[t] = path
    out = tmp_path / "t"
    result = _tune([_write(tmp_path / "r.yml", recipe),
                    *[a for t in prompts for a in ("--data", f"{t}={prompts[t]}")],
                    "--out", out, "--methods", "awd", "--lambda", "0.3,0.6",
                    "--learn", "model", "--objective", "entropy", "--learn-steps", "4",
                    "--eval-every", "2", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "tune.json").read_text())
    assert table["metric"] == "entropy"
    assert table["learned"][0]["objective"] == "entropy"
    assert all("entropy" in r["mean"] for r in table["candidates"])
    assert os.path.exists(out / "learned.yml")
