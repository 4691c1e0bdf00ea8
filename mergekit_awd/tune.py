"""`mergekit-awd tune`: form each candidate merge, score it on held-out data, keep the best.

A candidate is the user's recipe with a method and a few parameters replaced
(``candidate_config``), so the recipe written as ``best.yml`` *is* the winner.
Each candidate is planned by mergekit's own planner and its tensor tasks are
executed by mergekit's own ``ExecuteMergeMethodTask.execute``: what ``mergekit-yaml``
would compute for that recipe, tensor for tensor.

Two ways to form a candidate:

- in memory (``Inputs``), when the inputs fit the memory allowed: every planned
  tensor's inputs are read once (mergekit's ``GatherTensors``: loading, layout
  conversion, ``dtype:``), each candidate's tasks run on them, and the results are
  swapped into one loaded model. AWD candidates share one Gram matrix, computed
  from those inputs by the kernel's own Gram pass, and one solve per solver
  setting (under ``scope: global``): forming one costs the combination alone;
- on disk (``on_disk``), otherwise, or for ``--eval-cmd``: mergekit's ``run_merge``
  into a temporary folder, removed after scoring. AWD candidates still share one
  Gram pass (offered to the candidate's ``RunContext`` as ``known``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_awd import context, evaluate, mergekit_run, params, scope
from mergekit_awd.params import AWDParameterError
from mergekit_awd.scope import AWD_METHODS
# methods that draw random masks: formed by mergekit's own run_merge with the seed, so
# that `mergekit-yaml best.yml OUT --random-seed SEED` writes the model tune scored
RANDOMIZED = ("dare_ties", "dare_linear", "della", "della_linear", "awd_dare_ties")
# mergekit methods whose `density` is their sparsification knob
SPARSIFYING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "awd_ties", "awd_dare_ties")
# methods whose merge, for fixed other settings, is f(0) + lambda * D (``Former.form``
# forms f(lambda_1) once and every other lambda by one scaled add):
# - mergekit's generalized_task_arithmetic (task_arithmetic, ties, breadcrumbs,
#   breadcrumbs_ties): ``base + lambda * mixed_delta``, mixed_delta (masks,
#   sparsification, normalize) independent of lambda; f(0) = base;
# - awd: base + keep_delta * delta + lambda * sum_k weight_k (tau_k - delta); awd_ties:
#   the same with mergekit's TIES of tau_k - delta, delta independent of lambda (the
#   solve has no lambda); f(0) = base + keep_delta * delta, awd's at lambda = 0.
# - the data-free rules (tsv, iso_c, iso_cts, wudi: data_free.py): base + lambda *
#   RULE(tau), RULE without lambda; f(0) = base. Their AWD variants: base + keep_delta *
#   delta + lambda * RULE(tau - delta), as awd_ties.
# The randomized methods are linear too, but formed by run_merge (RANDOMIZED).
LINEAR_IN_LAMBDA = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "awd",
                    "awd_ties", *params.RULE_KNOBS,
                    *(f"awd_{rule}" for rule in params.RULE_KNOBS))


@dataclass(frozen=True)
class Candidate:
    """One setting to try: a method and the recipe parameters it replaces
    (``values``: (name, value) pairs in the order of ``params.TUNABLE``;
    ``as_written``: the recipe itself, every value its own)."""

    method: str
    values: tuple = ()
    as_written: bool = False

    def overrides(self) -> Dict[str, float]:
        """The recipe parameters this candidate sets (under their recipe names; a value
        None keeps the recipe's own, per-model ones included)."""
        return {k: v for k, v in self.values if v is not None}

    @property
    def label(self) -> str:
        if self.as_written:
            return f"{self.method} (the recipe as written)"
        return f"{self.method} " + " ".join(
            f"{k}={v:g}" if v is not None else f"{k}=recipe's" for k, v in self.values)

    @property
    def is_awd(self) -> bool:
        return self.method in AWD_METHODS


def method_spec(name: str):
    from mergekit import merge_methods

    try:
        return merge_methods.get(name).spec
    except Exception:
        from mergekit.merge_methods import registry

        known = ", ".join(sorted(m.spec.name for m in registry.registered_methods()))
        raise AWDParameterError(f"--methods: mergekit has no merge method {name!r}; "
                                f"it has: {known}") from None


def knobs_of(method: str) -> list:
    """The tune knobs (``params.TUNABLE``) that ``method`` has; density only where it
    sparsifies."""
    names = {p.name for p in method_spec(method).parameters}
    return [p for p in params.TUNABLE if p.name in names
            and (not p.per_model or method in SPARSIFYING)]


def grid(methods: Sequence[str], values: Dict[str, Sequence[float]]) -> List[Candidate]:
    """Every combination of each method's own knobs (``values``: name -> the values
    to try), each value validated as the recipe's are; lambda varies fastest (one
    setting of the other knobs after another: ``Former.form`` scales each)."""
    out = []
    for method in methods:
        knobs = knobs_of(method)
        order = sorted(range(len(knobs)), key=lambda i: knobs[i].name == "lambda")
        axes = [[(knobs[i].name, None if v is None else params.validate(knobs[i].name,
                                                                         float(v)))
                 for v in values[knobs[i].name]] for i in order]
        for combo in itertools.product(*axes):
            back = dict(zip(order, combo))
            out.append(Candidate(method, tuple(back[i] for i in range(len(knobs)))))
    return out


# what tune compares when --methods is not given (besides the recipe's own method):
# mergekit's two most used task-vector merges, and AWD alone and with TIES (the
# paper's Table 4)
DEFAULT_METHODS = ("task_arithmetic", "ties", "awd", "awd_ties", "wudi", "tsv", "iso_c",
                   "awd_wudi")
# The data-free rules among them beat TIES in SmolLM2 regime (a), every seed measured,
# and awd_wudi was the choice in regime (b) (fine-tunes sharing a stage: +6.8 [+5.3,
# +8.3] over wudi on test, 3 seeds; in (a) -0.7 [-1.5, +0.2], 3 seeds)
# (docs/benchmarks.md), but they cost far more to form than a sum: 4 task vectors, 2 CPU
# cores, wudi and awd_wudi ~8 min each at 135M and 5.3 h at 1B, tsv ~70 s and 30 min,
# iso_c ~13 s and 6 min (a task-arithmetic merge: 5-12 s and ~25 s), growing with
# parameters x width. A default tune leaves each out, with one line, above these
# parameters per model on CPU (100x more with --cuda: an estimate from flop counts, not
# measured); --methods names them at any size.
COSTLY_DEFAULTS = {"wudi": 0.3e9, "awd_wudi": 0.3e9, "tsv": 1e9, "iso_c": 3e9}


def plan(methods: Sequence[str], values: Dict[str, Sequence[float]], searched: bool,
         budget: Optional[int]) -> list:
    """(method, its settings, evaluations per setting for the lambda search or None)
    per method: with ``searched``, each setting of the other knobs (at lambda
    values["lambda"][0]) gets a search from the coarse values["lambda"] (``budget``
    evaluations per method, shared by its settings; None: ``PER_SETTING`` each);
    without, or for a method without lambda, the settings are the exact grid."""
    if budget is not None and budget < 1:
        raise AWDParameterError(f"--budget must be >= 1; got {budget}")
    out = []
    for method in methods:
        has_lambda = any(p.name == "lambda" for p in knobs_of(method))
        if not searched or not has_lambda:
            out.append((method, grid([method], values), None))
            continue
        settings = grid([method], dict(values, **{"lambda": values["lambda"][:1]}))
        out.append((method, settings,
                    settings_budget(method, len(settings), len(values["lambda"]), budget)))
    return out


def plan_line(plan_: list, searched: bool, budget: Optional[int], coarse: int = 5) -> str:
    """What the plan will evaluate, in one line."""
    parts = []
    for method, settings, per in plan_:
        if per is None:
            parts.append(f"{method} {len(settings)}")
        else:
            parts.append(f"{method} {len(settings)} x lambda search (<= {per})")
    return "candidates: " + ", ".join(parts) + (
        f" (lambda from the coarse grid, extended at edges within "
        f"[{LAMBDA_LOW:g}, {LAMBDA_HIGH:g}], refined to {RESOLUTION:.0%} where the budget "
        f"allows: {_allows(plan_, coarse)}; "
        + (f"--budget {budget} per method)" if budget is not None else
           f"{PER_SETTING} evaluations per setting; --budget N: N per method)")
        if searched else "")


def _allows(plan_: list, coarse: int) -> str:
    """What a setting's evaluations buy after the coarse grid, in words."""
    least = min((p for _, settings, p in plan_ if p is not None), default=PER_SETTING)
    return (f"{least} evaluations a setting, {max(least - coarse, 0)} after the {coarse} "
            f"coarse lambdas (one step out of the grid doubles or halves lambda; "
            f"refining to {RESOLUTION:.0%} takes 4-6 steps)")


def with_lambda(candidate: Candidate, lam: float) -> Candidate:
    return dataclasses.replace(candidate, values=tuple(
        (k, float(lam) if k == "lambda" else v) for k, v in candidate.values))


def as_written(config) -> Candidate:
    """The recipe itself as a candidate (every knob the recipe's own)."""
    method = config.merge_method
    return Candidate(method, tuple((p.name, None) for p in knobs_of(method)),
                     as_written=True)


def rivals(rows: Sequence[Dict], candidates: Sequence[Candidate], best: int,
           metric: str, config) -> Dict[int, str]:
    """What the choice is compared with: each other method's best candidate, and the
    recipe as written; row index -> why, best ranked first."""
    ok = [i for i, r in enumerate(rows) if usable(r)]
    out = {}
    for method in dict.fromkeys(c.method for c in candidates):
        mine = [i for i in ok if candidates[i].method == method and
                not candidates[i].as_written]
        if mine and method != candidates[best].method:
            out[min(mine, key=lambda i: evaluate.rank(rows[i]["mean"], metric))] = (
                f"best {method}")
    for i in ok:
        if candidates[i].as_written and i != best:
            out.setdefault(i, "the recipe as written")
    return dict(sorted(out.items(), key=lambda kv: evaluate.rank(rows[kv[0]]["mean"],
                                                                 metric)))


def candidate_config(config, candidate: Candidate):
    """The recipe for ``candidate``: its method, its values at the top level (and
    removed elsewhere so that they apply everywhere), parameters the method does
    not have dropped, a required one it lacks (``weight``) given its awd default."""
    cfg = config.model_copy(deep=True)
    cfg.merge_method = candidate.method
    spec = method_spec(candidate.method)
    known = {p.name for p in spec.parameters}
    overrides = candidate.overrides()
    for _, block in params.parameter_blocks(cfg):
        for name in list(block or {}):
            if name not in known or name in overrides:
                del block[name]
    # a model block without it (per-model values override the top level)
    given = set.intersection(*[set(m.parameters or {}) for m in cfg.models or []] or [set()])
    top = dict(cfg.parameters or {}, **overrides)
    for p in spec.parameters:
        if p.required and p.name not in given and p.name not in top:
            ours = params.declared(p.name)
            if ours is None:
                raise AWDParameterError(
                    f"{candidate.method} needs parameter '{p.name}', which the recipe does "
                    f"not set; add it to the recipe's parameters")
            top[p.name] = ours.default
    cfg.parameters = top
    return cfg


class Inputs:
    """Every planned tensor's inputs, read once, as mergekit hands them to a method."""

    def __init__(self, tasks, options):
        from mergekit.graph import Executor

        gathers = list({gather_key(t.gather_tensors): t.gather_tensors for t in tasks}.values())
        executor = Executor(gathers, math_device="cpu", storage_device="cpu")
        self.values = {gather_key(task): value for task, value in
                       executor.run(quiet=options.quiet, desc="tune: reading inputs")}

    def execute(self, tasks, deltas: bool = False) -> Iterable:
        """Each task run on its inputs; ``deltas``: on the inputs moved by minus the
        base (the base zero, each fine-tune its task vector, as mergekit's methods
        compute it: ``entry.tensor - base`` in the inputs' dtype)."""
        for task in tasks:
            value = self.values.get(gather_key(task.gather_tensors))
            if value is None:
                raise RuntimeError(f"tune: tensor {task.output_weight.name} of a candidate "
                                   f"reads inputs the first pass did not read")
            if deltas:
                base = value[task.base_model]
                value = {m: torch.zeros_like(t) if m == task.base_model else t - base
                         for m, t in value.items()}
            yield task, task.execute(tensors=value)

    def base_of(self, task) -> Optional[torch.Tensor]:
        """The base model's tensor among ``task``'s inputs (None: it has none)."""
        value = self.values.get(gather_key(task.gather_tensors)) or {}
        return value.get(task.base_model) if task.base_model is not None else None

    def form(self, tasks, out_dtype: Optional[str]) -> Dict[str, torch.Tensor]:
        """The merged tensors of ``tasks``, cast as mergekit's writer casts them."""
        return cast(self.form_raw(tasks), tasks, out_dtype)

    def form_raw(self, tasks, deltas: bool = False) -> Dict[str, torch.Tensor]:
        """The merged tensors of ``tasks`` as the method returns them (before the
        writer's cast); ``deltas``: formed with the base at zero (``execute``)."""
        return {task.output_weight.name: result
                for task, result in self.execute(tasks, deltas) if result is not None}

    def gram(self, tasks) -> scope.Collected:
        """The kernel's own Gram pass, over the inputs already read."""
        return scope.collect(context.RunContext(), lambda: list(self.execute(tasks)))


def cast(raw: Dict[str, torch.Tensor], tasks, out_dtype: Optional[str]):
    """``raw`` cast as mergekit's writer casts each tensor (its forced dtype, else the
    recipe's ``out_dtype``)."""
    from mergekit.common import dtype_from_name

    out = {}
    for task in tasks:
        name = task.output_weight.name
        if name in raw:
            dtype = task.output_weight.force_dtype or out_dtype
            out[name] = raw[name].to(dtype_from_name(dtype)) if dtype else raw[name]
    return out


def gather_key(gather) -> tuple:
    """What a ``GatherTensors`` reads (its ImmutableMap compares by identity)."""
    return frozenset(gather.weight_info.items()), gather.dtype, gather.device


def input_bytes(config) -> int:
    """Bytes every input model's weights take once read: the sizes of their files,
    scaled to the recipe's ``dtype:`` where it sets one (mergekit casts as it reads)."""
    from mergekit.common import dtype_from_name

    wanted = dtype_from_name(config.dtype).itemsize if config.dtype else None
    total = 0.0
    for model in config.referenced_models():
        for path in _weight_files(model):
            stored = _stored_itemsize(path) if wanted else None
            total += os.path.getsize(path) * (wanted / stored if stored else 1.0)
    return int(total)


def _weight_files(model) -> List[str]:
    """The weight files of ``model`` (a ModelReference) that exist on disk."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    paths = (os.path.join(index.base_path, name) for name in set(index.tensor_paths.values()))
    return [p for p in paths if os.path.exists(p)]


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _stored_itemsize(path: str) -> Optional[int]:
    """The item size of a safetensors file's first floating tensor (None: unknown)."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for name in f.keys():
            size = _ITEMSIZE.get(f.get_slice(name).get_dtype())
            if size:
                return size
    return None


def default_max_memory() -> int:
    """70% of the memory available now (Linux), else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.7)
    except OSError:
        pass
    return 8 * 2**30


@dataclass
class LineEnd:
    """f'(lambda_1): a setting's merge minus the base at its first lambda."""

    lam: float
    deltas: Dict[str, torch.Tensor]
    tasks: list
    out_dtype: Optional[str]


@dataclass
class Line:
    """One setting of a method linear in lambda (``Former.form``): f'(lambda) =
    f'(0) + (lambda / lambda_1) (f'(lambda_1) - f'(0)), f' = the merge minus the base.

    A method linear in lambda (``LINEAR_IN_LAMBDA``) whose inputs and output are 32
    bits or more is formed with the base at zero (``Inputs.execute``): f'(lambda_1)
    in full at the first lambda_1 of each setting of its other knobs, and f'(0) by a
    cheap method at the second (``zero_of``); every lambda is then base + f'(0) +
    (lambda / lambda_1) (f'(lambda_1) - f'(0)), one scaled add. mergekit's ``base +
    lambda * mixed_delta`` computes ``entry - base`` first, so at lambda_1 this is
    its merge bit for bit; at other lambdas the difference is a rounding of the
    (small) merged delta, not of the (large) weights. 16-bit inputs or outputs:
    formed in full at every lambda (mergekit's 16-bit arithmetic is not a float32
    scaled add).
    """

    key: tuple  # ``line_key``: the setting apart from lambda
    first: Optional[LineEnd] = None  # None: formed in full at every lambda (16 bits)
    zero: Optional[Dict[str, torch.Tensor]] = None  # f'(0), from the second lambda on


def memory_need(config, model) -> int:
    """Bytes that forming in memory needs: the inputs read once, the scoring model, one
    candidate's tensors and the two ends of a line."""
    return input_bytes(config) + 4 * sum(p.numel() * p.element_size()
                                         for p in model.parameters())


def memory_refusal(need: int, max_memory: int) -> str:
    """Why candidates needing ``need`` bytes (``memory_need``) cannot be formed in
    memory ("" where they can)."""
    if need > max_memory:
        return (f"the inputs and the model need about {need / 2**30:.1f} GiB, over "
                f"--max-memory {max_memory / 2**30:.1f} GiB")
    return ""


def layout_refusal(model, cfg, tasks, options) -> str:
    """Why mergekit's output for ``cfg`` cannot be swapped into ``model`` ("" where it
    can)."""
    names = set(model.state_dict())
    missing = [t.output_weight.name for t in tasks if t.output_weight.name not in names]
    other = _config_differences(model.config, mergekit_run.out_config(cfg, options))
    if other:
        return (f"mergekit writes a model whose config differs from base_model's "
                f"({other}: a slices recipe?)")
    if missing:
        return f"mergekit writes tensors the model does not have ({missing[0]}, ...)"
    if not all(_is_method_task(t) for t in tasks):
        return "the recipe needs tokenizer or vocabulary work per tensor"
    return ""


def line_bytes(line: Line) -> int:
    """The memory a line holds: its two ends' tensors."""
    ends = [line.first.deltas if line.first is not None else {}, line.zero or {}]
    return sum(t.numel() * t.element_size() for end in ends for t in end.values())


@dataclass
class Shelf:
    """Lines of settings formed before, kept while they fit in ``room`` bytes (the
    memory forming in memory leaves), the least recently used dropped first. A later
    candidate of such a setting, e.g. a method's best scored again on --test, is
    then one add instead of a new merge (for WUDI, minutes)."""

    room: int
    lines: Dict[tuple, Line] = field(default_factory=dict)

    def put(self, line: Line) -> None:
        if line.first is None:  # formed in full at every lambda: nothing to keep
            return
        self.lines[line.key] = line
        held = sum(map(line_bytes, self.lines.values()))
        while self.lines and held > self.room:
            held -= line_bytes(self.lines.pop(next(iter(self.lines))))

    def take(self, key: tuple) -> Line:
        return self.lines.pop(key)

    def clear(self) -> None:
        """Give the memory back (the learned fit needs it)."""
        self.lines = {}


class Former:
    """Forms candidates of one recipe: in memory when possible, else on disk."""

    def __init__(self, config, options, max_memory: int, model, in_memory: bool):
        self.config, self.options = config, options
        self.model = model
        self.inputs: Optional[Inputs] = None
        self.input_tasks: list = []
        self.collected: Optional[scope.Collected] = None
        self.runs: Dict = {}
        self.line: Optional[Line] = None  # the setting formed last (``form``)
        need = memory_need(config, model) if in_memory else max_memory
        self.shelf = Shelf(max_memory - need)
        self.gram_seconds = 0.0
        self.reason = (memory_refusal(need, max_memory) if in_memory
                       else "--eval-cmd scores a model folder")
        self.in_memory = in_memory and not self.reason

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        """Read the inputs (in memory) and make the one Gram pass AWD candidates share."""
        first_cfg = candidate_config(self.config, candidates[0])
        tasks = mergekit_run.plan_tensor_tasks(first_cfg, self.options)
        if self.in_memory:
            self.reason = layout_refusal(self.model, first_cfg, tasks, self.options)
            self.in_memory = not self.reason
            if self.in_memory:
                self.input_tasks = tasks
                self.inputs = Inputs(tasks, self.options)
        start = time.perf_counter()
        self.collected = shared_gram(self.config, self.options, self.inputs, candidates)
        self.gram_seconds = time.perf_counter() - start

    def known_gram(self, candidate: Candidate) -> Optional[scope.Collected]:
        """The shared Gram pass, with this candidate's settings (None: not global)."""
        if self.collected is None or self.collected.settings is None or not candidate.is_awd:
            return None
        shared = {name: value for name, value in candidate.overrides().items()
                  if not params.declared(name).per_model}
        return dataclasses.replace(self.collected,
                                   settings=self.collected.settings.replace(**shared))

    def read_inputs(self) -> Inputs:
        """The inputs read once (again, after ``learn`` consumed them)."""
        if self.inputs is None:
            self.inputs = Inputs(self.input_tasks, self.options)
        return self.inputs

    def run_for(self, candidate: Candidate) -> context.RunContext:
        """The candidate's merge context: one solve per solver setting, shared by the
        candidates that have it (scope: tensor: each tensor solves itself)."""
        known = self.known_gram(candidate)
        quiet = bool(getattr(self.options, "quiet", False))  # the rules' progress lines
        if known is None:
            return context.RunContext(quiet=quiet)
        key = known.settings.solver_key()
        if key not in self.runs:
            self.runs[key] = context.RunContext(known=known, quiet=quiet)
            self.runs[key].global_solution(known.settings, known.models)
        return self.runs[key]

    def form(self, candidate: Candidate, cfg=None) -> Dict[str, torch.Tensor]:
        """The candidate's merged tensors, formed from the inputs read once (``cfg``:
        another recipe with the candidate's solver settings, e.g. a learned one); a
        method linear in lambda as one scaled add on its setting's ``Line``."""
        if cfg is not None or not scalable(candidate):
            return cast(*self._formed(candidate, cfg))
        lam = candidate.overrides()["lambda"]
        key = line_key(candidate)
        if key in self.shelf.lines and (self.line is None or self.line.key != key):
            self._new_line(self.shelf.take(key))  # formed before: not again
        line = self.line
        if (line is not None and line.key != key and line.first is not None
                and shifted_key(key) is not None and shifted_key(key) == shifted_key(line.key)):
            self._shift_line(candidate)  # another keep_delta: the same D, f'(0) moved
        if self.line is None or self.line.key != key:  # a new setting
            cfg = candidate_config(self.config, candidate)
            tasks = mergekit_run.plan_tensor_tasks(cfg, self.options)
            self._new_line(Line(key))
            if lam == 0 or not full_precision(self.read_inputs(), tasks, cfg.out_dtype):
                return cast(*self._formed(candidate))
            one = self._formed(candidate, deltas=True)[0]
            self.line.first = LineEnd(lam, one, tasks, cfg.out_dtype)
            return cast(plus_base(self.read_inputs(), one, tasks), tasks, cfg.out_dtype)
        line = self.line
        if line.first is None:  # 16 bits: in full at every lambda
            return cast(*self._formed(candidate))
        one, tasks = line.first.deltas, line.first.tasks
        if line.zero is None:  # the second lambda of this setting: f'(0), once
            line.zero = self._formed(zero_of(candidate), deltas=True)[0]
            if set(line.zero) != set(one):
                line.first = None
                return cast(*self._formed(candidate))
        t = lam / line.first.lam
        return cast(plus_base(self.read_inputs(), {n: torch.lerp(line.zero[n], one[n], t) for n in one},
                                    tasks), tasks, line.first.out_dtype)

    def _shift_line(self, candidate: Candidate) -> None:
        """Move the line just formed to ``candidate``'s keep_delta (an AWD method,
        every other knob the same): keep_delta adds keep_delta * delta, and delta
        does not depend on it (the solve has no keep_delta), so the new line is the
        old one moved by f'_new(0) - f'_old(0), both formed by the cheap
        ``zero_of``: awd_ties' TIES combination is not formed again. (The old line
        passed ``_full_precision``; keep_delta changes no dtype, so the new one does
        too.)"""
        cfg = candidate_config(self.config, candidate)
        tasks = mergekit_run.plan_tensor_tasks(cfg, self.options)
        first, zero = self.line.first, self.line.zero
        if zero is None:
            old = dataclasses.replace(candidate, values=tuple(
                kv for kv in self.line.key[1] if kv[0] != "lambda") + (("lambda", first.lam),))
            zero = self._formed(zero_of(old), deltas=True)[0]
        moved = self._formed(zero_of(candidate), deltas=True)[0]
        one = first.deltas
        if not set(zero) == set(moved) == set(one):
            return
        self._new_line(Line(line_key(candidate), LineEnd(
            first.lam, {n: one[n] + (moved[n] - zero[n]) for n in one}, tasks,
            cfg.out_dtype), moved))

    def _new_line(self, line: Line) -> None:
        """``line`` becomes the current one; the one it replaces goes on the shelf."""
        old, self.line = self.line, line
        if old is not None and old.key != line.key:
            self.shelf.put(old)

    def _formed(self, candidate: Candidate, cfg=None, deltas: bool = False):
        """(raw merged tensors, their tasks, the recipe's out_dtype): the candidate
        formed in full by mergekit's tasks (``deltas``: with the base at zero)."""
        cfg = cfg or candidate_config(self.config, candidate)
        tasks = mergekit_run.plan_tensor_tasks(cfg, self.options)
        with self.run_for(candidate).active(), _seeded(self.options), _quiet_kernel():
            return self.read_inputs().form_raw(tasks, deltas), tasks, cfg.out_dtype

    def merge(self, candidate: Candidate, out_path: str) -> None:
        """mergekit's run_merge of the candidate into ``out_path``, offered the shared
        Gram pass."""
        cfg = candidate_config(self.config, candidate)
        with _seeded(self.options):
            context.run_merge(cfg, out_path, self.options, source=cfg.to_yaml(),
                              known=self.known_gram(candidate))

    @contextlib.contextmanager
    def on_disk(self, candidate: Candidate):
        """The candidate merged into a temporary folder, removed afterwards."""
        folder = tempfile.mkdtemp(prefix="awd-tune-")
        try:
            self.merge(candidate, folder)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def full_precision(inputs: Inputs, tasks, out_dtype: Optional[str]) -> bool:
    """Every input of ``tasks`` (as read: after ``dtype:``) and every written
    tensor in 32 bits or more, and every task with a base among its inputs."""
    from mergekit.common import dtype_from_name

    for task in tasks:
        value = inputs.values.get(gather_key(task.gather_tensors)) or {}
        written = task.output_weight.force_dtype or out_dtype
        if (inputs.base_of(task) is None
                or any(t.dtype not in _WIDE for t in value.values())
                or (written is not None and dtype_from_name(written) not in _WIDE)):
            return False
    return True

def plus_base(inputs: Inputs, moved: Dict[str, torch.Tensor], tasks) -> Dict[str, torch.Tensor]:
    """base + the merged deltas, tensor by tensor."""
    return {t.output_weight.name: inputs.base_of(t).to(moved[t.output_weight.name].dtype)
            + moved[t.output_weight.name] for t in tasks if t.output_weight.name in moved}


def shared_gram(config, options, inputs: Optional[Inputs], candidates
                ) -> Optional[scope.Collected]:
    """The one Gram pass the AWD candidates share (None: no AWD candidate, or not
    ``scope: global``), from the inputs read once where there are."""
    awd = [c for c in candidates if c.is_awd]
    if not awd:
        return None
    tasks = mergekit_run.plan_tensor_tasks(candidate_config(config, awd[0]), options)
    if not _global_scope(tasks):
        return None
    if inputs is not None:
        return inputs.gram(tasks)
    return scope.collect_tasks(context.RunContext(options=options), awd[0].method, tasks,
                               options.device, "cpu")


def scalable(candidate: Candidate) -> bool:
    """Whether other lambdas of ``candidate``'s setting are one scaled add away."""
    return (candidate.method in LINEAR_IN_LAMBDA
            and candidate.overrides().get("lambda") is not None)


def line_key(candidate: Candidate) -> tuple:
    """The candidate's setting apart from lambda: one line f0 + lambda * D."""
    return candidate.method, tuple(kv for kv in candidate.values if kv[0] != "lambda")


def shifted_key(key: tuple) -> Optional[tuple]:
    """An AWD line's setting apart from keep_delta (lines that share it share D:
    ``Former._shift_line``); None for other methods."""
    method, values = key
    if method not in AWD_METHODS:
        return None
    return method, tuple(kv for kv in values if kv[0] != "keep_delta")


def zero_of(candidate: Candidate) -> Candidate:
    """A cheap candidate whose merge is ``candidate``'s at lambda 0: mergekit's
    task_arithmetic (base) for mergekit's methods; for AWD methods awd with the
    same alpha and keep_delta (base + keep_delta * delta where selected, base
    elsewhere; the sparsification of awd_ties is multiplied by lambda)."""
    if candidate.is_awd:
        return Candidate("awd", tuple((k, 0.0 if k == "lambda" else v)
                                      for k, v in candidate.values
                                      if k in _AWD_KNOBS))
    return Candidate("task_arithmetic", (("lambda", 0.0),))


_WIDE = (torch.float32, torch.float64)
_AWD_KNOBS = {p.name for p in params.TUNABLE if p in params.COMMON}  # awd's own


def _config_differences(loaded, written) -> str:
    """The config keys (dtype aside) on which the written model differs from the
    loaded base model, or ''."""
    ignore = {"torch_dtype", "dtype", "transformers_version", "_name_or_path",
              "architectures"}
    a, b = loaded.to_dict(), written.to_dict()
    keys = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])


