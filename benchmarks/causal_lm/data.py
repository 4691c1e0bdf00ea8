"""Data of the causal-LM benchmark: a character vocabulary, a mixed pretraining
corpus, an instruction mixture and eight generative tasks scored by exact match.

Three stages, as the models users merge are made:

1. pretraining (language-model loss on every token) on a mixed corpus: word
   sentences, arithmetic written out, letter strings and their transformations
   described in prose;
2. a shared **instruct stage** (loss on the answer only) on a mixture of
   instruction formats ("q: reverse abc a:", "reverse(abc) =", "abc | reverse ->")
   over the eight tasks and four others (copy, first, last, length);
3. one **task fine-tune** per task in its own terse format ("rev abc =") that the
   instruct stage never showed: a fine-tune learns its tag, and sharpens its task.

Validation and test prompts are drawn first, with their own seeds; training
samplers never produce a prompt that is in them.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence, Set, Tuple

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
VOCAB = ["<pad>", "<s>", "</s>"] + list(LETTERS) + list(DIGITS) + list(" :=()|->+?.,")
STOI = {c: i for i, c in enumerate(VOCAB)}
PAD, BOS, EOS = 0, 1, 2
SEQ_LEN = 32


def _word(rng, lo=3, hi=6, alphabet=LETTERS[:12]):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _num(rng):
    return rng.randint(0, 99)


# --- the operations: input generator and answer ---------------------------------

def _shift(s):
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _gen_pair(rng):
    a, b = _num(rng), _num(rng)
    return f"{a}+{b}", str(a + b)


def _gen_sub(rng):
    a, b = _num(rng), _num(rng)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}", str(a - b)


def _gen_digits(rng):
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 7)))


# name: (tag of its fine-tune format, input generator, answer function)
TASKS: Dict[str, Tuple[str, Callable, Callable]] = {
    "reverse": ("rev", _word, lambda s: s[::-1]),
    "sort": ("srt", _word, lambda s: "".join(sorted(s))),
    "shift": ("nxt", _word, _shift),
    "rotate": ("rot", _word, lambda s: s[1:] + s[0]),
    "double": ("dbl", lambda rng: _word(rng, 2, 5), lambda s: "".join(c + c for c in s)),
    "add": ("sum", _gen_pair, None),
    "subtract": ("dif", _gen_sub, None),
    "max": ("top", _gen_digits, lambda s: max(s)),
}
# only in the instruct mixture
EXTRA = {
    "copy": (_word, lambda s: s),
    "first": (_word, lambda s: s[0]),
    "last": (_word, lambda s: s[-1]),
    "length": (_word, lambda s: str(len(s))),
}
_GENERATED = {"add": _gen_pair, "subtract": _gen_sub}


def sample(task: str, rng) -> Tuple[str, str]:
    """(input, answer) of one task."""
    if task in _GENERATED:
        return _GENERATED[task](rng)
    if task in TASKS:
        _, gen, fn = TASKS[task]
    else:
        gen, fn = EXTRA[task]
    s = gen(rng)
    return s, fn(s)


def _word_name(task: str) -> str:
    return {"add": "add", "subtract": "subtract"}.get(task, task)


INSTRUCT_FORMATS = (
    lambda t, x: f"q: {_word_name(t)} {x} a: ",
    lambda t, x: f"{_word_name(t)}({x}) = ",
    lambda t, x: f"{x} | {_word_name(t)} -> ",
)


def task_prompt(task: str, x: str) -> str:
    """The fine-tune format: a tag unknown to the earlier stages."""
    return f"{TASKS[task][0]} {x} = "


# --- pretraining corpus ---------------------------------------------------------

_WORDS = ["the", "a", "cat", "dog", "sees", "has", "big", "red", "runs", "and",
          "in", "box", "sun", "old", "new", "map", "we", "it", "is", "not"]


def _prose(rng) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9))) + "."
    if kind == 1:
        a, b = _num(rng), _num(rng)
        return f"{a} and {b} make {a + b}." if rng.random() < 0.5 else f"{max(a, b)} less {min(a, b)} is {max(a, b) - min(a, b)}."
    if kind == 2:
        s = _word(rng)
        t = rng.choice(["reverse", "sort", "shift", "rotate", "double", "copy"])
        fn = TASKS[t][2] if t in TASKS else EXTRA[t][1]
        return f"{s} in {t} is {fn(s)}."
    if kind == 3:
        s = _gen_digits(rng)
        return f"in {s} the top is {max(s)}."
    return " ".join(_word(rng, 2, 5, LETTERS) for _ in range(rng.randint(3, 6))) + "."


# --- batches --------------------------------------------------------------------

def encode(text: str) -> List[int]:
    return [STOI[c] for c in text]


def _pack(rows: Sequence[Tuple[str, str]], answer_only: bool):
    ids = torch.full((len(rows), SEQ_LEN), PAD)
    labels = torch.full((len(rows), SEQ_LEN), -100)
    for r, (prompt, answer) in enumerate(rows):
        seq = ([BOS] + encode(prompt) + encode(answer) + [EOS])[:SEQ_LEN]
        ids[r, : len(seq)] = torch.tensor(seq)
        start = 1 + len(prompt) if answer_only else 1
        labels[r, start : len(seq)] = torch.tensor(seq[start:])
    return ids, labels


def pretrain_batch(rng, n):
    return _pack([(_prose(rng), "") for _ in range(n)], answer_only=False)


def instruct_batch(rng, n, held_out: Set[str]):
    rows = []
    names = list(TASKS) + list(EXTRA)
    while len(rows) < n:
        t = rng.choice(names)
        x, y = sample(t, rng)
        if t in TASKS and x in held_out:
            continue
        rows.append((rng.choice(INSTRUCT_FORMATS)(t, x), y))
    return _pack(rows, answer_only=True)


def task_batch(task, rng, n, held_out: Set[str]):
    rows = []
    while len(rows) < n:
        x, y = sample(task, rng)
        if x not in held_out:
            rows.append((task_prompt(task, x), y))
    return _pack(rows, answer_only=True)


def eval_sets(n_val: int, n_test: int) -> Dict[str, Dict[str, List[Tuple[str, str]]]]:
    """Distinct held-out (prompt, answer) pairs per task and split (seeded)."""
    out = {}
    for i, task in enumerate(TASKS):
        rng = random.Random(10_000 + i)
        seen, rows = set(), []
        while len(rows) < n_val + n_test:
            x, y = sample(task, rng)
            if x not in seen:
                seen.add(x)
                rows.append((x, y))
        out[task] = {"val": rows[:n_val], "test": rows[n_val:]}
    return out


def held_out_inputs(sets) -> Set[str]:
    return {x for splits in sets.values() for rows in splits.values() for x, _ in rows}


@torch.no_grad()
def exact_match(model, rows: Sequence[Tuple[str, str]], task: str, batch: int = 512) -> List[bool]:
    """Per-example exact match of greedy decoding, computed in one forward pass.

    Greedy decoding reproduces the answer and the end token exactly iff, with the
    answer fed in (teacher forcing), the argmax at every answer position (and at
    the end token) is the expected token: both read the same prefixes.
    """
    out: List[bool] = []
    for i in range(0, len(rows), batch):
        chunk = [(task_prompt(task, x), y) for x, y in rows[i : i + batch]]
        ids, labels = _pack(chunk, answer_only=True)
        logits = model(input_ids=ids).logits
        pred = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = (pred == target) | (target == -100)
        out.extend(ok.all(-1).tolist())
    return out
