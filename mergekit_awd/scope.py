"""Reading a scope's task vectors and solving it: one way, for every entry point.

A *Gram pass* feeds the kernel's own inputs to a ``Collected`` record instead
of merging them: it executes mergekit's own planned tasks for the selected
tensors (``ExecuteMergeMethodTask``: loading, checkpoint-layout conversion,
LoRA, ``dtype:`` casts, tokenizer permutation, dtype promotion), so the solve
sees exactly the tensors the kernel will merge. Under mergekit's in-memory API
the groups it hands over are the whole merge. ``solve`` runs the chosen
optimizer on one scope. What a merge shares (its Gram pass, its solves) is
owned by its ``context.RunContext``.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

from mergekit_awd import gram_cache, params, solver
from mergekit_awd.params import AWDInputError, AWDParameterError, Settings
from mergekit_awd.selection import in_layers, layer_weight_names

AWD_METHODS = ("awd", "awd_ties", "awd_dare_ties",
               *(f"awd_{rule}" for rule in params.RULE_KNOBS))



@dataclass
class TensorRecord:
    """One selected tensor as the kernel sees it: its Gram matrix and size."""

    name: str
    G: np.ndarray
    numel: int
    taus: Optional[torch.Tensor] = None  # kept for adam only


@dataclass
class Collected:
    """What a Gram pass read: the selected tensors, in order, and their settings."""

    models: Tuple = ()
    settings: Optional[Settings] = None
    tensors: List[TensorRecord] = field(default_factory=list)

    @staticmethod
    def keeps_taus(settings: Settings) -> bool:
        """Adam runs in full space: it needs the task vectors themselves."""
        return settings.optimizer == "adam" and settings.steps > 0

    def add(self, name: str, model_ids: Tuple, settings: Settings, numel: int,
            G: np.ndarray, taus: Optional[torch.Tensor] = None):
        """One selected tensor (``taus``: its task vectors, for adam only)."""
        self.check(name, model_ids, settings)
        keep = self.keeps_taus(self.settings)
        self.tensors.append(TensorRecord(name, G, numel, taus if keep else None))
        if keep:  # where the sizes could not be read before the pass
            check_adam_memory(settings.adam_max_gb, len(model_ids), self.numel,
                              taus.element_size(), so_far=True)

    def check(self, name: str, model_ids: Tuple, settings: Settings) -> None:
        """One set of fine-tunes and one solver setting for the whole scope."""
        if self.settings is None:
            self.models, self.settings = model_ids, settings
        elif model_ids != self.models:
            raise AWDInputError(
                f"awd with scope: global solves one delta over the fine-tunes "
                f"{_names(self.models)}, but tensor {name} merges "
                f"{_names(model_ids)} (a slices:/modules: recipe with other models?). "
                f"Use scope: tensor for such recipes."
            )
        elif settings.solver_key() != self.settings.solver_key():
            _raise_inconsistent(name, self.settings, settings)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def G(self) -> np.ndarray:
        return sum((t.G for t in self.tensors), np.zeros((len(self.models),) * 2))


@dataclass
class AffineMaps:
    """How each tensor a merge makes depends on the per-model weights, where it is
    a weighted sum of task vectors: name -> (a, M), K and K x K, with

        merged = base + sum_j (a_j + sum_k weight_k M[k, j]) tau_j

    recorded by the kernel instead of merging (``RunContext.recording_maps``), for
    coefficients learned per model and layer (``learn.py``)."""

    maps: dict = field(default_factory=dict)


def _names(models) -> str:
    return "[" + ", ".join(str(m) for m in models) + "]"


def _raise_inconsistent(name: str, first: Settings, now: Settings) -> None:
    diffs = [f"{p}={b!r} (other tensors: {a!r})"
             for p, b, a in now.solver_differences(first)]
    raise AWDParameterError(
        f"awd with scope: global solves one delta for the whole model, so its "
        f"solver parameters must be the same for every tensor, but tensor {name} "
        f"resolves {', '.join(diffs)}. Remove the filter or gradient on these "
        f"parameters, or use scope: tensor for per-tensor values."
    )


def check_adam_memory(limit_gb: float, k: int, numel: int, itemsize: int = 4,
                      so_far: bool = False) -> None:
    """optimizer: adam under scope: global holds the K task vectors of every selected
    tensor and Adam's delta, gradient and two moments (K + 4 vectors of the selected
    size): refuse it, with the memory it needs and what to use, over adam_max_gb."""
    needed = (k + 4) * numel * itemsize / 2**30
    if needed <= limit_gb:
        return
    amount = f"{needed:.3g} GB so far" if so_far else f"{needed:.3g} GB"
    raise AWDParameterError(
        f"optimizer: adam with scope: global keeps all selected task vectors and "
        f"Adam's state in memory: {k} task vectors + 4 of {numel:,} parameters = "
        f"{amount}, over adam_max_gb={limit_gb:g}. Use optimizer: sgd (exact "
        f"Algorithm 1 in the K x K Gram space: no such memory, the paper's solver), "
        f"scope: tensor (adam one tensor at a time), or raise adam_max_gb."
    )


def _adam_precheck(tasks) -> None:
    """Refuse an adam global solve that would not fit before reading anything: the
    selected sizes come from the base model's safetensors headers (unknown for other
    formats: then ``Collected.add`` refuses it while reading)."""
    adam = [t for t in tasks if params.of_task(t, "optimizer") == "adam"
            and params.of_task(t, "scope") == "global" and params.of_task(t, "steps") > 0]
    if not adam:
        return
    from mergekit.io.tasks import LoaderCache
    from safetensors import safe_open

    numel, itemsize, headers = 0, 4, {}
    for task in adam:
        index = LoaderCache().get(task.base_model).index
        path = index.tensor_paths.get(task.output_weight.name)
        if path is None or not index.is_safetensors:
            return
        path = os.path.join(index.base_path, path)
        if path not in headers:
            headers[path] = safe_open(path, "pt")
        part = headers[path].get_slice(task.output_weight.name)
        shape = part.get_shape()
        select = params.of_task(task, "select")
        if select == "linear" and len(shape) < 2:
            continue
        numel += math.prod(shape)
        itemsize = 8 if part.get_dtype() == "F64" else itemsize
    first = adam[0]
    k = len([m for m in first.model_order if m != first.base_model])
    check_adam_memory(params.of_task(first, "adam_max_gb"), k, numel, itemsize)


def collect(context, run) -> Collected:
    """Run mergekit's execution of the kernel (``run()``) as a Gram pass of the merge
    ``context``: the kernel records each selected tensor's inputs instead of merging
    them."""
    with context.recording_pass() as collected:
        run()
    return collected


def collect_tasks(context, method_name: str, tasks, math_device,
                  storage_device) -> Collected:
    """A Gram pass over planned tasks: mergekit executes them, the kernel records.

    Only tasks whose tensor can be selected are run (by name first; the kernel
    decides with the loaded tensor). Each stored tensor is read once: mergekit's
    planner skips an optional tied weight (a tied lm_head) that no input stores.
    """
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    chosen = [
        task for task in tasks
        if isinstance(task, ExecuteMergeMethodTask) and task.method_name == method_name
        and _may_select(params.of_task(task, "select"), task.output_weight, task.base_model,
                        getattr(context.options, "trust_remote_code", None))
    ]
    if not chosen:
        return Collected()
    _adam_precheck(chosen)
    adam = any(params.of_task(t, "optimizer") == "adam" for t in chosen)
    k = None if adam else gram_cache.key(chosen)
    kept = gram_cache.load(k) if k else None
    if kept is not None:
        return _from_kept(chosen, kept)
    collected = collect(context, lambda: _gram_pass(chosen, math_device, storage_device,
                                                     context.quiet))
    if k and collected.tensors:
        gram_cache.save(k, [t.name for t in collected.tensors],
                        np.stack([t.G for t in collected.tensors]),
                        [t.numel for t in collected.tensors])
    return collected


def _gram_pass(tasks, math_device, storage_device, quiet: bool) -> None:
    """Execute ``tasks`` for the kernel to record, in the reverse of the order
    mergekit's planner gives them (the order the merge then reads them in): the
    page cache still holds what the merge reads first (2.6B model, inputs larger
    than memory: the merge after it reads 6.4 GiB again instead of 20.6)."""
    import tqdm
    from mergekit.graph import Executor

    planned = Executor(tasks, math_device=math_device, storage_device=storage_device)
    targets = set(planned.targets)
    order = [h.task() for h in planned.schedule.tasks if h in targets][::-1]
    for task in tqdm.tqdm(order, disable=quiet, desc="awd Gram pass"):
        deque(Executor([task], math_device=math_device,
                       storage_device=storage_device).run(quiet=True), maxlen=0)


def _from_kept(tasks, kept: dict) -> Collected:
    """A kept Gram pass as the record the kernel would have made, after the checks the
    kernel makes while recording (one set of fine-tunes, one solver setting)."""
    by_name = {t.output_weight.name: t for t in tasks}
    collected = Collected()
    for name, G, numel in zip(kept["names"], kept["G"], kept["numel"]):
        models, s = task_settings(by_name[name])
        collected.check(name, models, s)
        collected.tensors.append(TensorRecord(name, G, int(numel)))
    return collected


def task_settings(task) -> Tuple[Tuple, Settings]:
    """(the fine-tunes, ``Settings``) of a planned task, as the kernel resolves them
    (mergekit's own methods: their declared parameters, with mergekit's defaults)."""
    from mergekit import merge_methods

    models = tuple(m for m in task.model_order if m != task.base_model)
    p = dict(task.parameters.items())
    for d in params.DECLARED:
        if d.per_model and models and d.name in task.input_parameters[models[0]]:
            p[d.name] = {m: task.input_parameters[m][d.name] for m in models}
    return models, Settings.of(p, models, getattr(merge_methods.get(task.method_name),
                                                  "defaults", None))


def _may_select(select: str, weight, base_model, trust_remote_code=None) -> bool:
    if select == "all":
        return True
    if select == "linear":
        return weight.vocabulary_axis is None and in_layers(
            weight.name, layer_weight_names(base_model, trust_remote_code)
        )
    return re.search(select, weight.name) is not None


def solve(G: np.ndarray, numel: int, s: Settings, taus: List[torch.Tensor]):
    """Run the chosen optimizer in the chosen units on one scope's Gram matrix:
    (the solution, the inner products of its disentangled vectors)."""
    alpha_raw, lr = solver.raw_hyperparameters(
        s.alpha,
        s.lr,
        units=s.units,
        optimizer=s.optimizer,
        s=solver.scale_of(G),
        numel=numel,
    )
    if s.optimizer == "sgd":
        solution = solver.sgd_gram(G, alpha_raw, lr, s.steps)
        return solution, solver.disentangled_inner(G, solution.w)
    solution = solver.adam_full(taus, G, alpha_raw, lr, s.steps)
    return solution, solver.full_inner(taus, solution.delta, G)