def _is_method_task(task) -> bool:
    from mergekit.io.tasks import GatherTensors

    return isinstance(task.gather_tensors, GatherTensors)


def _global_scope(tasks) -> bool:
    return any(params.of_task(t, "scope") == "global" for t in tasks
               if t.method_name in AWD_METHODS)


def seed_of(options) -> int:
    """The seed randomized methods draw their masks with (--random-seed, else 0)."""
    return options.random_seed if options.random_seed is not None else 0


@contextlib.contextmanager
def _seeded(options):
    """Randomized methods (DARE) draw the same masks for every candidate, as
    ``mergekit-yaml --random-seed`` draws them (torch's generator, seeded once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(options))
        yield


def recipe_text(cfg, method: str, options) -> str:
    """``cfg`` as YAML; a randomized method's says which seed reproduces it."""
    text = cfg.to_yaml()
    if method in RANDOMIZED:
        seed = seed_of(options)
        text = (f"# {method} draws random masks: mergekit-yaml THIS_FILE OUT --random-seed "
                f"{seed}\n# writes the model mergekit-awd tune scored\n" + text)
    return text


@contextlib.contextmanager
def _quiet_kernel():
    """The kernel's once-per-merge warnings (the lambda hint) are noise per candidate."""
    logger = logging.getLogger("mergekit_awd")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model(path: str, device: str = "cpu", revision: Optional[str] = None,
               trust_remote_code: bool = False):
    """The model that scores, in float32 (the merge's revision and remote-code
    setting: a hub model is read as mergekit reads it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, revision=revision,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def swap_in(model, tensors: Dict[str, torch.Tensor]) -> None:
    """Put a candidate's merged tensors into the loaded model (as float32)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor.to(state[name].dtype))


