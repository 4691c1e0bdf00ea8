"""Coefficients learned per model and layer on data: AWD + AdaMerging (`tune --learn`).

A merge that is a weighted sum of task vectors (``awd`` under ``optimizer: sgd``,
mergekit's ``task_arithmetic``) is, for each tensor t in group g (one group for
``--learn model``; one per repeated layer plus one for everything else for
``--learn layer``),

    merged_t = base_t + anchor_t + sum_k gamma[k, g] * v_k,t

- ``awd``: v_k = tau_k - delta, the disentangled vectors, with delta from the
  recipe's own Gram pass and solve (alpha, scope, select, others honoured);
  anchor = keep_delta * delta on the selected tensors;
- ``task_arithmetic``: v_k = tau_k, anchor = 0 (AdaMerging without AWD).

The kernel itself says how each tensor depends on the per-model weights
(``RunContext.recording_maps``: (a, M) with merged = base + sum_j (a_j + sum_k
weight_k M[k, j]) tau_j), so the vectors here are the ones ``mergekit-yaml``
combines. gamma starts at the static candidate's lambda * weight and is fitted by
Adam on one of two objectives, with only gamma getting gradients (the merged
weights are a function of gamma, the frozen base and the K vectors):

- ``loss``: the mean completion negative log-likelihood (``evaluate.nll_each``);
- ``entropy``: AdaMerging's, the mean entropy of the merged model's next-token
  distributions over the answer it gives itself (``evaluate.entropy_each``; the
  answer is regenerated greedily with the current gamma at every step, and no
  gradient flows through that choice).

The result is a plain recipe (``learned_config``): lambda 1, no normalize, and each
model's ``weight`` as one value (``model``) or a list of mergekit filters, one per
layer, whose first match is that layer's tensors and nothing else (``layer``):
``mergekit-yaml`` merges it into the model that was scored.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from os.path import commonprefix
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergekit_awd import evaluate, scope, solver
from mergekit_awd.params import AWDParameterError

LEARNABLE = ("awd", "task_arithmetic")
KINDS = ("model", "layer")


def refuse_unlearnable(methods: Sequence[str], config=None) -> None:
    """One line, before anything is loaded, for a method whose merge is not a weighted
    sum of task vectors, by name or by the recipe's settings (the kernel's own check,
    ``AWDMerge.affine``, refuses the same per tensor)."""
    for method in methods:
        if method not in LEARNABLE:
            raise AWDParameterError(
                f"--learn: {method} is not a weighted sum of task vectors, so its "
                f"coefficients cannot be learned and written back as weights; --learn "
                f"works with {' and '.join(LEARNABLE)} (--methods {','.join(LEARNABLE)})")
    given = (config.parameters or {}) if config is not None else {}
    if "awd" in methods and given.get("optimizer") == "adam":
        raise AWDParameterError(
            "awd (the recipe's optimizer: adam): the merge is not a weighted sum of task "
            "vectors (optimizer: adam's delta is not in their span); learn with "
            "optimizer: sgd")


# peak RSS of a whole `tune --learn` over (inputs + memory_needed): SmolLM2-135M,
# K = 4, float32: 8.2 GiB measured against 7.0 estimated (activations, freed
# memory the allocator keeps)
ALLOCATOR = 1.2


def memory_needed(k: int, parameters: int) -> int:
    """Bytes a fit holds, in float32: the scoring model, base + anchor, the K
    vectors, the merged weights of a step and their gradients (K + 4 models);
    activations come on top."""
    return (k + 4) * parameters * 4


# -- groups ---------------------------------------------------------------------------


@dataclass
class Groups:
    """Which coefficient each tensor gets: ``of`` maps a tensor to its group; each
    group is selected in a recipe by its ``filters`` (mergekit's substring filters,
    first match wins; the last group, ``other``, by none: it takes the rest)."""

    kind: str
    labels: List[str]
    of: Dict[str, int]
    filters: List[List[str]]


def make_groups(names: Sequence[str], base_model, kind: str,
                trust_remote_code: Optional[bool] = None) -> Groups:
    """``model``: one group; ``layer``: one per repeated layer (mergekit's
    architecture definition of ``base_model``, else the numeric path component of
    the name), then one for every other tensor (embeddings, final norm, head)."""
    if kind == "model":
        return Groups(kind, ["model"], {n: 0 for n in names}, [[]])
    index = _layer_index(base_model, trust_remote_code)
    layer = {n: index.get(n) if index is not None else _layer_by_name(n) for n in names}
    keys = sorted({v for v in layer.values() if v is not None})
    modules = {m for m, _ in keys}
    labels = [f"layer {i}" if len(modules) == 1 else f"{m} {i}" for m, i in keys]
    of = {n: keys.index(layer[n]) if layer[n] is not None else len(keys) for n in names}
    filters = [_prefix([n for n in names if layer[n] == key], key[1]) for key in keys]
    if any(layer[n] is None for n in names):
        labels.append("other")
        filters.append([])
    groups = Groups(kind, labels, of, filters)
    while True:  # a prefix that also catches another group's tensor: full names there
        bad = _misrouted(names, groups)
        if bad is None:
            return groups
        name, hit = bad
        g = of[name] if hit is None or hit == len(keys) else hit
        full = sorted(n for n in names if of[n] == g)
        if g >= len(keys) or groups.filters[g] == full:
            raise AWDParameterError(
                f"--learn layer: tensor {name} cannot be given its own layer's weight by "
                f"mergekit's filters (a substring of its name selects another tensor); "
                f"use --learn model")
        groups.filters[g] = full


def _layer_index(base_model, trust_remote_code) -> Optional[Dict[str, tuple]]:
    """name (and aliases) -> (module, layer) from mergekit's architecture, or None."""
    from mergekit_awd.selection import _architecture

    arch = _architecture(base_model, trust_remote_code)
    if arch is None:
        return None
    index = {}
    for module_name in arch.info.modules:
        module = arch.get_module(module_name)
        for i in range(module.num_layers()):
            for weight in module.layer_weights(i):
                for name in (weight.name, *(weight.aliases or ())):
                    index[name] = (module_name, i)
    return index


