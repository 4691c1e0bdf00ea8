"""Held-out data and the built-in scores of `mergekit-awd tune`.

Data: JSON Lines, one example a line, either ``{"prompt": ..., "completion": ...}``
or a chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last turn
is the assistant's answer. One file is one task. The answer is what the model must
generate:

- chat: the model's chat template renders the turns before the answer with the
  generation prompt (the prompt), and the whole conversation; the answer is the
  tokens that follow the prompt in the whole rendering, up to and including the
  template's own end of turn (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``,
  Gemma's ``<end_of_turn>``: the first special token after the prompt);
- prompt/completion: prompt + completion tokenized together and split at the
  prompt's length (a SentencePiece ``" Paris"`` after a prompt is ``"▁Paris"``,
  alone it is ``"▁", "▁Paris"``), then the tokenizer's end-of-sequence token.
  Where the prompt's own tokens change when the completion follows (a prompt
  ending in a space), that completion is tokenized alone and a warning says how
  many examples of the file did so.

Scores, per task, from one teacher-forced forward pass per batch (with
``share_prefix``, the prompts' shared prefix passes once and every row reuses its
key/value cache: ``_passes``):

- ``exact``: the fraction of examples whose greedy answer is exactly the
  completion followed by the end-of-sequence token. Greedy decoding picks the
  argmax at each position; as long as every earlier token matched, the prefix
  it conditions on is the gold prefix, so "every argmax along the gold answer
  equals the gold token" is the same test as generating greedily and
  comparing, at the cost of one pass.
- ``loss``: the mean over examples of the mean negative log-likelihood of the
  completion's tokens (the end token included).
- ``entropy`` (prompts alone suffice): the model answers each prompt greedily
  (up to and including its end token, at most ``max_new_tokens``); the score is
  the mean over prompts of the mean entropy, in nats, of the next-token
  distributions at the positions that produced that answer. Lower is more
  confident: AdaMerging's objective, unsupervised (``self_entropy``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


LOG = logging.getLogger(__name__)


class AWDDataError(Exception):
    """A held-out data file cannot be used as given."""


@dataclass
class Task:
    """One data file, tokenized: (prompt ids, answer ids) per example."""

    name: str
    path: str
    examples: List[Tuple[List[int], List[int]]] = field(default_factory=list)


def parse_spec(spec: str) -> Tuple[str, str]:
    """``name=path`` or ``path`` (the task is then named after the file)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = os.path.splitext(os.path.basename(path))[0]
    if not name:
        raise AWDDataError(f"--data/--test {spec!r}: the task name before '=' is empty")
    if not os.path.isfile(path):
        raise AWDDataError(f"{path}: no such data file (from {spec!r})")
    return name, path