def usable(row: Dict) -> bool:
    """A scored row whose every mean is a number (one that may be chosen or compared)."""
    return ("error" not in row and bool(row["mean"])
            and not any(math.isnan(v) for v in row["mean"].values()))


def setting_label(setting: Candidate) -> str:
    """A λ search's setting: the method and its values other than λ."""
    return line_key(setting)[0] + " " + " ".join(
        f"{k}={v:g}" if v is not None else f"{k}=recipe's"
        for k, v in setting.values if k != "lambda")


def choose(rows: Sequence[Dict], metric: str) -> int:
    """Index of the best row (``evaluate.rank``). A row that failed, or has a NaN
    among its scores, never wins; nor does the recipe as written (a reference the
    choice is compared with, not a candidate)."""
    scored = [i for i, r in enumerate(rows) if usable(r) and not r.get("as_written")
              and metric in r["mean"]]
    if not scored:
        raise RuntimeError("no candidate produced a score")
    return min(scored, key=lambda i: evaluate.rank(rows[i]["mean"], metric))


def costly(config, methods: Sequence[str], options) -> Dict[str, str]:
    """The default methods too slow to form at this model's size (COSTLY_DEFAULTS):
    method -> why."""
    count = sum(os.path.getsize(p) / (_stored_itemsize(p) or 2)
                for p in _weight_files(config.base_model))
    on_gpu = (options.device or "cpu") != "cpu"
    limits = {m: v * (100 if on_gpu else 1) for m, v in COSTLY_DEFAULTS.items()}
    return {m: (f"forming it takes hours at {count / 1e9:.1f}B parameters "
                f"{'on this device' if on_gpu else 'on CPU'} (a default tune runs it up to "
                f"{limits[m] / 1e9:g}B); name it in --methods to run it anyway")
            for m in methods if m in limits and count > limits[m]}