_NUMBER = re.compile(r"(?:^|\.)(\d+)\.")


def _layer_by_name(name: str) -> Optional[tuple]:
    match = _NUMBER.search(name)
    return ("", int(match.group(1))) if match else None


def _prefix(names: List[str], i: int) -> List[str]:
    """The shortest filter naming layer ``i``: the names' common prefix up to the
    layer number and its dot (``model.layers.3.``); their full names if none."""
    common = commonprefix(names)
    ends = [m.end() for m in re.finditer(rf"(?:^|\.){i}\.", common)]
    return [common[:ends[-1]]] if ends else sorted(names)


def _misrouted(names, groups: Groups) -> Optional[tuple]:
    """(a tensor, the group its first matching filter gives it) where that is not
    its own group, if any (no match and no catch-all group: None)."""
    order = [(f, g) for g, fs in enumerate(groups.filters) for f in fs]
    default = len(groups.labels) - 1 if not groups.filters[-1] else None
    for name in names:
        hit = next((g for f, g in order if f in name), default)
        if hit != groups.of[name]:
            return name, hit
    return None


# -- the vectors --------------------------------------------------------------------


@dataclass
class Basis:
    """Each learnable tensor as base + anchor and its K vectors (compute dtype);
    every other planned tensor as the merge makes it (``fixed``)."""

    models: tuple
    base: Dict[str, torch.Tensor] = field(default_factory=dict)
    vectors: Dict[str, torch.Tensor] = field(default_factory=dict)
    fixed: Dict[str, torch.Tensor] = field(default_factory=dict)
    written: Dict[str, tuple] = field(default_factory=dict)  # (result dtype, saved dtype)

    def tensors(self, gamma: torch.Tensor, groups: Groups,
                as_written: bool = False) -> Dict[str, torch.Tensor]:
        """The merged tensors at ``gamma`` (differentiable in it); ``as_written``:
        rounded as mergekit rounds them (the method's result dtype, then the saved
        one)."""
        out = {}
        for name, base in self.base.items():
            c = gamma[:, groups.of[name]].to(base.dtype)
            merged = base + torch.tensordot(c, self.vectors[name], dims=1)
            if as_written:
                result, saved = self.written[name]
                merged = merged.to(result).to(saved or result)
            out[name] = merged
        return out

    def numel(self) -> int:
        return sum(b.numel() for b in self.base.values())