def load_tasks(specs: Sequence[str], tokenizer, model_name: str,
               need_answers: bool = True) -> List[Task]:
    """Read and tokenize every data file; one clear line for the first bad one.
    ``need_answers`` False: a line may hold a prompt alone (``prompt`` without
    ``completion``, or ``messages`` ending with a user turn); its answer is None."""
    tasks, names = [], set()
    for spec in specs:
        name, path = parse_spec(spec)
        if name in names:
            raise AWDDataError(f"two data files are both named task {name!r}; "
                               f"name them with name=path")
        names.add(name)
        task = Task(name, path)
        alone = 0
        with open(path, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    prompt, answer, apart = _example(line, f"{path}:{number}", tokenizer,
                                                     model_name, need_answers)
                    task.examples.append((prompt, answer))
                    alone += apart
        if alone:
            LOG.warning("%s: in %d of %d examples the prompt's tokens change when the "
                        "completion follows it (a prompt ending in a space?): their "
                        "completion was tokenized alone", path, alone, len(task.examples))
        if not task.examples:
            raise AWDDataError(f"{path}: no examples (the file is empty); each line "
                               f"needs a JSON object with 'prompt' and 'completion', "
                               f"or 'messages'")
        tasks.append(task)
    return tasks


def _example(line: str, where: str, tokenizer, model_name: str, need_answers: bool = True):
    """(prompt ids, answer ids or None, whether the completion had to be tokenized
    alone) of one line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AWDDataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        raise AWDDataError(f"{where}: expected a JSON object with 'prompt' and "
                           f"'completion', or 'messages'; got {type(record).__name__}")
    if "messages" in record:
        prompt_ids, answer = _chat(record["messages"], where, tokenizer, model_name,
                                   need_answers)
        alone = False
    else:
        for key in ("prompt", "completion"):
            if key == "completion" and key not in record and not need_answers:
                record = dict(record, completion=None)
                continue
            if key not in record:
                raise AWDDataError(f"{where}: missing field '{key}' (each line needs "
                                   f"'prompt' and 'completion', or 'messages'; prompts "
                                   f"alone: --metric entropy)")
            if not isinstance(record[key], str) and record[key] is not None:
                raise AWDDataError(f"{where}: field '{key}' must be a string")
        prompt_ids, answer, alone = _plain(record["prompt"], record["completion"], tokenizer)
    if not prompt_ids:
        raise AWDDataError(f"{where}: the prompt tokenizes to nothing")
    if answer is not None and not answer:
        raise AWDDataError(f"{where}: the completion tokenizes to nothing")
    return list(prompt_ids), (None if answer is None else list(answer)), alone


def _with_end(ids: List[int], tokenizer) -> List[int]:
    end = tokenizer.eos_token_id
    return ids + [end] if end is not None else ids


def _plain(prompt: str, completion: Optional[str], tokenizer):
    """Prompt ids as the tokenizer makes them by default (its BOS convention), and the
    completion's ids as they follow the prompt: prompt + completion tokenized
    together and split at the prompt's length (a SentencePiece " Paris" alone is
    "▁", "▁Paris"; after a prompt it is "▁Paris"), then the end-of-sequence token.
    Where the prompt's own tokens change when the completion follows it (its last
    tokens merge with the completion's first, e.g. a prompt ending in a space), the
    completion is tokenized alone, and the third value says so."""
    with_special = list(tokenizer(prompt)["input_ids"])
    if completion is None:
        return with_special, None, False
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    joint = list(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
    head = next((i for i in range(len(with_special) - len(plain) + 1)
                 if with_special[i:i + len(plain)] == plain), None)
    if head is not None and joint[:len(plain)] == plain and len(joint) > len(plain):
        return with_special[:head] + plain, _with_end(joint[len(plain):], tokenizer), False
    alone = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return with_special, _with_end(list(alone), tokenizer), True


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(i)
    return ids


def _chat(messages, where: str, tokenizer, model_name: str, need_answers: bool = True):
    """(prompt ids, answer ids or None) of a conversation. The prompt is the turns
    before the last rendered with the generation prompt; the answer is what the
    model must generate: the tokens that follow that prompt when the whole
    conversation is rendered, up to and including the template's own end of turn
    (its first special token after the prompt; without one, the rendering then the
    end-of-sequence token)."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                       and isinstance(m.get("role"), str) for m in messages)):
        raise AWDDataError(f"{where}: 'messages' must be a non-empty list of "
                           f"{{'role': ..., 'content': ...}} objects")
    last = messages[-1]["role"]
    if last != "assistant" and need_answers:
        raise AWDDataError(f"{where}: the last message must be the assistant's answer "
                           f"(role 'assistant'); got role {last!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise AWDDataError(f"{where}: 'messages' needs a chat template, and the tokenizer "
                           f"of {model_name} has none; write 'prompt'/'completion' lines")
    turns = messages if last != "assistant" else messages[:-1]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if last != "assistant":
        return prompt_ids, None
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    full_ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    if not full.startswith(prompt) or full_ids[:len(prompt_ids)] != prompt_ids:
        raise AWDDataError(
            f"{where}: the chat template of {model_name} renders the conversation so that "
            f"it does not begin with the rendered prompt (the generation prompt differs "
            f"from an answered turn); write 'prompt'/'completion' lines")
    rest = full_ids[len(prompt_ids):]
    specials = _special_ids(tokenizer)
    end = next((i for i, t in enumerate(rest) if t in specials), None)
    return prompt_ids, rest[:end + 1] if end is not None else _with_end(rest, tokenizer)


