"""Small real checkpoints to merge offline: a tiny Llama and four real fine-tunes.

    python example_configs/examples.py check example_models/tiny-llama   # the shipped models
    python example_configs/examples.py rebuild /tmp/tiny-llama          # retrain, compare
    python example_configs/examples.py make DIR                          # train into DIR
    python example_configs/examples.py eval OUT_DIR [OUT_DIR ...]

The base is a ~0.2M-parameter Llama pretrained briefly on all four string tasks
below in a generic format; each fine-tune then trains the whole model on one
task. Everything is seeded, runs on CPU in a few minutes, and writes a
character-level tokenizer next to each model so that `mergekit-yaml` copies it
and the merged model is usable with transformers.

The repository ships the models the README's numbers came from
(`example_models/tiny-llama`, 3.3 MB, float32) with their SHA-256 in
`example_configs/tiny-llama.sha256`: training from scratch is chaotic enough that
the last bits of another CPU's arithmetic change the fine-tunes, and with them
the quick start's numbers; merging and scoring given models is not (measured:
docs/benchmarks.md, "The quick start on other CPUs"). `rebuild` retrains them and
says whether this machine reproduces the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from typing import Callable, Dict, List, Tuple

import torch

LETTERS = "abcdefghij"
DIGITS = "0123456789"
VOCAB = ["<pad>", "<s>", "</s>"] + list(LETTERS) + list(DIGITS) + list(">+=|RSHA")


def _reverse(rng):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"R|{s}>", s[::-1]


def _sort(rng):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"S|{s}>", "".join(sorted(s))


def _shift(rng):
    s = "".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(3, 6)))
    return f"H|{s}>", "".join(LETTERS[LETTERS.index(c) + 1] for c in s)


def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"A|{a}+{b}=", str(a + b)


TASKS: Dict[str, Callable] = {
    "reverse": _reverse,
    "sort": _sort,
    "shift": _shift,
    "add": _add,
}
_STOI = {c: i for i, c in enumerate(VOCAB)}
SEQ_LEN = 20


def encode(text: str) -> List[int]:
    return [_STOI[c] for c in text]


def _batch(task_fns, rng, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (loss only on the answer and end token)."""
    ids = torch.full((n, SEQ_LEN), _STOI["<pad>"])
    labels = torch.full((n, SEQ_LEN), -100)
    for row in range(n):
        prompt, answer = rng.choice(task_fns)(rng)
        seq = [_STOI["<s>"]] + encode(prompt) + encode(answer) + [_STOI["</s>"]]
        ids[row, : len(seq)] = torch.tensor(seq)
        start = 1 + len(prompt)
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return ids, labels


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _train(model, task_fns, steps: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, labels = _batch(task_fns, rng, 64)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _save_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenizers import processors

    tok = Tokenizer(models.WordLevel(vocab=_STOI, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    # a prompt starts with <s>, as in training (what `tokenizer(text)` gives)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", _STOI["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)


def make(out_dir: str, base_steps: int = 600, ft_steps: int = 300) -> Dict[str, str]:
    """Pretrain the base, fine-tune one copy per task; skip what is already on disk.

    One thread and deterministic kernels while training: the same weights on
    every machine of a kind (the thread count changes the float summation order,
    and so the training). The caller's settings are restored afterwards."""
    paths = {"base": os.path.join(out_dir, "base")}
    paths.update({t: os.path.join(out_dir, t) for t in TASKS})
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        _make(paths, base_steps, ft_steps)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return paths


def _make(paths: Dict[str, str], base_steps: int, ft_steps: int) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = _model()
    _train(base, list(TASKS.values()), base_steps, 3e-3, seed=0)
    base.save_pretrained(paths["base"])
    _save_tokenizer(paths["base"])
    for i, (task, fn) in enumerate(TASKS.items()):
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        _train(model, [fn], ft_steps, 1e-3, seed=1 + i)
        model.save_pretrained(paths[task])
        _save_tokenizer(paths[task])
        print(f"fine-tuned {task}: {paths[task]}")


MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-llama.sha256")


def digests(models_dir: str) -> Dict[str, str]:
    """relative path -> SHA-256 of every file of the five model folders."""
    out = {}
    for name in ["base", *TASKS]:
        folder = os.path.join(models_dir, name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), "rb") as f:
                out[f"{name}/{file}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def manifest(path: str = MANIFEST) -> Dict[str, str]:
    """The committed digests (``sha256sum`` format: DIGEST  RELATIVE_PATH)."""
    with open(path, encoding="utf-8") as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


def write_manifest(models_dir: str, path: str = MANIFEST) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for name, digest in digests(models_dir).items():
            f.write(f"{digest}  {name}\n")


def differences(models_dir: str, expected: Dict[str, str]) -> List[str]:
    """One line per file that is missing, extra or not the expected bytes."""
    found = digests(models_dir)
    lines = [f"missing: {name}" for name in expected if name not in found]
    lines += [f"changed: {name}" for name in expected
              if name in found and found[name] != expected[name]]
    lines += [f"not in the manifest: {name}" for name in found if name not in expected]
    return lines


def fingerprint(expected: Dict[str, str]) -> str:
    """A short name for the whole set (what the quick start prints)."""
    text = "".join(f"{d}  {n}\n" for n, d in expected.items())
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check(models_dir: str) -> str:
    """The shipped models, unchanged, or SystemExit saying which files differ."""
    expected = manifest()
    wrong = differences(models_dir, expected)
    if wrong:
        raise SystemExit(
            f"{models_dir}: the example models are not the ones the README's numbers "
            f"came from ({MANIFEST}):\n  " + "\n  ".join(wrong) + "\n"
            "Restore them with `git checkout -- example_models/tiny-llama` (or retrain "
            "them with `python example_configs/examples.py rebuild DIR`, which may give "
            "other weights on another CPU).")
    return fingerprint(expected)


def rebuild(out_dir: str, base_steps: int = 600, ft_steps: int = 300) -> List[str]:
    """Train the models into an empty OUT_DIR and compare them with the shipped ones."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir}: not empty; rebuild trains into a new folder")
    make(out_dir, base_steps, ft_steps)
    return differences(out_dir, manifest())


def accuracy(model_dir: str, n: int = 200, seed: int = 1234) -> Dict[str, float]:
    """Exact-match accuracy of greedy answers (then the end token), per task, on
    held-out samples: `mergekit-awd tune`'s own scorer (one teacher-forced pass)."""
    from transformers import AutoTokenizer

    from mergekit_awd import evaluate, tune

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = []
    for task, fn in TASKS.items():
        rng = random.Random(seed)
        examples = []
        for _ in range(n):
            prompt, answer = fn(rng)
            examples.append((tokenizer(prompt)["input_ids"],
                             encode(answer) + [tokenizer.eos_token_id]))
        tasks.append(evaluate.Task(task, "", examples))
    scores = evaluate.score(tune.load_model(model_dir), tasks)
    return {task: s["exact"] for task, s in scores.items()}


def write_data(out_dir: str, n: int = 100, seed: int = 4321) -> Dict[str, str]:
    """Held-out prompt/completion JSONL per task for `mergekit-awd tune` (``val``, with
    ``seed``) and a test split (``seed + 1``); none is in the training stream's
    order, though short strings can repeat by chance."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, split_seed in (("val", seed), ("test", seed + 1)):
        for task, fn in TASKS.items():
            rng = random.Random(f"{split_seed}-{task}")
            path = os.path.join(out_dir, f"{task}.{split}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for _ in range(n):
                    prompt, answer = fn(rng)
                    f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
            paths[f"{task}.{split}"] = path
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python example_configs/examples.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="train the example models (skips existing)")
    p_rebuild = sub.add_parser(
        "rebuild", help="train the example models into a new folder and compare them "
        "with the shipped ones")
    for p in (p_make, p_rebuild):
        p.add_argument("out_dir")
        p.add_argument("--base-steps", type=int, default=600)
        p.add_argument("--ft-steps", type=int, default=300)
    p_check = sub.add_parser("check", help="check the shipped example models' SHA-256")
    p_check.add_argument("models_dir")
    p_data = sub.add_parser("data", help="write held-out JSONL per task (for tune)")
    p_data.add_argument("out_dir")
    p_data.add_argument("-n", type=int, default=100)
    p_eval = sub.add_parser("eval", help="per-task accuracy of model folders")
    p_eval.add_argument("models", nargs="+")
    p_eval.add_argument("-n", type=int, default=200)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.command == "data":
        print(json.dumps(write_data(args.out_dir, args.n), indent=2))
    elif args.command == "make":
        paths = make(args.out_dir, args.base_steps, args.ft_steps)
        print(json.dumps(paths, indent=2))
    elif args.command == "check":
        print(f"example models: {args.models_dir} (shipped, SHA-256 {check(args.models_dir)}"
              " as in the README)")
    elif args.command == "rebuild":
        wrong = rebuild(args.out_dir, args.base_steps, args.ft_steps)
        if wrong:
            print(f"{args.out_dir}: this machine trains other example models than the "
                  "shipped ones:\n  " + "\n  ".join(wrong))
            sys.exit(1)
        print(f"{args.out_dir}: the same bytes as the shipped models "
              f"(SHA-256 {fingerprint(manifest())})")
    else:
        print(f"{'model':40s} " + " ".join(f"{t:>8s}" for t in TASKS) + "     mean")
        for path in args.models:
            acc = accuracy(path, n=args.n)
            mean = sum(acc.values()) / len(acc)
            row = " ".join(f"{acc[t]:8.2f}" for t in TASKS)
            print(f"{path[-40:]:40s} {row} {mean:8.2f}")


if __name__ == "__main__":
    main()
