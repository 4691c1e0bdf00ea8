"""The conformance matrix: families x recipe options, each merge against a naive reference.

A cell is one merge of a tiny family (tests/families.py) with one combination
of options, through mergekit itself (``run_merge``, ``mergekit-yaml`` or the
in-memory ``merge_state_dicts``). It passes when every merged tensor agrees
with ``expected`` (below) to 1e-5 relative on the merged delta (to the
rounding of the output dtype where that is 16-bit), or when mergekit refuses
the recipe with a one-line message and leaves no config.json.

``expected`` is independent of the plugin and of mergekit's loaders: it reads
the models with transformers (``from_pretrained(...).state_dict()`` has the
names mergekit writes, fused experts included), casts to the recipe dtype as
mergekit does, selects what the paper selects, solves delta by naive
full-space gradient descent (or Adam) in float64 (tests/reference.py), and
merges by the definition: task arithmetic, or TIES' sign election at density 1.

``python benchmarks/conformance.py`` runs the full matrix and writes
docs/conformance.md; tests/test_conformance.py runs a fast subset.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import yaml

import families
import reference
from mergekit_awd.params import RULE_KNOBS
import reference_data_free

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER = re.compile(r"\.\d+\.")  # a repeated block: model.layers.3., transformer.h.3., layer.3.
STEPS = 100

# option axes of the pairwise matrix, first value = the default
AXES = {
    "storage": ["fp32", "bf16", "fp16"],
    "dtype": [None, "bfloat16", "float16", "float32"],
    "out_dtype": [None, "float32", "bfloat16"],
    "scope": ["global", "tensor"],
    "optimizer": ["sgd", "adam"],
    "method": ["awd", "awd_ties", "awd_dare_ties"],  # DATA_FREE: cells of their own
    "select": ["linear", "all", "(attn|attention)"],
    "others": ["task_arithmetic", "base"],
    "weighting": ["default", "weights+normalize+keep_delta"],
}


# the data-free rules and their AWD variants (``data_free_cells``); WUDI at a step size
# that keeps float32 and float64 Adam together on these tiny task vectors
DATA_FREE = tuple(RULE_KNOBS)
AWD_DATA_FREE = tuple(f"awd_{m}" for m in DATA_FREE)
WUDI = {"wudi_steps": 30, "wudi_lr": 1e-7}


def tolerance(cell) -> float:
    """Relative error allowed on a float32 merge's delta: 1e-5; 1e-4 for the SVD rules,
    whose float32 singular vectors are accurate to eps over the singular-value gap (an
    Iso-CTS Qwen2 cell with weights: 1.5e-5)."""
    method = cell.get("method").removeprefix("awd_")
    return 1e-4 if method in DATA_FREE and method != "wudi" else 1e-5


@dataclass
class Cell:
    family: str
    options: Dict = field(default_factory=dict)
    special: Optional[str] = None  # union, sharded, bin, lora, slices, state_dicts, cli

    def get(self, axis):
        return self.options.get(axis, AXES[axis][0])

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.options.items() if v != AXES[k][0]]
        if self.special:
            parts.insert(0, self.special)
        return ", ".join(parts) or "defaults"


def pairwise(axes: Dict[str, list], seed: int = 0) -> List[Dict]:
    """A small set of rows covering every pair of values of every two axes (greedy)."""
    rng = random.Random(seed)
    names = list(axes)

    def pair(n1, v1, n2, v2):
        return ((n1, v1), (n2, v2)) if names.index(n1) < names.index(n2) else ((n2, v2), (n1, v1))

    def pairs(row):
        return {pair(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = {pair(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in axes[a] for vb in axes[b]}
    rows = []
    while uncovered:
        best = None
        for _ in range(30):
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            row = {a: va, b: vb}
            for n in rng.sample(names, len(names)):
                if n not in row:
                    row[n] = max(axes[n], key=lambda v: sum(
                        pair(n, v, m, row[m]) in uncovered for m in row))
            gain = len(pairs(row) & uncovered)
            if best is None or gain > best[0]:
                best = (gain, row)
        rows.append({n: best[1][n] for n in names})
        uncovered -= pairs(best[1])
    return rows


# -- the reference ---------------------------------------------------------------


def load_state(path: str, family: str, dtype: torch.dtype,
               cast_all: bool = False) -> Dict[str, torch.Tensor]:
    """The model's tensors under the names transformers uses, tied ones once, plus the
    float buffers a checkpoint stores that transformers does not load. ``cast_all``
    (a recipe `dtype:`): mergekit casts every tensor it loads, boolean masks too."""
    import transformers

    model_class = getattr(transformers, families.FAMILIES[family][1])
    model = model_class.from_pretrained(path, dtype=dtype)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().clone()
    renamed = renames(path, state)
    for name, tensor in stored_tensors(path).items():
        # GPT-NeoX's masked_bias and inv_freq: mergekit merges them like any tensor.
        # (Per-expert tensors of MoE checkpoints are not extra: mergekit fuses them.)
        if ((tensor.is_floating_point() or cast_all) and name not in state
                and name not in renamed and ".experts." not in name):
            state[name] = tensor.to(dtype)
    return state


def renames(path: str, state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """{stored name: model name} for tensors the checkpoint stores under another name
    (GPT-NeoX's embed_out is the model's lm_head). mergekit writes either name,
    as its architecture definition says."""
    out = {}
    for name, tensor in stored_tensors(path).items():
        if name in state or not tensor.is_floating_point():
            continue
        same = [k for k, v in state.items()
                if v.shape == tensor.shape and torch.equal(v, tensor.to(v.dtype))]
        if len(same) == 1:
            out[name] = same[0]
    return out


def stored_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors as stored in the files (names before any layout conversion)."""
    return reference.load(path)