def answer_ends(tokenizer, model_path: str, revision=None, remote: bool = False
                ) -> List[int]:
    """Every token that ends a greedy answer: the tokenizer's end of sequence, the chat
    template's end of turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``: the first
    special token after an answer it renders) and the model's
    ``generation_config.eos_token_id`` (one id or a list)."""
    ends = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        mark = "An answer."
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "A question?"},
                 {"role": "assistant", "content": mark}], tokenize=False)
        except Exception:  # a template that wants other turns: no end of turn from it
            text = ""
        if mark in text:
            rest = tokenizer(text[text.index(mark) + len(mark):],
                             add_special_tokens=False)["input_ids"]
            specials = _special_ids(tokenizer)
            ends += [next(t for t in rest if t in specials)] if any(
                t in specials for t in rest) else []
    try:
        from transformers import GenerationConfig

        given = GenerationConfig.from_pretrained(model_path, revision=revision,
                                                 trust_remote_code=remote).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        given = None
    ends += [given] if isinstance(given, int) else list(given or [])
    return list(dict.fromkeys(ends))


def rows_of(examples: Sequence[Tuple[List[int], List[int]]], device):
    """Right-padded ``input_ids`` and ``attention_mask`` of (prompt, answer) rows."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        seq = list(prompt) + list(answer)
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def answer_logits(logits: torch.Tensor, examples, start: int = 0) -> List[torch.Tensor]:
    """Per row, the logits that predict its answer's tokens (len(answer) x vocab);
    ``logits`` hold the positions from ``start`` on (``_passes`` keeps only those)."""
    return [logits[row, len(p) - 1 - start:len(p) + len(a) - 1 - start]
            for row, (p, a) in enumerate(examples)]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """float32 at least (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def nll_each(logits: torch.Tensor, examples, start: int = 0) -> torch.Tensor:
    """Per row, the mean negative log-likelihood of its answer (differentiable)."""
    out = []
    for picked, (_, answer) in zip(answer_logits(logits, examples, start), examples):
        target = torch.tensor(answer, device=picked.device)
        out.append(torch.nn.functional.cross_entropy(_wide(picked), target))
    return torch.stack(out)


def entropy_each(logits: torch.Tensor, examples, start: int = 0) -> torch.Tensor:
    """Per row, the mean entropy (nats) of the next-token distributions that predict
    its answer's tokens (differentiable)."""
    out = []
    for picked in answer_logits(logits, examples, start):
        logp = torch.log_softmax(_wide(picked), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1).mean())
    return torch.stack(out)