def build_basis(inputs, tasks, run, method: str, out_dtype: Optional[str],
                device="cpu") -> Basis:
    """The basis of the recipe ``tasks`` (planned at lambda 1, normalize false):
    the kernel records each tensor's (a, M) (``awd``); mergekit's task_arithmetic
    is base + sum_k weight_k tau_k there (M = I). ``inputs``: what mergekit hands the
    method (tune's ``Inputs``), consumed tensor by tensor."""
    from mergekit.common import dtype_from_name

    from mergekit_awd.tune import gather_key

    maps = {}
    active = run.active if run is not None else contextlib.nullcontext
    if method != "task_arithmetic":
        with run.active(), run.recording_maps() as recorded:
            for _ in inputs.execute(tasks):
                pass
        maps = recorded.maps
    basis = None
    for task in tasks:
        name = task.output_weight.name
        value = inputs.values.pop(gather_key(task.gather_tensors), None)
        if value is None:
            raise RuntimeError(f"learn: tensor {name} reads inputs already used")
        base = value.get(task.base_model)
        models = tuple(m for m in task.model_order if m != task.base_model)
        if basis is None:
            basis = Basis(models)
        amap = maps.get(name)
        if method == "task_arithmetic" and base is not None and base.is_floating_point() \
                and any(m in value for m in models):
            amap = (np.zeros(len(models)), np.eye(len(models)))
        if amap is None:
            with active():
                result = task.execute(tensors=value)
            if result is not None:
                basis.fixed[name] = result
            continue
        if models != basis.models or not all(m in value for m in models):
            raise AWDParameterError(
                f"--learn: tensor {name} is not merged from every input model "
                f"({', '.join(str(m) for m in models if m not in value) or 'other models'}); "
                f"coefficients per model need every model to hold every tensor")
        dtype = solver.compute_dtype(base)
        taus = solver.task_vectors(base, [value[m] for m in models], dtype)
        a, M = (torch.as_tensor(x, dtype=dtype) for x in amap)
        vectors = taus if torch.equal(M, torch.eye(len(models), dtype=dtype)) else \
            torch.tensordot(M, taus, dims=1)
        basis.base[name] = (base.to(dtype) + torch.tensordot(a, taus, dims=1)).to(device)
        basis.vectors[name] = vectors.to(device)
        saved = task.output_weight.force_dtype or out_dtype
        basis.written[name] = (base.dtype, dtype_from_name(saved) if saved else None)
    if basis is None or not basis.base:
        raise AWDParameterError("--learn: the recipe merges no tensor as a weighted sum "
                                "of task vectors")
    return basis


def start(tasks, models: tuple, groups: Groups) -> Tuple[np.ndarray, bool]:
    """gamma of a static candidate: per tensor lambda * weight_k (/ sum of weights
    under normalize), averaged over each group; and whether it varied inside one
    (a recipe with per-layer weights of its own)."""
    from mergekit_awd.combination import coefficient_scale

    total = np.zeros((len(models), len(groups.labels)))
    seen: Dict[int, list] = {}
    for task in tasks:
        g = groups.of.get(task.output_weight.name)
        if g is None:
            continue
        ks, s = scope.task_settings(task)
        c = coefficient_scale(s) * np.asarray(s.weights, dtype=np.float64)
        seen.setdefault(g, []).append(c)
    varied = False
    for g, values in seen.items():
        stack = np.stack(values)
        total[:, g] = stack.mean(0)
        varied |= bool(np.ptp(stack, axis=0).max() > 1e-12)
    return total, varied


# -- fitting ---------------------------------------------------------------------------