def selected(select: str, name: str, tensor: torch.Tensor) -> bool:
    if select == "all":
        return True
    if select == "linear":  # every weight matrix inside the repeated blocks (paper, 4.2)
        return tensor.ndim >= 2 and bool(LAYER.search(name))
    return re.search(select, name) is not None


# A TIES sign election whose sum is within float32 rounding of zero (relative to the
# sum of the magnitudes) is decided by rounding: the merge (float32) and this float64
# reference may elect either sign there, and both are TIES's result.
UNDECIDED = 2.0 ** -20


def ties(taus: torch.Tensor, weights: List[float], lam: float, normalize: bool,
         flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TIES at density 1: sign election by the summed weighted vectors, disjoint mean
    (``flip``: entries where the other sign is elected)."""
    w = torch.tensor(weights, dtype=taus.dtype).reshape(-1, *([1] * (taus.dim() - 1)))
    deltas = taus * w
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    if flip is not None:
        majority = torch.where(flip, -majority, majority)
    mask = (deltas.sign() == majority).to(taus.dtype)
    mixed = (deltas * mask).sum(0)
    if normalize:
        div = (w * mask).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return lam * mixed


def undecided(hat: torch.Tensor, weights: List[float]) -> torch.Tensor:
    """The entries whose TIES sign election is decided by rounding (``UNDECIDED``)."""
    w = torch.tensor(weights, dtype=hat.dtype).reshape(-1, *([1] * (hat.dim() - 1)))
    deltas = hat * w
    return deltas.sum(0).abs() <= UNDECIDED * deltas.abs().sum(0)


def expected(base_state, ft_states, cell: Cell, params: Dict, weights: List[float],
             names: Optional[List[str]] = None, also: Optional[Dict] = None
             ) -> Dict[str, torch.Tensor]:
    """The merged tensors, by the definition, in float64. ``also`` (a dict) receives,
    for TIES entries whose sign election is decided by rounding, the value with the
    other sign elected and where: name -> (mask, value)."""
    select, method = params.get("select", "linear"), cell.get("method")
    others = params.get("others", "task_arithmetic")
    normalize = params.get("normalize", method == "awd_ties")
    lam, keep = params.get("lambda", 1.0), params.get("keep_delta", 0.0)
    names = names or list(base_state)
    chosen = ([] if method in DATA_FREE
              else [n for n in names if selected(select, n, base_state[n])])
    K = len(ft_states)
    # tau = fine-tune - base, and exactly 0 where they are equal (-inf masks too)
    taus = {n: torch.stack([torch.where(ft[n] == base_state[n], 0.0,
                                        ft[n].double() - base_state[n].double())
                            for ft in ft_states]) for n in names}
    solve = dict(alpha=params.get("alpha", 0.001), lr=params.get("lr", 0.005),
                 steps=params.get("steps", 1000), optimizer=params.get("optimizer", "sgd"))
    delta = {}
    if chosen and K > 1:
        if params.get("scope", "global") == "global":
            T = torch.cat([taus[n].reshape(K, -1) for n in chosen], dim=1)
            flat = reference.solve_delta(T, **solve)
            offset = 0
            for n in chosen:
                size = base_state[n].numel()
                delta[n] = flat[offset:offset + size].reshape(base_state[n].shape)
                offset += size
        else:
            for n in chosen:
                delta[n] = reference.solve_delta(taus[n].reshape(K, -1), **solve).reshape(
                    base_state[n].shape)
    out = {}
    for n in names:
        b = base_state[n].double()
        if n not in chosen and others == "base":
            out[n] = b
            continue
        d = delta.get(n, torch.zeros_like(b))
        hat = taus[n] - d
        if method in DATA_FREE or method in AWD_DATA_FREE:
            rule = method.removeprefix("awd_")
            moved = hat if n in chosen and method in AWD_DATA_FREE else taus[n]
            keep_d = keep * d if n in chosen and method in AWD_DATA_FREE else 0.0
            out[n] = reference_data_free.merge_tensor(
                rule, torch.zeros_like(b), list(moved), params, weights) + b + keep_d
        elif method == "awd":
            scale = lam / sum(weights) if normalize else lam
            out[n] = b + scale * sum(w * t for w, t in zip(weights, hat)) + keep * d
        else:
            out[n] = b + ties(hat, weights, lam, normalize) + keep * d
            mask = undecided(hat, weights)
            if also is not None and mask.any():
                also[n] = (mask, b + ties(hat, weights, lam, normalize, mask) + keep * d)
    return out


# -- running a cell ----------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # pass | refused | FAIL
    detail: str = ""


def recipe(cell: Cell, paths: Dict) -> Tuple[Dict, Dict, List[float]]:
    method = cell.get("method")
    params = {"steps": STEPS, "scope": cell.get("scope"), "optimizer": cell.get("optimizer"),
              "select": cell.get("select"), "others": cell.get("others")}
    if method in DATA_FREE:
        params = {}
    if method.endswith("wudi"):
        params.update(WUDI)
    weights = [1.0] * len(paths["fts"])
    if cell.get("weighting") != "default":
        weights = [1.0, 0.5, 2.0][: len(paths["fts"])]
        params.update(normalize=True, keep_delta=0.5, **{"lambda": 0.8})
        if method in DATA_FREE or method in AWD_DATA_FREE:  # no normalize there
            params.pop("normalize")
            if method in DATA_FREE:
                params.pop("keep_delta")
    models = [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths["fts"], weights)]
    config = {"merge_method": cell.get("method"), "base_model": paths["base"],
              "models": models, "parameters": params}
    for key in ("dtype", "out_dtype"):
        if cell.get(key):
            config[key] = cell.get(key)
    return config, params, weights


def output_dtype(cell: Cell) -> torch.dtype:
    """The dtype mergekit writes: out_dtype, else the recipe dtype, else the stored one."""
    name = cell.get("out_dtype") or cell.get("dtype")
    return DTYPES[name] if name else STORAGE[cell.get("storage")]


def roundings(cell: Cell) -> Tuple[torch.dtype, ...]:
    """Where a result is rounded: the merge's own dtype (the recipe dtype, else the
    stored one: mergekit merges in the inputs' dtype), then out_dtype on writing."""
    compute = DTYPES[cell.get("dtype")] if cell.get("dtype") else STORAGE[cell.get("storage")]
    return (compute, output_dtype(cell))


ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 0.0}