def _chunks(examples, batch_tokens: int):
    """Indices of the examples, longest first, in batches of about batch_tokens."""
    order = sorted(range(len(examples)), key=lambda i: -sum(map(len, examples[i])))
    start = 0
    while start < len(order):
        width = sum(map(len, examples[order[start]]))
        chunk = order[start:start + max(1, batch_tokens // width)]
        start += len(chunk)
        yield chunk


def shared_prefix(examples) -> int:
    """How many leading tokens every prompt shares, leaving each prompt at least its
    last token (whose logits predict the answer's first)."""
    first = examples[0][0]
    most = max(min(len(p) for p, _ in examples) - 1, 0)
    for i in range(most):
        if any(p[i] != first[i] for p, _ in examples):
            return i
    return most


def _forward_takes(model, name: str) -> bool:
    """Whether the model's forward takes ``name`` (``logits_to_keep``: the head runs
    on the last positions only; the key/value cache is ``cache`` in transformers 5,
    ``past_key_values`` before)."""
    import inspect

    return name in inspect.signature(model.forward).parameters


def _passes(model, examples, batch_tokens: int, share_prefix: bool):
    """Teacher-forced passes over ``examples`` in batches of about ``batch_tokens``:
    (indices, rows, logits, start) per batch, ``answer_logits(logits, rows, start)``
    being each row's answer logits.

    ``share_prefix``: the prompts' shared prefix (``shared_prefix``; a chat
    template's system turn) passes once, and every row attends to its key/value
    cache instead of recomputing it; the head runs only from the first position
    that predicts an answer token on. The same function of the weights, in about
    half the work on chat prompts; ``prefix_agrees`` checks it on the model first."""
    import copy

    device = next(model.parameters()).device
    cut = shared_prefix(examples) if share_prefix else 0
    cache = None
    if cut:
        name = "cache" if _forward_takes(model, "cache") else "past_key_values"
        out = model(input_ids=torch.tensor([examples[0][0][:cut]], device=device),
                    use_cache=True)
        cache = getattr(out, name)
    trimmed = [(p[cut:], a) for p, a in examples]
    keep = share_prefix and _forward_takes(model, "logits_to_keep")
    for chunk in _chunks(trimmed, batch_tokens):
        rows = [trimmed[i] for i in chunk]
        ids, mask = rows_of(rows, device)
        extra, start = {}, 0
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            mask = torch.cat([mask.new_ones((len(rows), cut)), mask], 1)
            extra[name] = past
        if keep:
            start = min(len(p) for p, _ in rows) - 1
            extra["logits_to_keep"] = ids.shape[1] - start
        yield chunk, rows, model(input_ids=ids, attention_mask=mask, **extra).logits, start


@torch.no_grad()
def prefix_agrees(model, tasks: Sequence[Task], rows: int = 8, tol: float = 1e-3) -> bool:
    """Whether ``_passes`` with ``share_prefix`` gives this model the answer
    log-probabilities of full passes (within ``tol``, float32 rounding) on the first
    ``rows`` examples of the first task. False where they differ or the model's
    cache cannot be reused that way (an error): it is then scored by full passes."""
    # any answer tokens compare the two passes; prompts alone answer with their start
    examples = [(p, a or p[:4]) for p, a in next((t.examples[:rows] for t in tasks
                                                  if t.examples), [])]
    if not examples:
        return False

    def logprobs(share):
        out = [None] * len(examples)
        for chunk, part, logits, start in _passes(model, examples, 1 << 30, share):
            for i, picked in zip(chunk, answer_logits(logits, part, start)):
                out[i] = torch.log_softmax(_wide(picked), dim=-1)
        return out

    try:
        fast = logprobs(True)
    except Exception as error:  # an architecture whose cache is not reusable so
        LOG.info("scoring by full passes: reusing the prompt prefix failed (%s)", error)
        return False
    gap = max(float((a - b).abs().max()) for a, b in zip(logprobs(False), fast))
    if gap > tol:
        LOG.info("scoring by full passes: the shared-prefix pass differs by %.2g", gap)
    return gap <= tol


@torch.no_grad()
def score(model, tasks: Sequence[Task], batch_tokens: int = 4096,
          share_prefix: bool = False) -> Dict[str, Dict]:
    """Per task: ``exact`` (greedy answer == completion) and ``loss`` (mean NLL), with
    the value of each example (``exact_each``, ``loss_each``)."""
    out = {}
    for task in tasks:
        examples = task.examples
        if any(a is None for _, a in examples):
            raise AWDDataError(f"{task.path}: exact and loss need a completion for every "
                               f"example; score prompts alone with --metric entropy")
        exact = [0.0] * len(examples)
        loss = [0.0] * len(examples)
        for chunk, rows, logits, start in _passes(model, examples, batch_tokens,
                                                  share_prefix):
            nll = nll_each(logits, rows, start)
            for row, (i, picked) in enumerate(zip(chunk, answer_logits(logits, rows, start))):
                target = torch.tensor(rows[row][1], device=picked.device)
                loss[i] = float(nll[row])
                exact[i] = float(bool((picked.argmax(-1) == target).all()))
        n = len(examples)
        out[task.name] = {"exact": sum(exact) / n, "loss": sum(loss) / n,
                          "exact_each": exact, "loss_each": loss, "examples": n}
    return out


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[List[int]], end_ids: Sequence[int],
                   max_new_tokens: int, batch: int = 16) -> List[List[int]]:
    """The model's greedy answer to each prompt: generated tokens up to and including
    the first end token (or ``max_new_tokens`` of them)."""
    device = next(model.parameters()).device
    ends = set(end_ids)
    out: List[List[int]] = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        width = max(map(len, part))
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, prompt in enumerate(part):  # left-padded for generation
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=list(ends), pad_token_id=0)[:, width:]
        for row in generated.tolist():
            answer = []
            for token in row:
                answer.append(token)
                if token in ends:
                    break
            out.append(answer)
    return out


@torch.no_grad()
def self_entropy(model, tasks: Sequence[Task], end_ids: Sequence[int],
                 max_new_tokens: int = 64, batch_tokens: int = 4096,
                 share_prefix: bool = False) -> Dict[str, Dict]:
    """Per task: ``entropy``, the mean over prompts of ``entropy_each``: the mean
    entropy of the next-token distributions over the model's own greedy answer
    (AdaMerging's objective; lower is more confident). Completions are ignored."""
    out = {}
    for task in tasks:
        prompts = [p for p, _ in task.examples]
        answers = greedy_answers(model, prompts, end_ids, max_new_tokens)
        examples = [(p, a) for p, a in zip(prompts, answers)]
        each = [0.0] * len(examples)
        for chunk, rows, logits, start in _passes(model, examples, batch_tokens,
                                                  share_prefix):
            values = entropy_each(logits, rows, start)
            for i, v in zip(chunk, values.tolist()):
                each[i] = v
        out[task.name] = {"entropy": sum(each) / len(each), "entropy_each": each,
                          "examples": len(each)}
    return out


