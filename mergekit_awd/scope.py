"""Reading a scope's task vectors and solving it: one way, for every entry point.

A *Gram pass* feeds the kernel's own inputs to a ``Collected`` record instead
of merging them: under ``mergekit-yaml``/``run_merge`` it executes mergekit's own
planned tasks for the selected tensors (``ExecuteMergeMethodTask``: loading,
checkpoint-layout conversion, LoRA, ``dtype:`` casts, tokenizer permutation,
dtype promotion), so the solve sees exactly the tensors the kernel will merge.
Under mergekit's in-memory API the groups it hands over are the whole merge.

``MergeState`` owns what the kernels of one merge share: the global solve and
what the report needs. It lives as long as mergekit's task universe of that
merge (a weak key), and writes the report when the merge is over.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from mergekit_awd import params, running, solver
from mergekit_awd.merge_log import MergeLog
from mergekit_awd.params import (
    SOLVER_PARAMETERS,
    AWDInputError,
    AWDParameterError,
    Settings,
)
from mergekit_awd.selection import in_layers, layer_weight_names

LOG = logging.getLogger(__name__)


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

    @property
    def keep_taus(self) -> bool:
        """Adam runs in full space: it needs the task vectors themselves."""
        return self.settings is not None and self.settings.optimizer == "adam" and (
            self.settings.steps > 0)

    def add(self, name: str, model_ids: Tuple, settings: Settings, taus: torch.Tensor,
            G: np.ndarray):
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
        self.tensors.append(
            TensorRecord(name, G, taus[0].numel(), taus if self.keep_taus else None)
        )
        if self.keep_taus:
            needed = (len(model_ids) + 4) * self.numel * taus.element_size() / 2**30
            if needed > settings.adam_max_gb:
                raise AWDParameterError(
                    f"optimizer: adam with scope: global keeps all selected task "
                    f"vectors and Adam's state in memory: {needed:.1f} GB so far, "
                    f"over adam_max_gb={settings.adam_max_gb:g}. Use optimizer: sgd (exact "
                    f"Algorithm 1, no such memory), scope: tensor, or raise "
                    f"adam_max_gb."
                )

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def G(self) -> np.ndarray:
        return sum((t.G for t in self.tensors), np.zeros((len(self.models),) * 2))


def _names(models) -> str:
    return "[" + ", ".join(str(m) for m in models) + "]"


def _raise_inconsistent(name: str, first: Settings, now: Settings) -> None:
    diffs = [
        f"{p}={b!r} (other tensors: {a!r})"
        for p, a, b in zip(SOLVER_PARAMETERS, first.solver_key(), now.solver_key())
        if a != b
    ]
    raise AWDParameterError(
        f"awd with scope: global solves one delta for the whole model, so its "
        f"solver parameters must be the same for every tensor, but tensor {name} "
        f"resolves {', '.join(diffs)}. Remove the filter or gradient on these "
        f"parameters, or use scope: tensor for per-tensor values."
    )


# Set while a Gram pass runs in this thread/context: the kernel then records
# its inputs here instead of merging them.
COLLECTING: ContextVar[Optional[Collected]] = ContextVar("awd_collecting", default=None)

# The state of an in-memory merge (mergekit's merge_state_dicts / merge_tensors),
# set around mergekit's loop over its groups.
IN_MEMORY: ContextVar[Optional["MergeState"]] = ContextVar("awd_in_memory", default=None)

# A Gram pass already made over the same inputs in this process (by `mergekit-awd
# tune`), offered to the next merge started from this context: its global solve
# uses it instead of reading the inputs again when the models and the solver
# settings are the same (``MergeState.global_solution``).
KNOWN_GRAM: ContextVar[Optional[Collected]] = ContextVar("awd_known_gram", default=None)


def collect(run) -> Collected:
    """Run mergekit's execution of the kernel (``run()``) as a Gram pass: the kernel
    records each selected tensor's inputs instead of merging them."""
    collected = Collected()
    token = COLLECTING.set(collected)
    try:
        run()
    finally:
        COLLECTING.reset(token)
    return collected


def collect_tasks(method_name: str, tasks, math_device, storage_device,
                  quiet: bool) -> Collected:
    """A Gram pass over planned tasks: mergekit executes them, the kernel records.

    Only tasks whose tensor can be selected are run (by name first; the kernel
    decides with the loaded tensor). Each stored tensor is read once: mergekit's
    planner skips an optional tied weight (a tied lm_head) that no input stores.
    """
    from mergekit.graph import Executor
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    chosen = [
        task for task in tasks
        if isinstance(task, ExecuteMergeMethodTask) and task.method_name == method_name
        and _may_select(task.parameters["select"], task.output_weight, task.base_model)
    ]
    if not chosen:
        return Collected()
    executor = Executor(chosen, math_device=math_device, storage_device=storage_device)
    return collect(lambda: deque(executor.run(quiet=quiet, desc="awd Gram pass"), maxlen=0))


def plan_tensor_tasks(config, options) -> list:
    """The recipe's per-tensor tasks, planned by mergekit's own planner as
    ``mergekit-yaml`` plans them (nothing is read or written)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options)
    out_config = _model_out_config(config, arch_info, options.trust_remote_code)
    # plan_to_disk only plans (the writer is a task that is never run here);
    # mergekit 0.1.5's plan_in_memory cannot build its own return tasks
    planned = MergePlanner(config, arch_info, options, out_config).plan_to_disk("unused")
    return [t.tensor_task for t in planned if hasattr(t, "tensor_task")]


def _may_select(select: str, weight, base_model) -> bool:
    if select == "all":
        return True
    if select == "linear":
        return weight.vocabulary_axis is None and in_layers(
            weight.name, layer_weight_names(base_model)
        )
    return re.search(select, weight.name) is not None


def solve(G: np.ndarray, numel: int, s: Settings, taus: List[torch.Tensor]) -> solver.Solution:
    """Run the chosen optimizer in the chosen units on one scope's Gram matrix."""
    alpha_raw, lr = solver.raw_hyperparameters(
        s.alpha,
        s.lr,
        units=s.units,
        optimizer=s.optimizer,
        s=solver.scale_of(G),
        numel=numel,
    )
    if s.optimizer == "sgd":
        return solver.sgd_gram(G, alpha_raw, lr, s.steps)
    return solver.adam_full(taus, G, alpha_raw, lr, s.steps)


