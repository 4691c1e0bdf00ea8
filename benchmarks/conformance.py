"""The conformance matrix: every family x a pairwise cover of the recipe options.

    python benchmarks/conformance.py                 # all families, writes docs/conformance.md
    python benchmarks/conformance.py --family llama  # one family, prints only
    python benchmarks/conformance.py --data-free     # tsv, iso_c, iso_cts, wudi and their
                                                     # AWD variants on every family: prints

Each cell merges a tiny model family through mergekit and compares every
tensor with a naive float64 reference (tests/conformance.py says how).
"""

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import conformance  # noqa: E402
import families  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", action="append", help="only these families")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "conformance.md"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--data-free", action="store_true",
                        help="the data-free rules' cells (conformance.data_free_cells)")
    args = parser.parse_args()
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import mergekit_awd  # noqa: F401

    names = args.family or list(families.FAMILIES)
    cells = conformance.data_free_cells(names) if args.data_free else conformance.cells(names)
    results = []
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        matrix = conformance.Matrix(root)
        for i, cell in enumerate(cells):
            t = time.time()
            outcome = matrix.run(cell, i)
            results.append((cell, outcome))
            print(f"[{i + 1}/{len(cells)}] {cell.family:30s} {outcome.status:8s} "
                  f"{time.time() - t:5.1f}s  {cell.label}"
                  + (f"\n      {outcome.detail}" if outcome.detail else ""), flush=True)
    seconds = time.time() - start
    counts = Counter(o.status for _, o in results)
    summary = (f"{len(results)} cells: {counts['pass']} pass, {counts['refused']} refused "
               f"with a message, {counts['mergekit']} fail inside mergekit itself (its own "
               f"task_arithmetic fails the same recipe), {counts['FAIL']} fail "
               f"({seconds / 60:.1f} min)")
    print(summary)
    if not args.no_write and not args.family and not args.data_free:
        write(args.out, names, results, summary)
    return 1 if counts["FAIL"] else 0


# sections of docs/conformance.md written by hand from other runs (--data-free): kept
KEPT_SECTIONS = ("## The data-free rules",)


def kept_sections(path):
    """The lines of ``path`` from the first kept section on (none: [])."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = f.read().splitlines()
    starts = [i for i, line in enumerate(old) if line.startswith(KEPT_SECTIONS)]
    return [""] + old[starts[0]:] if starts else []


def write(path, names, results, summary):
    rows = conformance.pairwise(conformance.AXES)
    lines = [
        "# Conformance matrix",
        "",
        "Every cell merges a tiny random model of one family (a base and 3 fine-tunes with a",
        "shared and an own perturbation per tensor, scaled to its size) through mergekit and",
        "compares every written tensor with a naive float64 reference: transformers'",
        "`state_dict()` names, the recipe `dtype:` applied as mergekit applies it, the paper's",
        "selection (every weight matrix inside the repeated blocks, 3-D experts and routers",
        "included), delta solved by full-space gradient descent (or Adam), the merge by its",
        "definition. A cell passes when every written tensor agrees to 1e-5 of its merged",
        "delta plus one float32 rounding of its values, or, where the merge or the output",
        "is 16-bit (mergekit merges in the recipe `dtype:`, else the stored one), within one",
        "rounding step of each 16-bit dtype involved. A refusal must be one line that names",
        "the cause, with no `config.json` left behind. `mergekit` marks a recipe that",
        "mergekit's own `task_arithmetic` fails in the same way (a limitation of mergekit",
        "0.1.5, not of `awd`); its message is in the notes. A TIES sign election whose sum",
        "is within float32 rounding of zero (|sum| <= 2^-20 of the sum of magnitudes) is",
        "decided by rounding: there either elected sign is accepted (`settle_undecided`; one",
        "Mixtral cell with `optimizer: adam` had one such entry of 5e-7 relative).",
        "",
        "The reference follows the checkpoints where transformers renames or drops tensors:",
        "GPT-NeoX's `embed_out` (the model's `lm_head`) keeps its stored name as mergekit",
        "writes it, and the `masked_bias` / `inv_freq` / causal-mask buffers that hub",
        "GPT-NeoX checkpoints store (the fixtures add them, as Pythia's files have them) are",
        "merged like any tensor, cast by a recipe `dtype:` as mergekit casts them.",
        "",
        f"Produced by `python benchmarks/conformance.py` ({STEPS_NOTE}). **{summary}.**",
        "",
        "## Option rows",
        "",
        "A pairwise cover of the recipe options (every pair of values of every two options",
        "appears in some row); each family runs every row, then the special recipes.",
        "",
        "| row | " + " | ".join(conformance.AXES) + " |",
        "|---|" + "---|" * len(conformance.AXES),
    ]
    for i, row in enumerate(rows):
        lines.append(f"| r{i + 1} | " + " | ".join(
            f"`{row[k]}`".replace("|", "\\|") for k in conformance.AXES) + " |")
    lines += [
        "",
        "Special recipes (storage fp32, defaults otherwise): `union` = `tokenizer_source: union`",
        "with fine-tunes that added 1 or 2 tokens (vocabulary tensors, permuted by mergekit and",
        "not selected by `linear`, must equal mergekit's own task arithmetic); `sharded` =",
        "inputs in 20 KB shards; `bin` = `pytorch_model.bin` inputs with `--lazy-unpickle`;",
        "`state_dicts` = mergekit's in-memory `merge_state_dicts` with `optimizer: adam`;",
        "`cli` = the `mergekit-yaml` command. All other cells run mergekit's `run_merge`.",
        "",
        "## Results",
        "",
    ]
    specials = []
    for cell, _ in results:
        if cell.special and cell.special not in specials:
            specials.append(cell.special)
    header = [f"r{i + 1}" for i in range(len(rows))] + specials
    lines.append("| family | " + " | ".join(header) + " |")
    lines.append("|---|" + "---|" * len(header))
    notes = []
    by_family = {}
    for cell, outcome in results:
        by_family.setdefault(cell.family, []).append((cell, outcome))
    missing = []
    for name in names:
        marks, plain = {}, 0
        for cell, outcome in by_family.get(name, []):
            column = cell.special
            if column is None:  # the option rows come first, in order
                plain += 1
                column = f"r{plain}"
            if outcome.status == "pass":
                marks[column] = "pass"
            else:
                notes.append(f"- {name}, {cell.special or 'row'} "
                             f"({cell.label.replace('|', '/')}): "
                             f"**{outcome.status}**: `{outcome.detail}`")
                marks[column] = f"{outcome.status} [{len(notes)}]"
        missing += [f"{name} / {h}" for h in header if h not in marks]
        lines.append(f"| {name} | " + " | ".join(marks.get(h, "not run") for h in header)
                     + " |")
    if missing:
        lines += ["", "Not run: " + ", ".join(missing) + " (see `tests/conformance.py`: "
                  "a masked LM with a word-level test tokenizer has no tokenizer surgery "
                  "to test)."]
    if notes:
        lines += ["", "## Refusals and failures", ""] + notes
    lines += kept_sections(path)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


STEPS_NOTE = f"{conformance.STEPS} solver steps a cell"

if __name__ == "__main__":
    sys.exit(main())
