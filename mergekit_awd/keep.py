"""``tune --keep``: what the merged model must go on doing.

A keep set is prompts (answers optional) of what the model did before the merge: a
chat model's general prompts, say. Its *reference answers* are the answers given in
the file or, for a prompt alone, the greedy answer of the base model (or of the model
``--keep-model`` names, e.g. the instruct model the fine-tunes came from), generated
once before any candidate is formed. The *keep loss* of a merge is its mean completion
loss on those answers (lower: it still says what the reference said).

- every scored candidate, static and learned, gets its keep loss (tune's table and
  ``tune.json``): the cost of a merge in what it forgets, beside what it gains;
- with ``--learn`` the keep set is split like a task: the fit's objective is
  ``task loss + --keep-weight x keep loss`` on one part, and the keep loss that is
  reported and that the decision reads comes from the other part, which no step of
  the fit saw. A learned merge whose keep loss is separated as worse than the static
  choice's (95% interval) is not adopted.

Why the loss on the reference's answers and not the KL to its next-token
distributions: it is what the benchmark's "general loss" measures, it costs one more
forward and backward pass on a few rows per step and nothing to store (the KL needs
the reference's full distributions, vocabulary x answer tokens per prompt, or a
second model in memory during the fit). docs/design.md has the measured cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from mergekit_awd import evaluate

NAME = "keep"  # the task name of the keep set in tune.json
# chosen on validation alone (SmolLM2, regime a, seed 1: of 1, 0.3 and 0.1, the best
# held-out task score among the weights whose keep loss on tune's own keep report
# part was no higher than the static choice's; confirmed on seed 0: docs/benchmarks.md)
DEFAULT_WEIGHT = 0.1


@dataclass
class Keep:
    """The keep set, tokenized, its reference answers in place."""

    report: evaluate.Task  # every candidate's keep loss is measured here
    fit: Optional[evaluate.Task]  # --learn: the part the fit's objective sees
    weight: float
    digest: str  # the examples, their answers and the split: a recorded loss is reusable
    batch_tokens: int = 4096  # tokens per scoring batch (--batch-tokens)

    def scores(self, model) -> Dict:
        """The keep loss of ``model`` on the report part: ``loss``, ``loss_each``,
        ``examples`` and the digest they were measured under."""
        s = evaluate.score(model, [self.report], self.batch_tokens)[NAME]
        return {"loss": s["loss"], "loss_each": s["loss_each"],
                "examples": s["examples"], "digest": self.digest}

    def fresh(self, row: dict) -> bool:
        """Whether ``row`` (a recorded candidate) has its keep loss under this set."""
        return (row.get("keep") or {}).get("digest") == self.digest


def check(specs: Sequence[str], keep_model: Optional[str], weight: Optional[float],
          eval_cmd: Optional[str]) -> None:
    """Refuse a bad --keep / --keep-model / --keep-weight before anything is read."""
    if not specs:
        for flag, value in (("--keep-model", keep_model), ("--keep-weight", weight)):
            if value is not None:
                raise evaluate.AWDDataError(
                    f"{flag} is given without --keep: add --keep PATH (prompts of what "
                    f"the merged model must go on doing), or leave {flag} out")
        return
    if eval_cmd:
        raise evaluate.AWDDataError("--keep is scored by the built-in scorer; it cannot "
                                    "be combined with --eval-cmd")
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise evaluate.AWDDataError(f"--keep-weight must be a number >= 0 (0: report "
                                    f"the keep loss, do not fit it); got {weight}")
    for path in specs:
        if not os.path.isfile(path):
            raise evaluate.AWDDataError(f"--keep {path}: no such file; give a JSONL file "
                                        f"of prompts (with or without answers)")
        with open(path, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise evaluate.AWDDataError(
                    f"--keep {path}: the file is empty; each line needs a JSON object "
                    f"with 'prompt' (and 'completion' if you have one), or 'messages'")


def load(specs: Sequence[str], keep_model: Optional[str], weight: Optional[float],
         tokenizer, base_path: str, model, end_ids, max_new_tokens: int, learning,
         seed: int, remote: bool, batch_tokens: int, say) -> Optional[Keep]:
    """The keep set with its reference answers; ``model`` is the base model as loaded
    (no candidate swapped in yet)."""
    if not specs:
        return None
    context = _context(model)
    parts = []
    for i, path in enumerate(specs):
        task = evaluate.load_tasks([f"{NAME}{i}={path}"], tokenizer, base_path,
                                   need_answers=False)[0]
        _fits(task, path, context)
        parts.append(task)
    examples = [e for t in parts for e in t.examples]
    missing = [i for i, (_, a) in enumerate(examples) if a is None]
    if missing:
        say(f"tune --keep: {keep_model or 'the base model'}'s greedy answers to "
            f"{len(missing)} prompt(s) are the reference answers")
        answers = _answers(keep_model, tokenizer, model, [examples[i][0] for i in missing],
                           end_ids, max_new_tokens, remote)
        for i, answer in zip(missing, answers):
            prompt = examples[i][0]
            room = len(answer) if context is None else context - len(prompt)
            examples[i] = (prompt, answer[:room])
    whole = evaluate.Task(NAME, ", ".join(specs), examples)
    fit = None
    if learning is not None:
        if len(examples) < 2:
            raise evaluate.AWDDataError(
                f"--keep {whole.path}: --learn needs at least 2 keep examples (one part "
                f"for the fit, one to report and decide on); it has {len(examples)}")
        fits, held, _ = evaluate.split([whole], learning.holdout, seed, salt=NAME)
        fit, whole = fits[0], held[0]
    digest = hashlib.sha256(json.dumps(
        [whole.examples, fit.examples if fit else None]).encode()).hexdigest()[:16]
    return Keep(whole, fit, DEFAULT_WEIGHT if weight is None else weight, digest,
                batch_tokens)


def _context(model) -> Optional[int]:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fits(task, path: str, context: Optional[int]) -> None:
    """Every example within the model's context: a given answer whole, a prompt alone
    with room for one token of its reference answer (which is cut at the context)."""
    if context is None:
        return
    for i, (prompt, answer) in enumerate(task.examples, 1):
        need = len(prompt) + (len(answer) if answer is not None else 1)
        if need > context:
            what = (f"the prompt {len(prompt)} and its answer {len(answer)} tokens"
                    if answer is not None else
                    f"the prompt is {len(prompt)} tokens, with no room for an answer")
            raise evaluate.AWDDataError(
                f"--keep {path}: example {i} does not fit the model's context of "
                f"{context} tokens ({what}); shorten it or leave it out")


def _answers(keep_model: Optional[str], tokenizer, model, prompts: List[List[int]],
             end_ids, max_new_tokens: int, remote: bool) -> List[List[int]]:
    if keep_model is None:
        return evaluate.greedy_answers(model, prompts, end_ids, max_new_tokens)
    from transformers import AutoTokenizer

    from mergekit_awd import tune

    try:
        theirs = AutoTokenizer.from_pretrained(keep_model, trust_remote_code=remote)
        reference = tune.load_model(keep_model, str(next(model.parameters()).device),
                                    None, remote)
    except (OSError, ValueError) as error:
        raise evaluate.AWDDataError(f"--keep-model {keep_model}: cannot be loaded "
                                    f"({str(error).splitlines()[0][:200]}); give a model "
                                    f"folder with the base model's tokenizer")
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise evaluate.AWDDataError(
            f"--keep-model {keep_model}: its tokenizer is not the base model's, so its "
            f"answers cannot be scored by the merge; give a model with the same tokenizer")
    try:
        return evaluate.greedy_answers(reference, prompts, end_ids, max_new_tokens)
    finally:
        del reference
