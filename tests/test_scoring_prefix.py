"""Scoring with the shared prompt prefix passed once (``evaluate._passes``): the
prefix's key/value cache is reused by every row and the head runs on the answer
positions only. It must give every causal family users merge the scores of full
passes, and a model whose cache does not reproduce the full pass must be scored by
full passes (``prefix_agrees`` is False)."""

import random

import pytest
import torch

from families import FAMILIES, build_model

CAUSAL = [f for f in FAMILIES if f != "roberta"]  # tune scores causal LMs


def _tasks():
    from mergekit_awd.evaluate import Task

    rng = random.Random(0)
    system = [rng.randrange(3, 60) for _ in range(20)]  # a chat template's system turn
    tasks = []
    for name, lead in (("one", [5, 6]), ("two", [7])):
        examples = []
        for _ in range(9):
            own = [rng.randrange(3, 60) for _ in range(rng.randrange(1, 9))]
            answer = [rng.randrange(3, 60) for _ in range(rng.randrange(1, 5))]
            examples.append((system + lead + own, answer))
        tasks.append(Task(name, name + ".jsonl", examples))
    return tasks


@pytest.mark.parametrize("family", CAUSAL)
def test_shared_prefix_scores_are_the_full_pass_scores(family):
    from mergekit_awd import evaluate

    model = build_model(family).eval()
    tasks = _tasks()
    assert evaluate.shared_prefix(tasks[0].examples) == 22
    assert evaluate.prefix_agrees(model, tasks), family
    # batches of a few rows: several batches per task, each its own copy of the cache
    full = evaluate.score(model, tasks, batch_tokens=60)
    shared = evaluate.score(model, tasks, batch_tokens=60, share_prefix=True)
    for task in tasks:
        a, b = full[task.name], shared[task.name]
        assert b["exact_each"] == a["exact_each"]
        assert b["loss_each"] == pytest.approx(a["loss_each"], abs=1e-5)
    # the entropy of the model's own answers, too
    ends = [4]
    full = evaluate.self_entropy(model, tasks, ends, max_new_tokens=4, batch_tokens=60)
    shared = evaluate.self_entropy(model, tasks, ends, max_new_tokens=4, batch_tokens=60,
                                   share_prefix=True)
    for task in tasks:
        assert shared[task.name]["entropy_each"] == pytest.approx(
            full[task.name]["entropy_each"], abs=1e-5)


def test_a_model_whose_cache_is_not_the_full_pass_is_scored_by_full_passes():
    from transformers import LlamaForCausalLM

    from mergekit_awd import evaluate

    class Forgetful(LlamaForCausalLM):
        """Drops the cache it is given: rows would not see the prefix."""

        def forward(self, input_ids=None, attention_mask=None, cache=None,
                    logits_to_keep=0, use_cache=None, **kw):
            if cache is not None:
                attention_mask = attention_mask[:, -input_ids.shape[1]:]
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep)

    class Refusing(LlamaForCausalLM):
        def forward(self, *a, cache=None, **kw):
            if cache is not None:
                raise NotImplementedError("no cache reuse here")
            return super().forward(*a, **kw)

    good = build_model("llama")
    tasks = _tasks()
    for kind in (Forgetful, Refusing):
        model = kind(good.config)
        model.load_state_dict(good.state_dict())
        assert not evaluate.prefix_agrees(model.eval(), tasks), kind.__name__
    assert evaluate.prefix_agrees(good.eval(), tasks)