def settle_undecided(merged: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                     also: Dict) -> Dict[str, torch.Tensor]:
    """``want`` with each undecided TIES entry taken from the election the merge is
    closer to (either is correct)."""
    out = dict(want)
    for name, (mask, other) in also.items():
        got = merged.get(name)
        if got is None or got.shape != other.shape:
            continue
        got = got.double()
        closer = mask & ((got - other).abs() < (got - want[name]).abs())
        out[name] = torch.where(closer, other, want[name])
    return out


def compare(merged: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
            base: Dict[str, torch.Tensor], out_dtype: torch.dtype,
            skip: Tuple[str, ...] = (), rounded: Tuple[torch.dtype, ...] = (),
            base_path: Optional[str] = None, aliases: Optional[Dict[str, str]] = None,
            rel: float = 1e-5) -> Optional[str]:
    """None when every merged tensor matches, else what differs.

    ``rel`` (1e-5) relative on the merged delta when nothing rounds to 16 bits, else at
    most one rounding step of each 16-bit dtype the result went through.
    """
    ulp = sum(ULP[d] for d in set(rounded) | {out_dtype})
    aliases = aliases or {}
    written = {aliases.get(n, n) for n in merged}
    missing = [n for n in want if n not in written and n not in skip]
    if missing:
        return f"missing from the output: {missing[:3]}"
    for name, tensor in merged.items():
        name = name if name in want else aliases.get(name, name)
        if name in skip:
            continue
        if name not in want:
            # a non-float buffer the architecture lists (the causal mask of GPT-NeoX
            # checkpoints): identical in every input, copied as is
            stored = stored_tensors(base_path).get(name) if base_path else None
            if stored is not None and not stored.is_floating_point() and torch.equal(
                    tensor, stored):
                continue
            return f"unexpected output tensor {name}"
        if tensor.dtype != out_dtype:
            return f"{name} written as {tensor.dtype}, expected {out_dtype}"
        ref, got = want[name], tensor.double()
        if not torch.isfinite(ref).all():  # -inf masks in 16-bit: equal where equal
            if not torch.equal(got.isfinite(), ref.isfinite()) or not torch.equal(
                    got[~ref.isfinite()], ref[~ref.isfinite()]):
                return f"{name}: non-finite entries differ"
            got, ref = got.nan_to_num(0.0, 0.0, 0.0), ref.nan_to_num(0.0, 0.0, 0.0)
        if ulp == 0:
            # 1e-5 of the merged delta, plus one float32 rounding of the written values
            # (where the disentangled vectors nearly cancel, the delta is tiny)
            err = (got - ref).norm()
            allowed = rel * (ref - base[name].double()).norm() + 2.0 ** -23 * ref.norm()
            if err > allowed:
                rel = err / (ref - base[name].double()).norm().clamp_min(1e-30)
                return f"{name}: relative error {rel:.2e}"
        else:
            bad = (got - ref).abs() > ulp * ref.abs() + 1e-7
            if bad.any():
                return f"{name}: {int(bad.sum())} entries beyond one 16-bit rounding"
    return None