def check_methods(config, methods: Sequence[str], options, given: bool = True
                  ) -> Dict[str, str]:
    """Each method planned once on the recipe, before anything is read: one line for
    a method that cannot merge it (mergekit's own reason). Where the methods are
    tune's defaults (not ``given``), such a method other than the recipe's own is left
    out instead: method -> why."""
    left_out = {}
    for method in methods:
        try:
            mergekit_run.plan_tensor_tasks(candidate_config(config, Candidate(method)),
                                           options)
        except AWDParameterError:
            raise
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            why = f"{type(error).__name__}: {reason[:300]}"
            if not given and method != config.merge_method:
                left_out[method] = f"it cannot merge this recipe ({why})"
                continue
            raise AWDParameterError(
                f"--methods: {method} cannot merge this recipe ({why}); leave it out of "
                f"--methods")
    return left_out


# -- searching lambda -----------------------------------------------------------------

# where the search may go and when it stops (README, "Candidates")
LAMBDA_LOW, LAMBDA_HIGH = 1 / 64, 16.0
RESOLUTION = 0.05  # refine until both neighbours of the best lambda are within 5% of it
# evaluations per setting of a method's other knobs when --budget is not given: the
# coarse grid and one step (an extension at an edge, else one refinement). In the
# SmolLM2 benchmark a budget of 12 chose the same method in every seed, TIES at a
# test score 0.2 points lower on average and task arithmetic 1.4 higher
# (benchmarks/smollm2/budget.py); at 6 the default tune took 8 min 54 s there (25
# candidates, 400 prompts, 2 cores; docs/benchmarks.md).
PER_SETTING = 6