def rank(means: Dict[str, float], metric: str) -> tuple:
    """Lower is better: highest exact (lowest loss breaks ties), lowest loss (highest
    exact breaks ties), lowest entropy, or highest --eval-cmd score; NaN last."""
    def value(name, sign):
        v = means.get(name, math.nan)
        return math.inf if math.isnan(v) else sign * v

    if metric == "exact":
        return (value("exact", -1), value("loss", 1))
    if metric == "loss":
        return (value("loss", 1), value("exact", -1))
    if metric == "entropy":
        return (value("entropy", 1),)
    return (value("external", -1),)


class Scorer:
    """The built-in scores of one metric family on a loaded model."""

    def __init__(self, metric: str, end_ids, max_new_tokens: int, batch_tokens: int,
                 share_prefix: bool = False):
        self.metric, self.end_ids = metric, list(end_ids)
        self.max_new_tokens, self.batch_tokens = max_new_tokens, batch_tokens
        self.share_prefix = share_prefix  # prefix_agrees on the scoring model

    @property
    def names(self):
        return ("entropy",) if self.metric == "entropy" else ("exact", "loss")

    def scores(self, model, tasks) -> Dict:
        if self.metric == "entropy":
            return self_entropy(model, tasks, self.end_ids, self.max_new_tokens,
                                self.batch_tokens, self.share_prefix)
        return score(model, tasks, self.batch_tokens, self.share_prefix)

    def means(self, scores: Dict) -> Dict[str, float]:
        return {m: mean(scores, m) for m in self.names}

    def measure(self, model, tasks) -> Dict[str, float]:
        return self.means(self.scores(model, tasks))

    def rank(self, means: Dict[str, float]) -> tuple:
        return rank(means, self.metric)


def split(tasks: Sequence[Task], holdout: float, seed: int = 0, salt: str = ""):
    """Each task's examples in two parts, a fraction ``holdout`` (at least one, and
    at least one left) drawn at random (``seed``, ``salt`` for another draw): (the
    rest, the held-out tasks, the held-out indices per task name)."""
    import random

    fit, held, index = [], [], {}
    for task in tasks:
        n = len(task.examples)
        if n < 2:
            raise AWDDataError(f"{task.path}: --learn needs at least 2 examples per task "
                               f"(one to fit, one held out); it has {n}")
        k = min(n - 1, max(1, round(holdout * n)))
        chosen = sorted(random.Random(f"{seed}-{salt}{task.name}").sample(range(n), k))
        rest = [i for i in range(n) if i not in set(chosen)]
        index[task.name] = chosen
        fit.append(Task(task.name, task.path, [task.examples[i] for i in rest]))
        held.append(Task(task.name, task.path, [task.examples[i] for i in chosen]))
    return fit, held, index


def part_means(scores: Dict[str, Dict], index: Dict[str, List[int]],
               metrics: Sequence[str]) -> Dict[str, float]:
    """The means of ``metrics`` over the examples ``index`` names, per task, then over
    tasks (from the per-example values ``score`` / ``self_entropy`` keep)."""
    out = {}
    for metric in metrics:
        per_task = [sum(scores[name][f"{metric}_each"][i] for i in chosen) / len(chosen)
                    for name, chosen in index.items()]
        out[metric] = sum(per_task) / len(per_task)
    return out


def paired_interval(a: Dict[str, Sequence[float]], b: Dict[str, Sequence[float]],
                    resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """(difference, low, high): the mean over tasks of each task's mean of a - b
    (paired, example by example), and its percentile bootstrap interval resampling
    examples within each task."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs = {t: np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float) for t in a}
    point = float(np.mean([d.mean() for d in diffs.values()]))
    boots = np.zeros(resamples)
    for d in diffs.values():
        boots += d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    boots /= len(diffs)
    low, high = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(low), float(high)


def mean(scores: Dict[str, Dict], metric: str) -> float:
    values = [s[metric] for s in scores.values()]
    return sum(values) / len(values) if values else math.nan