@dataclass
class Fit:
    """The coefficients kept (best held-out score), where, and the path there."""

    gamma: torch.Tensor
    step: int
    history: List[dict]
    interrupted: bool = False
    seconds: float = 0.0


class _Batches:
    """Fit examples round-robin over tasks, each task's in a shuffled order."""

    def __init__(self, tasks, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tasks = [t.examples for t in tasks]
        self.queues: List[list] = [[] for _ in tasks]
        self.turn = 0

    def _queue(self) -> list:
        """The shuffled order of the task whose turn it is (a new one when spent)."""
        i = self.turn % len(self.tasks)
        if not self.queues[i]:
            self.queues[i] = list(self.rng.permutation(len(self.tasks[i])))
        return self.queues[i]

    def _pop(self):
        example = self.tasks[self.turn % len(self.tasks)][self._queue().pop()]
        self.turn += 1
        return example

    def take(self, n: int) -> list:
        return [self._pop() for _ in range(n)]

    def take_tokens(self, budget: int) -> list:
        """Examples in the same order while their tokens stay within ``budget``
        (at least one)."""
        out: list = []
        used = 0
        while True:
            peeked = _tokens(self.tasks[self.turn % len(self.tasks)][self._queue()[-1]])
            if out and used + peeked > budget:
                return out  # the peeked example is left for the next step
            out.append(self._pop())
            used += peeked


def _tokens(example, answer_guess: int = 0) -> int:
    prompt, answer = example
    return len(prompt) + (len(answer) if answer is not None else answer_guess)


def fit(model, basis: Basis, groups: Groups, gamma0: np.ndarray, fit_tasks, held_tasks,
        measure: Callable, rank: Callable, *, objective: str = "loss", steps: int = 60,
        lr: float = 0.01, batch: int = 8, eval_every: int = 10, end_ids=(),
        max_new_tokens: int = 64, seed: int = 0, keep=None,
        say: Callable[[str], None] = lambda text: None) -> Fit:
    """Adam on gamma alone. ``measure(model, tasks)`` scores the swapped-in model on
    the held-out tasks (means), ``rank(means)`` orders scores (lower is better):
    evaluated at step 0 (the static start), every ``eval_every`` steps and at the
    end; the best evaluation's gamma is kept (ties keep the earlier). Ctrl-C stops
    and keeps the best so far. ``keep`` (keep.Keep): each step also takes keep
    examples of up to ``KEEP_SHARE`` of the step's task tokens (at least one) and
    adds ``keep.weight`` x their loss to the objective; each evaluation records the
    keep loss on the report part (not used to choose the step)."""
    from mergekit_awd.tune import swap_in

    started = time.perf_counter()
    device = next(model.parameters()).device
    model.requires_grad_(False)
    swap_in(model, basis.fixed)
    gamma = torch.tensor(gamma0, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([gamma], lr=lr)
    batches = _Batches(fit_tasks, seed)
    keeps = _Batches([keep.fit], seed + 1) if keep is not None and keep.weight else None
    history: List[dict] = []
    best = None
    interrupted = False

    def evaluate_at(step: int, fit_value: Optional[float]):
        nonlocal best
        swap_in(model, basis.tensors(gamma.detach(), groups, as_written=True))
        means = measure(model, held_tasks)
        history.append({"step": step, "fit": fit_value, "held_out": means,
                        "gamma": gamma.detach().cpu().tolist()})
        if keep is not None:
            history[-1]["keep_loss"] = keep.scores(model)["loss"]
        if best is None or rank(means) < rank(best[1]):
            best = (step, means, gamma.detach().clone())
        return means

    try:
        means = evaluate_at(0, None)
        say(f"step 0/{steps}: held-out " + _show(means) + _kept(history))
        for step in range(1, steps + 1):
            tick = time.perf_counter()
            examples = batches.take(batch)
            kept = None
            if keeps:
                budget = KEEP_SHARE * sum(_tokens(e, max_new_tokens) for e in examples)
                kept = (keeps.take_tokens(int(budget)), keep.weight)
            value = _step(model, basis, groups, gamma, optimizer, examples, objective,
                          end_ids, max_new_tokens, kept)
            line = f"step {step}/{steps}: fit {objective}" + (
                f" + {keep.weight:g} x keep" if kept else "") + f" {value:.4f}"
            if step % eval_every == 0 or step == steps:
                line += ", held-out " + _show(evaluate_at(step, value)) + _kept(history)
            say(f"{line} ({time.perf_counter() - tick:.1f} s)")
    except KeyboardInterrupt:
        interrupted = True
        say(f"interrupted: keeping the best held-out coefficients so far "
            f"(step {best[0] if best else 0})")
        if best is None:
            raise
    step, _, kept = best
    return Fit(kept.cpu(), step, history, interrupted, time.perf_counter() - started)


# keep tokens per step, as a share of the step's task tokens: a step's cost grows
# with its tokens, and half as many keep rows as task rows (general answers are
# longer than task answers) made the fit 1.8x slower a step on SmolLM2
# (docs/design.md, 4d)
KEEP_SHARE = 0.4


def _kept(history: List[dict]) -> str:
    value = history[-1].get("keep_loss")
    return "" if value is None else f", keep loss {value:.4f}"


def _step(model, basis, groups, gamma, optimizer, examples, objective, end_ids,
          max_new_tokens, kept=None) -> float:
    """One Adam step on the objective of ``examples`` (plus, with ``kept`` =
    (keep examples, weight), weight x their completion loss); its value."""
    from mergekit_awd.tune import swap_in

    params = basis.tensors(gamma, groups)
    if objective == "entropy":  # the answers the merged model gives now
        swap_in(model, {n: t.detach() for n, t in params.items()})
        prompts = [p for p, _ in examples]
        answers = evaluate.greedy_answers(model, prompts, end_ids, max_new_tokens)
        examples = list(zip(prompts, answers))
    value = _objective(model, params, examples, objective)
    if kept is not None:
        value = value + kept[1] * _objective(model, params, kept[0], "loss")
    optimizer.zero_grad()
    value.backward()
    optimizer.step()
    return value.item()


def _objective(model, params, examples, objective: str) -> torch.Tensor:
    """The mean objective of ``examples`` through the model with ``params`` in place
    of its weights (differentiable in them)."""
    ids, mask = evaluate.rows_of(examples, next(iter(params.values())).device)
    logits = torch.func.functional_call(model, params, (ids,),
                                        {"attention_mask": mask}).logits
    each = (evaluate.entropy_each if objective == "entropy" else evaluate.nll_each)(
        logits, examples)
    return each.mean()


def _show(means: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in means.items())


def gradient(model, basis: Basis, groups: Groups, gamma: torch.Tensor, examples,
             objective: str = "loss") -> Tuple[float, torch.Tensor]:
    """(objective, d objective / d gamma) at ``gamma`` on fixed answers (tests)."""
    gamma = gamma.detach().clone().requires_grad_(True)
    value = _objective(model, basis.tensors(gamma, groups), examples, objective)
    value.backward()
    return value.item(), gamma.grad


# -- one learned merge, end to end ---------------------------------------------------


@dataclass
class Learned:
    """A method's learned merge: its recipe, the tensors that recipe makes (as
    mergekit writes them: what was scored), and what the fit did."""

    method: str
    kind: str
    static: object  # the tune.Candidate it started from
    config: object  # the learned recipe (MergeConfiguration)
    tensors: Dict[str, torch.Tensor]
    groups: Groups
    models: tuple
    fit: Fit
    summary: dict

    @property
    def label(self) -> str:
        return f"{self.method} learned per {self.kind} (from {self.static.label})"

    def write(self, out_dir: str, name: Optional[str] = None) -> None:
        """``NAME.yml`` (the recipe) and ``NAME.svg`` (the coefficients)."""
        name = name or f"learned-{self.method}"
        with open(os.path.join(out_dir, f"{name}.yml"), "w", encoding="utf-8") as f:
            f.write(self.config.to_yaml())
        gamma = np.asarray(self.summary["gamma"])
        with open(os.path.join(out_dir, f"{name}.svg"), "w", encoding="utf-8") as f:
            f.write(coefficients_svg(gamma, self.summary["models"], self.groups.labels,
                                     f"{self.method}: learned coefficients per model and "
                                     f"{self.kind} (lambda x weight)"))

    def line(self) -> str:
        s = self.summary
        show = lambda means: ", ".join(f"{k} {v:.4f}" for k, v in means.items())  # noqa
        keep = ""
        if s.get("keep"):
            keep = f"; keep loss {s['keep']['loss']:.4f}" + (
                f" (static start {s['static_keep_loss']:.4f})"
                if "static_keep_loss" in s else "")
        return (f"{self.label}: kept step {s['step_kept']} of {s['steps']}; fit {show(s['fit'])}"
                f"; held-out {show(s['held_out'])} (static start {show(s['static_held_out'])})"
                f"{keep}; {s['seconds']:.0f} s, peak {s['peak_rss_gib']:.1f} GiB")


@dataclass
class Setup:
    """What a fit starts from: the static candidate's recipe, the models (in the
    recipe's order), the basis, the groups and gamma at the static candidate."""

    method: str
    static_cfg: object
    models: tuple
    basis: Basis
    groups: Groups
    gamma0: np.ndarray
    varied: bool

    def tensors(self, gamma: np.ndarray) -> Dict[str, torch.Tensor]:
        """Every planned tensor of the learned recipe at ``gamma``, as mergekit
        writes it."""
        out = dict(self.basis.fixed)
        device = next(iter(self.basis.base.values())).device
        at = torch.as_tensor(np.asarray(gamma), dtype=torch.float32, device=device)
        out.update({n: t.detach() for n, t in self.basis.tensors(
            at, self.groups, as_written=True).items()})
        return out

    def config(self, gamma: np.ndarray):
        """The learned recipe at ``gamma``."""
        return learned_config(self.static_cfg, self.method, self.models, np.asarray(gamma),
                              self.groups)


def prepare(former, static, kind: str, options, device="cpu") -> Setup:
    """Plan ``static`` (a tune Candidate) and its unit recipe (lambda 1, weights 1,
    no normalize), and build the basis from the former's inputs (consumed)."""
    from mergekit_awd import mergekit_run, tune

    method = static.method
    static_cfg = tune.candidate_config(former.config, static)
    static_tasks = mergekit_run.plan_tensor_tasks(static_cfg, options)
    ours = [t for t in static_tasks if getattr(t, "method_name", None) == method]
    models = tuple(m for m in ours[0].model_order if m != ours[0].base_model)
    unit = learned_config(static_cfg, method, models, np.ones((len(models), 1)),
                          Groups("model", ["model"], {}, [[]]))
    unit_tasks = mergekit_run.plan_tensor_tasks(unit, options)
    run = former.run_for(static) if method != "task_arithmetic" else None
    try:
        basis = build_basis(former.read_inputs(), unit_tasks, run, method, unit.out_dtype,
                            device)
    finally:
        former.inputs = None  # consumed tensor by tensor: read again when needed
    groups = make_groups(list(basis.base), ours[0].base_model, kind,
                         getattr(options, "trust_remote_code", None))
    gamma0, varied = start([t for t in static_tasks if t.output_weight.name in basis.base],
                           models, groups)
    return Setup(method, static_cfg, models, basis, groups, gamma0, varied)


def learn(former, model, static, learning, fit_tasks, held_tasks, scorer, options,
          keep=None, say: Callable[[str], None] = lambda text: None) -> Learned:
    """Learn ``static``'s method's coefficients from ``static`` (a tune Candidate)."""
    import resource

    from mergekit_awd import tune

    started = time.perf_counter()
    device = next(model.parameters()).device
    setup = prepare(former, static, learning.kind, options, device)
    basis, groups, models = setup.basis, setup.groups, setup.models
    if setup.varied:
        say("the recipe's weights vary inside a group: the fit starts from their mean")
    say(f"{len(groups.labels)} group(s) x {len(models)} models from {static.label}; "
        f"{basis.numel():,} parameters, {learning.steps} steps")
    result = fit(model, basis, groups, setup.gamma0, fit_tasks, held_tasks, scorer.measure,
                 scorer.rank, objective=learning.objective, steps=learning.steps,
                 lr=learning.lr, batch=learning.batch, eval_every=learning.eval_every,
                 end_ids=scorer.end_ids, max_new_tokens=scorer.max_new_tokens,
                 seed=options.random_seed or 0, keep=keep, say=say)
    # the recipe (6 significant digits), formed as mergekit-yaml forms it: what is
    # scored from here on (the basis served the fit; in a recipe computed in 16 bits
    # mergekit's own arithmetic differs from it in the last bits)
    gamma = np.array([[float(f"{v:.6g}") for v in row] for row in result.gamma.tolist()])
    config = setup.config(gamma)
    del basis, setup.basis
    tensors = former.form(static, config)
    tune.swap_in(model, tensors)
    held_scores = scorer.scores(model, held_tasks)
    summary = {
        "method": static.method, "kind": learning.kind, "from": static.label,
        "objective": learning.objective, "models": [str(m) for m in models],
        "groups": groups.labels, "gamma_start": setup.gamma0.tolist(),
        "gamma": gamma.tolist(), "steps": learning.steps, "step_kept": result.step,
        "lr": learning.lr, "batch": learning.batch, "history": result.history,
        "fit": scorer.measure(model, fit_tasks), "held_out": scorer.means(held_scores),
        "interrupted": result.interrupted,
        "keep": keep.scores(model) if keep is not None else None,
        "keep_weight": keep.weight if keep is not None else None,
        "fit_seconds": result.seconds, "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    return Learned(static.method, learning.kind, static, config, tensors, groups, models,
                   result, summary)


# -- what tune asks for ------------------------------------------------------------------


@dataclass
class Learning:
    """What --learn was asked for."""

    kind: str
    objective: Optional[str]
    holdout: float
    steps: int
    lr: float
    batch: int
    eval_every: int
    decide: float = 0.25  # of each --data task, set aside for learned vs static

    def check(self) -> None:
        for name, value, ok, allowed in (
                ("--holdout", self.holdout, 0 < self.holdout < 1, "in (0, 1)"),
                ("--decide", self.decide, 0 < self.decide < 1, "in (0, 1)"),
                ("--learn-steps", self.steps, self.steps >= 0, ">= 0"),
                ("--learn-lr", self.lr, self.lr > 0, "> 0"),
                ("--learn-batch", self.batch, self.batch >= 1, ">= 1"),
                ("--eval-every", self.eval_every, self.eval_every >= 1, ">= 1")):
            if not ok:
                raise AWDParameterError(f"{name} must be {allowed}; got {value}")


def starts(rows, candidates, scorer):
    """(method, its best static candidate) for each learnable method that has one:
    where each learned merge starts."""
    for method in dict.fromkeys(c.method for c in candidates if c.method in LEARNABLE):
        mine = [i for i, r in enumerate(rows) if r["method"] == method
                and not r.get("as_written") and "error" not in r]
        if mine:
            yield method, candidates[min(mine, key=lambda i: scorer.rank(rows[i]["mean"]))]


def top(learned, scorer) -> Optional[int]:
    """The learned merge that goes to the decision (its index), or None: the best on
    the step part (examples its fit did not use) among those whose fit moved (kept a
    step > 0; at step 0 the learned merge is its static start)."""
    moved = [i for i, e in enumerate(learned) if e.fit.step > 0]
    return min(moved, key=lambda i: scorer.rank(learned[i].summary["held_out"])) if moved \
        else None


def verdict(learned_scores: Dict, static_scores: Dict, metric: str,
            keeps: Optional[Tuple[dict, dict]] = None) -> dict:
    """learned - static on the same examples (none of which chose either), and whether
    the learned merge replaces the static one: only where the 95% interval of the
    difference excludes 0 on the better side (higher exact, lower loss or entropy)
    and, with ``keeps`` (the two keep losses, keep.Keep.scores, on the keep examples
    the fit did not see), where its keep loss is not separated as worse."""
    from mergekit_awd import tune

    c = tune.compare(learned_scores, static_scores, metric)
    low, high = c["ci95"]
    better = bool(low > 0 if metric == "exact" else high < 0)
    out = {**c, "adopted": better}
    if not better:
        out["why_not"] = "its gain is not separated from 0"
    if keeps is not None:
        out["keep"] = tune.compare({"keep": keeps[0]}, {"keep": keeps[1]}, "loss")
        if out["keep"]["ci95"][0] > 0:
            out["adopted"] = False
            out["why_not"] = "it forgets: its keep loss is separated as worse"
    return out


# -- the recipe and the picture -------------------------------------------------------


def learned_config(config, method: str, models: tuple, gamma: np.ndarray, groups: Groups):
    """``config`` (the static candidate's recipe) with lambda 1, normalize false and
    each model's weight the learned coefficients: one value, or one filter per layer
    then the rest."""
    import yaml
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration

    data = yaml.safe_load(config.to_yaml())
    data["merge_method"] = method
    if data.get("slices") or data.get("modules") or not data.get("models"):
        raise AWDParameterError("--learn writes per-model weights into a 'models:' recipe; "
                                "this recipe has slices/modules")
    top = {k: v for k, v in (data.get("parameters") or {}).items()
           if k not in ("weight", "lambda", "normalize")}
    top["lambda"] = 1.0
    top["normalize"] = False
    data["parameters"] = top
    index = {m: k for k, m in enumerate(models)}
    for entry in data["models"]:
        k = index.get(ModelReference.model_validate(entry["model"]))
        block = {n: v for n, v in (entry.get("parameters") or {}).items() if n != "weight"}
        if k is not None:
            block["weight"] = _weight(gamma[k], groups)
        entry["parameters"] = block
    return MergeConfiguration.model_validate(data)


def _weight(row: np.ndarray, groups: Groups):
    if len(groups.labels) == 1:
        return float(row[0])
    out = [{"filter": f, "value": float(row[g])}
           for g, fs in enumerate(groups.filters) for f in fs]
    if not groups.filters[-1]:
        out.append({"value": float(row[-1])})
    return out


def coefficients_svg(gamma: np.ndarray, models: Sequence[str], labels: Sequence[str],
                     title: str) -> str:
    """The learned coefficients as a model x group heatmap (values in each cell's
    tooltip; in the cell too when there are few groups)."""
    from mergekit_awd.report import _color, _text

    K, G = gamma.shape
    cell = 44 if G <= 8 else 18
    names = [os.path.basename(str(m).rstrip("/")) or str(m) for m in models]
    names = [n if len(n) <= 22 else n[:21] + "…" for n in names]
    left, top = 40 + 6 * max(map(len, names)), 40
    width = left + G * cell + 120
    height = top + K * cell + 20 + 6 * max(map(len, labels))
    span = float(np.abs(gamma).max()) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             _text(left + G * cell / 2, 20, title, size=12)]
    for k in range(K):
        parts.append(_text(left - 6, top + k * cell + cell / 2 + 4, names[k], size=10,
                           anchor="end"))
        for g in range(G):
            v = float(gamma[k, g])
            x, y = left + g * cell, top + k * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="{_color(v / span)}" stroke="#fff"><title>{names[k]}, '
                         f'{labels[g]}: {v:.4f}</title></rect>')
            if cell >= 44:
                parts.append(_text(x + cell / 2, y + cell / 2 + 4, f"{v:.2f}", size=10,
                                   color="#fff" if abs(v) > 0.6 * span else "#000"))
    for g, label in enumerate(labels):
        x, y = left + g * cell + cell / 2, top + K * cell + 8
        short = label.replace("layer ", "") if cell < 44 else label
        parts.append(_text(x, y, short, size=9, anchor="end", rotate=-60))
    parts.append(_text(left + G * cell + 10, top + 12, f"red +{span:.3g}", size=10,
                       anchor="start"))
    parts.append(_text(left + G * cell + 10, top + 28, f"blue -{span:.3g}", size=10,
                       anchor="start"))
    parts.append("</svg>")
    return "\n".join(parts)