def search_lambda(score, coarse: Sequence[float], budget: int, low: float = LAMBDA_LOW,
                  high: float = LAMBDA_HIGH, resolution: float = RESOLUTION) -> list:
    """Search lambda for one setting of a method's other knobs; returns the path,
    (lambda, phase) in the order evaluated, at most ``budget`` long.

    ``score(lam)`` evaluates one candidate: a rank (lower is better,
    ``evaluate.rank``) or None when it failed (never best; a failed lambda is still
    an edge: the search does not step over it).

    - coarse: every value of ``coarse``;
    - extend: while the best is the largest lambda tried, double it (up to
      ``high``); while it is the smallest, halve it (down to ``low``);
    - refine: golden-section steps inside the best's neighbours (the larger gap is
      probed at 0.382 of its width from the best) until both gaps are within
      ``resolution`` of the best lambda.
    Ties between equal ranks go to the smaller lambda.
    """
    seen: Dict[float, Optional[tuple]] = {}
    path: list = []

    def at(lam: float, phase: str) -> bool:
        lam = float(f"{lam:.4g}")  # labels a person can read; equal points merge
        if lam in seen or len(path) >= budget:
            return False
        seen[lam] = score(lam)
        path.append((lam, phase))
        return True

    def best() -> Optional[float]:
        ok = [lam for lam, r in seen.items() if r is not None]
        return min(ok, key=lambda lam: (seen[lam], lam)) if ok else None

    for lam in coarse:
        at(float(lam), "coarse")
    while len(path) < budget:
        b, tried = best(), sorted(seen)
        if b is None:
            return path
        if b == tried[-1] and b < high:
            moved = at(min(2 * b, high), "extend")
        elif b == tried[0] and b > low:
            moved = at(max(b / 2, low), "extend")
        else:
            break
        if not moved:
            break
    while len(path) < budget:
        b, tried = best(), sorted(seen)
        i = tried.index(b)
        if i == 0 or i == len(tried) - 1:  # at a bound of the search
            break
        left, right = b - tried[i - 1], tried[i + 1] - b
        if max(left, right) <= resolution * b:
            break
        x = b + 0.382 * right if right >= left else b - 0.382 * left
        if not at(x, "refine"):
            break
    return path