def run_merge_in_process(config: Dict, out: str, **options) -> Optional[str]:
    """mergekit's run_merge; the refusal message (one line) or None."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        run_merge(MergeConfiguration.model_validate(config), out,
                  MergeOptions(copy_tokenizer=False, quiet=True, **options))
    except Exception as error:  # a refusal: its message is the cell's result
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def run_cli(config: Dict, out: str, *args) -> Optional[str]:
    path = out + ".yml"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    proc = subprocess.run([exe, path, out, "--no-copy-tokenizer", *args],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return lines[-1] if lines else f"exit {proc.returncode}"
    return None


class Matrix:
    """Builds (and caches) the families a cell needs under ``root``."""

    def __init__(self, root: str):
        self.root = root
        self.built: Dict[Tuple, Dict] = {}

    def family(self, name: str, storage: str, variant: str = "plain") -> Dict:
        key = (name, storage, variant)
        if key not in self.built:
            folder = os.path.join(self.root, re.sub(r"\W+", "_", f"{name}_{storage}_{variant}"))
            kwargs = {"dtype": STORAGE[storage]}
            if variant == "union":
                kwargs["added_tokens"] = True
            elif variant == "sharded":
                kwargs["max_shard_size"] = "20KB"
            elif variant == "bin":
                kwargs["safe_serialization"] = False
            self.built[key] = families.make(folder, name, **kwargs)
        return self.built[key]

    def run(self, cell: Cell, index: int) -> Outcome:
        try:
            return self._run(cell, index)
        except Exception:
            return Outcome("FAIL", traceback.format_exc().strip().splitlines()[-1])

    def _run(self, cell: Cell, index: int) -> Outcome:
        storage = cell.get("storage")
        variant = cell.special if cell.special in ("union", "sharded", "bin") else "plain"
        paths = self.family(cell.family, storage, variant)
        config, params, weights = recipe(cell, paths)
        out = os.path.join(self.root, "out", f"{index:04d}")
        skip: Tuple[str, ...] = ()
        options = {}
        if cell.special == "union":
            config["tokenizer_source"] = "union"
        if cell.special == "bin":
            options["lazy_unpickle"] = True
        if cell.special == "state_dicts":
            return self._state_dicts(cell, paths, params, weights)
        if cell.special == "cli":
            refusal = run_cli(config, out)
        else:
            refusal = run_merge_in_process(config, out, **options)
        if refusal is not None:
            if os.path.exists(os.path.join(out, "config.json")):
                return Outcome("FAIL", f"refused but wrote config.json: {refusal}")
            plain = dict(config, merge_method="task_arithmetic", parameters={})
            if run_merge_in_process(plain, out + "_ta", **options) == refusal:
                return Outcome("mergekit", f"{refusal} (mergekit's own task_arithmetic "
                                           f"fails the same way on this recipe)")
            return Outcome("refused", refusal)
        dtype = DTYPES[cell.get("dtype")] if cell.get("dtype") else STORAGE[storage]
        cast_all = bool(cell.get("dtype"))
        base = load_state(paths["base"], cell.family, dtype, cast_all)
        fts = [load_state(p, cell.family, dtype, cast_all) for p in paths["fts"]]
        aliases = renames(paths["base"], base)
        if cell.special == "union":
            # vocabulary tensors are permuted by mergekit's tokenizer surgery and are
            # not selected by `linear`: they must equal mergekit's own task_arithmetic
            skip = tuple(n for n in base if base[n].shape != fts[0][n].shape
                         or any(ft[n].shape != base[n].shape for ft in fts))
            problem = self._vocabulary_as_task_arithmetic(config, out, skip, index, options)
            if problem:
                return Outcome("FAIL", problem)
            base = {n: t for n, t in base.items() if n not in skip}
            fts = [{n: t for n, t in ft.items() if n not in skip} for ft in fts]
        also = {}
        want = expected(base, fts, cell, params, weights, also=also)
        merged = reference.load(out)
        want = settle_undecided(merged, want, also)
        problem = compare(merged, want, base, output_dtype(cell), skip, roundings(cell),
                          paths["base"], aliases, tolerance(cell))
        return Outcome("FAIL", problem) if problem else Outcome("pass")

    def _vocabulary_as_task_arithmetic(self, config, out, names, index, options):
        ta = dict(config, merge_method="task_arithmetic",
                  parameters={"lambda": config["parameters"].get("lambda", 1.0),
                              "normalize": config["parameters"].get("normalize", False)})
        rule = config["merge_method"].removeprefix("awd_")
        if rule in DATA_FREE:  # the vocabulary tensors: the rule on the raw task vectors
            ta["merge_method"] = rule
            ta["parameters"] = {k: v for k, v in config["parameters"].items()
                                if k in ("lambda", *WUDI)}
        elif config["merge_method"] != "awd":
            ta["merge_method"] = "ties" if config["merge_method"] == "awd_ties" else "dare_ties"
            ta["parameters"]["normalize"] = config["parameters"].get(
                "normalize", config["merge_method"] == "awd_ties")
        ta_out = out + "_ta"
        refusal = run_merge_in_process(ta, ta_out, **options)
        if refusal:
            return f"mergekit's own method refused the same recipe: {refusal}"
        got, want = reference.load(out), reference.load(ta_out)
        for name in names:
            if name not in got:
                continue
            if config["parameters"].get("others") == "base":
                continue
            if not torch.allclose(got[name].double(), want[name].double(), rtol=1e-5, atol=1e-7):
                return f"{name} differs from mergekit's {ta['merge_method']}"
        return None

    def _state_dicts(self, cell, paths, params, weights) -> Outcome:
        from mergekit.merge_methods.api import merge_state_dicts

        import mergekit_awd  # noqa: F401  (in-process: registers the methods)

        dtype = STORAGE[cell.get("storage")]
        base = load_state(paths["base"], cell.family, dtype)
        fts = [load_state(p, cell.family, dtype) for p in paths["fts"]]
        models = {"base": base, **{f"ft{i}": ft for i, ft in enumerate(fts)}}
        parameters = dict(params, weight={f"ft{i}": w for i, w in enumerate(weights)})
        merged = merge_state_dicts(models, cell.get("method"), parameters=parameters,
                                   base="base")
        also = {}
        want = settle_undecided(merged, expected(base, fts, cell, params, weights, also=also),
                                also)
        problem = compare(merged, want, base, dtype, rel=tolerance(cell))
        return Outcome("FAIL", problem) if problem else Outcome("pass")


def data_free_cells(family_names: List[str]) -> List[Cell]:
    """Each data-free rule and its AWD variant on every family: at the defaults, with
    weights, lambda and keep_delta, in bf16 storage with `dtype: float32`, and through
    the tokenizer union, the CLI and merge_state_dicts."""
    out = []
    for name in family_names:
        for method in DATA_FREE + AWD_DATA_FREE:
            out.append(Cell(name, {"method": method}))
            out.append(Cell(name, {"method": method, "weighting": "weights+normalize+keep_delta"}))
            out.append(Cell(name, {"method": method, "storage": "bf16", "dtype": "float32"}))
            for special in ("union", "cli", "state_dicts"):
                if not (special == "union" and name == "roberta"):
                    out.append(Cell(name, {"method": method}, special))
    return out


def cells(family_names: List[str], full: bool = True) -> List[Cell]:
    """The matrix: a pairwise cover of AXES per family, plus the special recipes."""
    out = []
    rows = pairwise(AXES) if full else [{}]
    for name in family_names:
        for row in rows:
            out.append(Cell(name, {k: v for k, v in row.items() if v != AXES[k][0]}))
        specials = ["union", "sharded", "bin", "state_dicts", "cli"]
        if name == "roberta":
            specials.remove("union")  # a masked LM with a word-level test tokenizer: no
        for special in specials:
            options = {"scope": "global"}
            if special == "state_dicts":
                options = {"optimizer": "adam"} if full else {}
            out.append(Cell(name, {k: v for k, v in options.items() if v != AXES[k][0]},
                            special))
    return out
