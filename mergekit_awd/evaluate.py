"""Held-out data and the two built-in scores of `mergekit-awd tune`.

Data: JSON Lines, one example a line, either ``{"prompt": ..., "completion": ...}``
or a chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last turn
is the assistant's answer (the model's chat template is applied to the turns
before it, with the generation prompt). One file is one task.

Scores, per task, from one teacher-forced forward pass per batch:

- ``exact``: the fraction of examples whose greedy answer is exactly the
  completion followed by the end-of-sequence token. Greedy decoding picks the
  argmax at each position; as long as every earlier token matched, the prefix
  it conditions on is the gold prefix, so "every argmax along the gold answer
  equals the gold token" is the same test as generating greedily and
  comparing, at the cost of one pass.
- ``loss``: the mean over examples of the mean negative log-likelihood of the
  completion's tokens (the end token included).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch


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


def load_tasks(specs: Sequence[str], tokenizer, model_name: str) -> List[Task]:
    """Read and tokenize every data file; one clear line for the first bad one."""
    tasks, names = [], set()
    for spec in specs:
        name, path = parse_spec(spec)
        if name in names:
            raise AWDDataError(f"two data files are both named task {name!r}; "
                               f"name them with name=path")
        names.add(name)
        task = Task(name, path)
        with open(path, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    task.examples.append(
                        _example(line, f"{path}:{number}", tokenizer, model_name))
        if not task.examples:
            raise AWDDataError(f"{path}: no examples (the file is empty); each line "
                               f"needs a JSON object with 'prompt' and 'completion', "
                               f"or 'messages'")
        tasks.append(task)
    return tasks


def _example(line: str, where: str, tokenizer, model_name: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AWDDataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        raise AWDDataError(f"{where}: expected a JSON object with 'prompt' and "
                           f"'completion', or 'messages'; got {type(record).__name__}")
    if "messages" in record:
        prompt, completion = _chat(record["messages"], where, tokenizer, model_name)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                raise AWDDataError(f"{where}: missing field '{key}' (each line needs "
                                   f"'prompt' and 'completion', or 'messages')")
            if not isinstance(record[key], str):
                raise AWDDataError(f"{where}: field '{key}' must be a string")
        prompt, completion = record["prompt"], record["completion"]
        prompt_ids = tokenizer(prompt)["input_ids"]  # the tokenizer's own BOS convention
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    if not prompt_ids or not answer:
        raise AWDDataError(f"{where}: the prompt or the completion tokenizes to nothing")
    return list(prompt_ids), list(answer)


def _chat(messages, where: str, tokenizer, model_name: str) -> Tuple[str, str]:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                       and isinstance(m.get("role"), str) for m in messages)):
        raise AWDDataError(f"{where}: 'messages' must be a non-empty list of "
                           f"{{'role': ..., 'content': ...}} objects")
    if messages[-1]["role"] != "assistant":
        raise AWDDataError(f"{where}: the last message must be the assistant's answer "
                           f"(role 'assistant'); got role {messages[-1]['role']!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise AWDDataError(f"{where}: 'messages' needs a chat template, and the tokenizer "
                           f"of {model_name} has none; write 'prompt'/'completion' lines")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                           add_generation_prompt=True)
    return prompt, messages[-1]["content"]


@torch.no_grad()
def score(model, tasks: Sequence[Task], batch_tokens: int = 4096) -> Dict[str, Dict]:
    """Per task: ``exact`` (greedy answer == completion) and ``loss`` (mean NLL)."""
    device = next(model.parameters()).device
    pad = 0
    out = {}
    for task in tasks:
        order = sorted(range(len(task.examples)), key=lambda i: -sum(map(len, task.examples[i])))
        exact = [0.0] * len(order)
        loss = [0.0] * len(order)
        start = 0
        while start < len(order):
            width = sum(map(len, task.examples[order[start]]))
            rows = max(1, batch_tokens // width)
            chunk = order[start:start + rows]
            start += len(chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = task.examples[i][0] + task.examples[i][1]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(chunk):
                prompt, answer = task.examples[i]
                at = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
                picked = logits[row, at].float()
                target = torch.tensor(answer, device=device)
                nll = torch.nn.functional.cross_entropy(picked, target)
                loss[i] = float(nll)
                exact[i] = float(bool((picked.argmax(-1) == target).all()))
        n = len(order)
        out[task.name] = {"exact": sum(exact) / n, "loss": sum(loss) / n,
                          "exact_each": exact, "examples": n}
    return out


def mean(scores: Dict[str, Dict], metric: str) -> float:
    values = [s[metric] for s in scores.values()]
    return sum(values) / len(values) if values else math.nan