def unfinished(ranks: Dict[float, Optional[tuple]], low: float = LAMBDA_LOW,
               high: float = LAMBDA_HIGH, resolution: float = RESOLUTION) -> Optional[str]:
    """Why a finished lambda search did not find its best lambda to ``resolution``
    (``ranks``: lambda -> rank, None where it failed), or None where it did: the best
    is the largest or the smallest lambda tried, or a neighbour of it is farther than
    ``resolution``."""
    ok = {lam: r for lam, r in ranks.items() if r is not None}
    if not ok:
        return None
    b = min(ok, key=lambda lam: (ok[lam], lam))
    tried = sorted(ranks)
    i = tried.index(b)
    for end, side, bound, way in ((len(tried) - 1, "largest", high, "above"),
                                  (0, "smallest", low, "below")):
        if i == end:
            limit = (f"; the search goes no further than {bound:g}"
                     if (b >= bound if way == "above" else b <= bound) else "")
            return (f"the best lambda is the {side} tried ({b:g}): the score may still "
                    f"improve {way} it{limit}")
    gap = max(b - tried[i - 1], tried[i + 1] - b)
    if gap > resolution * b:
        return (f"the best lambda ({b:g}) is known to {gap / b:.0%} only (its neighbours "
                f"tried: {tried[i - 1]:g} and {tried[i + 1]:g}), not to {resolution:.0%}")
    return None