def disentangled(G, solution, taus) -> np.ndarray:
    """Inner products of the disentangled vectors, whichever optimizer ran."""
    if solution.w is not None:
        return solver.disentangled_inner(G, solution.w)
    return solver.full_inner(taus, solution.delta, G)


@dataclass
class GlobalSolution:
    """The solved delta of `scope: global`: coefficients (sgd) or tensors (adam)."""

    solution: solver.Solution
    names: set
    delta: Dict[str, torch.Tensor]

    def delta_for(self, name: str) -> Tuple[Optional[np.ndarray], Optional[torch.Tensor]]:
        if name not in self.names:
            raise AWDInputError(
                f"tensor {name} is selected for awd but was not read by the scope: "
                f"global Gram pass (an optional weight missing from some input?); "
                f"exclude it with a 'select' regular expression"
            )
        return self.solution.w, self.delta.get(name)


class MergeState:
    """What the kernels of one merge share: the global solve and the report."""

    def __init__(self, run: Optional[running.RunMerge] = None):
        self.run = run
        self.started = time.time()
        self.lock = threading.Lock()
        self.log = MergeLog()
        self.solved: Optional[GlobalSolution] = None
        self.error: Optional[BaseException] = None
        self.warned: set = set()
        self.known: Optional[Collected] = KNOWN_GRAM.get()
        # what the recipe sets explicitly (None: no recipe, e.g. the in-memory API)
        self.recipe_parameters = (params.names_in_recipe(run.config)
                                  if run is not None and run.config is not None else None)

    def warn_once_if(self, condition: bool, message: str) -> None:
        """Log ``message`` once per merge (the kernel runs once per tensor)."""
        if condition and message not in self.warned:
            self.warned.add(message)
            LOG.warning(message)

    def global_solution(self, solve_scope, settings: Optional[Settings] = None,
                        models: Tuple = ()) -> GlobalSolution:
        """Solve the global scope once (the first caller solves, the others wait).

        ``solve_scope()`` makes the Gram pass, unless a known one (``KNOWN_GRAM``)
        was read for these models with these solver settings."""
        with self.lock:
            if self.error is not None:
                raise AWDInputError(f"the scope: global solve failed earlier: {self.error}")
            if self.solved is None:
                known = self.known
                usable = (known is not None and settings is not None
                          and known.models == tuple(models) and known.settings is not None
                          and known.settings.solver_key() == settings.solver_key())
                try:
                    self.solved = self._solve(known if usable else solve_scope())
                except BaseException as error:
                    self.error = error
                    raise
            return self.solved

    def _solve(self, collected: Collected) -> GlobalSolution:
        if collected.settings is None:
            return GlobalSolution(solver.Solution(0, 0, 0, [0.0], w=None), set(), {})
        s = collected.settings
        taus = [t.taus for t in collected.tensors if t.taus is not None]
        G, numel = collected.G, collected.numel
        solution = solve(G, numel, s, taus)
        names = [t.name for t in collected.tensors]
        delta = dict(zip(names, solution.delta)) if solution.delta is not None else {}
        self.log.add(collected.models, s, names, G, disentangled(G, solution, taus),
                     solution, numel)
        LOG.info("awd (scope: global): %d parameters; %s", numel, self.log.summary_line())
        return GlobalSolution(solution, set(names), delta)

    def finish(self) -> List[str]:
        """Write the report (and the model-card section) of a merge that completed."""
        run = self.run
        if self.log.empty or run is None or not run.out_path:
            if not self.log.empty:
                LOG.info("awd: %s", self.log.summary_line())
            return []
        config = os.path.join(run.out_path, "config.json")
        if not os.path.exists(config) or os.path.getmtime(config) < self.started - 1:
            return []  # the merge failed or was interrupted: nothing to report on
        from mergekit_awd import report

        rep = self.log.report()
        paths = report.write(rep, run.out_path)
        card = os.path.join(run.out_path, "README.md")
        if os.path.exists(card) and os.path.getmtime(card) >= self.started - 1:
            with open(card, "a", encoding="utf-8") as f:
                f.write(report.card_section(rep))
        if not run.quiet:
            print(f"awd: {self.log.summary_line()}\nawd report: {paths[0]}", file=sys.stderr)
        return paths


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_of_running_merge() -> Tuple[Optional[MergeState], object]:
    """The state of the merge that mergekit is executing in this thread, and its executor."""
    executor = running.current_executor()
    if executor is None:
        return None, None
    universe = executor.universe
    with _STATES_LOCK:
        state = _STATES.get(universe)
        if state is None:
            run = running.run_merge(universe)
            state = MergeState(run)
            _STATES[universe] = state
            # run_merge's executor ends when run_merge returns (the universe itself
            # may wait for a garbage collection: networkx graphs hold cycles)
            owner = run.executor() if run is not None and run.executor else None
            weakref.finalize(owner if owner is not None else universe, _finish, state)
    return state, executor


def _finish(state: MergeState) -> None:
    try:
        state.finish()
    except Exception as error:  # never turn a finished merge into a failure
        print(f"mergekit-awd: could not write the awd report: {error}", file=sys.stderr)