def settings_budget(method: str, settings: int, coarse: int, budget: Optional[int]) -> int:
    """Evaluations each setting of ``method``'s other knobs may spend on lambda
    (``budget`` None: ``PER_SETTING``)."""
    if budget is None:
        return max(PER_SETTING, coarse)
    if settings * coarse > budget:
        raise AWDParameterError(
            f"--budget {budget} is too small for {method}: {settings} setting(s) of its "
            f"other knobs x the {coarse} coarse lambda values need {settings * coarse}; "
            f"raise --budget, give fewer values of its other knobs, or give --lambda for "
            f"an exact grid")
    return budget // settings


# -- how sure the choice is -----------------------------------------------------------


def compare(a: Dict[str, Dict], b: Dict[str, Dict], metric: str, z: float = 1.96,
            resamples: int = 2000, power_z: float = 0.8416, selected: bool = False) -> Dict:
    """``a`` against ``b`` (per-task scores with per-example values, the same examples)
    on ``metric``: the paired difference a - b (mean over tasks of each task's mean),
    its 95% bootstrap interval resampling examples within tasks, whether the
    interval excludes 0, and, from the paired variance, how many examples per task
    would make a test of that difference exclude 0 with 80% power: (z + power_z)^2
    var / D^2 (None where it already does, or where the two never differ).
    ``selected``: ``a`` was chosen on these same examples, so the interval is
    optimistic (the best of many equal candidates looks better than it is)."""
    import numpy as np

    each = f"{metric}_each"
    x = {t: a[t][each] for t in a}
    y = {t: b[t][each] for t in a}
    diff, low, high = evaluate.paired_interval(x, y, resamples=resamples)
    separated = low > 0 or high < 0
    need = None
    if not separated:
        d = [np.asarray(x[t], float) - np.asarray(y[t], float) for t in x]
        var = sum(float(v.var(ddof=1)) if len(v) > 1 else 0.0 for v in d) / len(d) ** 2
        if diff != 0 and var > 0:
            need = math.ceil((z + power_z) ** 2 * var / (diff * diff))
    return {"metric": metric, "difference": diff, "ci95": [low, high],
            "separated": separated, "examples_per_task_to_separate": need,
            "after_selection": selected}


def comparison_line(label: str, other: str, c: Dict) -> str:
    """One line a person reads: the difference, its interval, what it means."""
    low, high = c["ci95"]
    text = (f"{label} - {other}: {c['metric']} {c['difference']:+.4f} "
            f"[95% CI {low:+.4f}, {high:+.4f}]")
    if c.get("after_selection"):
        text += " (taken after choosing on these data: optimistic)"
    if c["separated"]:
        return text + ": the data separate the two"
    need = c["examples_per_task_to_separate"]
    return text + (": the data cannot separate the two"
                   + (f" (about {need} examples per task would, at 80% power)"
                      if need else " (they score the same on every example)"))
