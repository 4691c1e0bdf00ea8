"""One running merge, one owner: ``RunContext``.

Everything the kernels of one merge share lives in its ``RunContext``: the
scope-global solve, the log of every solve (its report), the warnings already
given, the Gram pass being recorded, and where the report goes. Each entry
point makes one, in one place:

- ``mergekit-awd merge / report / sweep / tune`` (``for_recipe``) and
  mergekit's in-memory API (``AWDMerge.__call__``) make it explicitly, make it
  current (``active``) for the merge, and write the report themselves when the
  merge has returned (``finish``: the JSON, the pictures and the model card's
  section);
- plain ``mergekit-yaml``, where mergekit passes a method nothing, gets one
  made the first time a kernel of that merge runs (``current``), from what
  ``mergekit_run`` reads of mergekit's objects; it writes its report when the
  kernel has merged the last planned tensor of the merge (mergekit writes its
  model card after that, so that path gets no card section).

A merge that fails writes no report: ``finish`` is only reached after the last
tensor (or the entry point's ``run_merge``) returned.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from mergekit_awd import guards, mergekit_run, scope
from mergekit_awd.merge_log import MergeLog
from mergekit_awd.params import AWDInputError, Settings

LOG = logging.getLogger(__name__)


@dataclass
class GlobalSolution:
    """The solved delta of `scope: global`: coefficients (sgd) or tensors (adam)."""

    w: Optional[np.ndarray]
    names: frozenset
    delta: Dict[str, torch.Tensor]

    def delta_for(self, name: str) -> Tuple[Optional[np.ndarray], Optional[torch.Tensor]]:
        if name not in self.names:
            raise AWDInputError(
                f"tensor {name} is selected for awd but was not read by the scope: "
                f"global Gram pass (an optional weight missing from some input?); "
                f"exclude it with a 'select' regular expression"
            )
        return self.w, self.delta.get(name)


class RunContext:
    """The state of one merge (see the module's docstring)."""

    def __init__(self, *, config=None, options=None, out_path: Optional[str] = None,
                 gram_pass: Optional[Callable[[], scope.Collected]] = None,
                 known: Optional[scope.Collected] = None, planned: int = 0,
                 quiet: Optional[bool] = None):
        self.config, self.options, self.out_path = config, options, out_path
        self.quiet = bool(getattr(options, "quiet", False)) if quiet is None else quiet
        self.gram_pass = gram_pass  # reads the scope: global inputs (a Gram pass)
        self.known = known  # a Gram pass already made over the same inputs (tune)
        self.planned = planned  # > 0: report when this many tensors are merged
        self._merged = itertools.count(1)  # next() is atomic: no lock for counting
        self.lock = threading.RLock()  # the global solve records through solve()
        self.log = MergeLog()
        self.solved: Optional[GlobalSolution] = None
        self.error: Optional[BaseException] = None
        self.warned: set = set()
        # thread -> what the kernel records instead of merging there: a Gram pass
        # (scope.Collected) or the affine maps of a learned merge (scope.AffineMaps)
        self.recording: Dict[int, object] = {}

    # -- being current -----------------------------------------------------------

    @contextlib.contextmanager
    def active(self):
        """Current in this context (and, for ``--multi-gpu`` worker threads, for the
        ``run_merge`` of this recipe object)."""
        token = _CURRENT.set(self)
        key = id(self.config)
        if self.config is not None:
            with _RUNS_LOCK:
                _EXPLICIT[key] = self
        try:
            yield self
        finally:
            _CURRENT.reset(token)
            if self.config is not None:
                with _RUNS_LOCK:
                    _EXPLICIT.pop(key, None)

    # -- the Gram pass -------------------------------------------------------------

    @contextlib.contextmanager
    def recording_pass(self):
        """While it runs in this thread, the kernel records its inputs here."""
        with self._recording(scope.Collected()) as collected:
            yield collected

    @contextlib.contextmanager
    def recording_maps(self):
        """While it runs in this thread, the kernel records how each tensor it would
        merge depends on the per-model weights (``scope.AffineMaps``), not merging."""
        with self._recording(scope.AffineMaps()) as maps:
            yield maps

    @contextlib.contextmanager
    def _recording(self, record):
        self.recording[threading.get_ident()] = record
        token = _CURRENT.set(self)  # the pass's own executor runs in this thread
        try:
            yield record
        finally:
            _CURRENT.reset(token)
            del self.recording[threading.get_ident()]

    def recorder(self):
        """What this thread is recording (a Gram pass or affine maps), if anything."""
        return self.recording.get(threading.get_ident()) if self.recording else None

    # -- solving -------------------------------------------------------------------

    def solve(self, models: Tuple, s: Settings, names: List[str], G: np.ndarray,
              numel: int, taus: List[torch.Tensor]):
        """Solve one scope and record it in the log: the one path for every solve."""
        solution, H = scope.solve(G, numel, s, taus)
        with self.lock:
            self.log.add(models, s, names, G, H, solution, numel)
        return solution

    def global_solution(self, s: Settings, models: Tuple) -> GlobalSolution:
        """The `scope: global` solve, made once (the first caller solves, the others
        wait); from a known Gram pass when it read these models with these solver
        settings, else from this merge's own Gram pass."""
        with self.lock:
            if self.error is not None:
                raise AWDInputError(f"the scope: global solve failed earlier: {self.error}")
            if self.solved is not None:
                return self.solved
            try:
                self.solved = self._solve_global(s, models)
            except BaseException as error:
                self.error = error
                raise
            return self.solved

    def _solve_global(self, s: Settings, models: Tuple) -> GlobalSolution:
        known = self.known
        if known is not None and known.settings is not None and known.models == tuple(
                models) and known.settings.solver_key() == s.solver_key():
            collected = known
        elif self.gram_pass is None:
            raise AWDInputError(
                "awd with scope: global solves one delta over the whole merge, but "
                "this merge runs outside every way mergekit-awd knows of (not "
                "mergekit-yaml / run_merge, mergekit's in-memory API or a "
                "mergekit-awd command). Use scope: tensor, or run it with "
                "mergekit-awd merge.")
        else:
            collected = self.gram_pass()
        if collected.settings is None:
            return GlobalSolution(None, frozenset(), {})
        names = [t.name for t in collected.tensors]
        solution = self.solve(collected.models, collected.settings, names, collected.G,
                              collected.numel,
                              [t.taus for t in collected.tensors if t.taus is not None])
        LOG.info("awd (scope: global): %d parameters; %s", collected.numel,
                 self.log.summary_line())
        delta = dict(zip(names, solution.delta)) if solution.delta is not None else {}
        return GlobalSolution(solution.w, frozenset(names), delta)

    # -- the merge's end -----------------------------------------------------------

    def warn_once_if(self, condition: bool, message: Optional[str]) -> None:
        """Log ``message`` once per merge (the kernel runs once per tensor)."""
        if condition and message not in self.warned:
            self.warned.add(message)
            LOG.warning(message)

    def tensor_merged(self) -> None:
        """One planned tensor merged (or, a non-floating buffer, answered by
        mergekit itself); under plain mergekit-yaml the last one writes the report."""
        if self.planned and next(self._merged) == self.planned:
            self.finish(card=False)

    def finish(self, card: bool = True) -> List[str]:
        """Write the report (and, with ``card``, the model card's section) of a merge
        that completed; without an output folder, log the summary line."""
        if self.log.empty:
            return []
        if not self.out_path:
            LOG.info("awd: %s", self.log.summary_line())
            return []
        return write_report(self.log, self.out_path, card, self.quiet)


def for_recipe(config, options, out_path: Optional[str] = None,
               known: Optional[scope.Collected] = None) -> RunContext:
    """The context of an explicit entry point: its Gram pass runs the recipe's own
    tasks, planned by mergekit's planner as run_merge plans them."""
    context = RunContext(config=config, options=options, out_path=out_path, known=known)
    storage = options.device if options.low_cpu_memory else "cpu"  # as run_merge
    context.gram_pass = lambda: scope.collect_tasks(
        context, config.merge_method, mergekit_run.plan_tensor_tasks(config, options),
        options.device, storage)
    return context


def write_report(log: MergeLog, out_path: str, card: bool, quiet: bool) -> List[str]:
    """The merge's report files in ``out_path`` (and the model card's section)."""
    from mergekit_awd import report

    rep = log.report()
    paths = report.write(rep, out_path)
    readme = os.path.join(out_path, "README.md")
    if card and os.path.exists(readme):
        with open(readme, "a", encoding="utf-8") as f:
            f.write(report.card_section(rep))
    if not quiet:
        print(f"awd: {log.summary_line()}\nawd report: {paths[0]}", file=sys.stderr)
    return paths


_CURRENT: ContextVar[Optional[RunContext]] = ContextVar("awd_run", default=None)

# How a kernel finds its merge where no context variable reaches it: the explicit
# contexts of run_merge calls in progress, by the id of their recipe object (a
# --multi-gpu worker thread does not inherit context variables), and the contexts
# made for plain mergekit-yaml, by mergekit's task universe of the merge (one per
# run_merge call; weak: it goes with the universe).
_EXPLICIT: Dict[int, RunContext] = {}
_DISCOVERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_RUNS_LOCK = threading.Lock()


def solution(run: Optional[RunContext], group, name: str, model_ids: Tuple, s: Settings,
             taus: Optional[torch.Tensor]):
    """(w, delta) of one selected tensor's scope: its share of the global solve, or
    its own solve (G from ``taus`` where the caller made them)."""
    if run is None:
        run = RunContext()  # nothing to read a global scope from: it says so
    if s.scope == "global":
        return run.global_solution(s, model_ids).delta_for(name)
    G = guards.gram(name, group, taus)
    solved = run.solve(model_ids, s, [name], G, group.base.tensor.numel(), [taus])
    return solved.w, solved.delta[0] if solved.delta is not None else None


def current() -> Optional[RunContext]:
    """The context of the merge this kernel call belongs to (None: none known).

    At planning under run_merge (no executor yet) it is a context for the guards
    only, made afresh: the merge's own is made when its first kernel runs."""
    context = _CURRENT.get()
    if context is not None:
        return context
    executor = mergekit_run.current_executor()
    call = mergekit_run.run_merge_call(executor.universe if executor is not None else None)
    if executor is None:
        return None if call is None else RunContext(
            config=call.config, options=call.options, out_path=call.out_path)
    with _RUNS_LOCK:
        context = _EXPLICIT.get(id(call.config)) if call is not None else None
        if context is None:
            context = _DISCOVERED.get(executor.universe)
        if context is None:
            context = _DISCOVERED[executor.universe] = _discovered(call, executor)
    return context


def _discovered(call, executor) -> RunContext:
    """The context of a merge started by plain mergekit-yaml / run_merge (or a bare
    mergekit Executor), made from mergekit's own objects."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    universe = executor.universe
    ours = [t for t in universe.tasks if isinstance(t, ExecuteMergeMethodTask)
            and t.method_name in scope.AWD_METHODS]
    context = RunContext(config=call.config if call else None,
                         options=call.options if call else None,
                         out_path=call.out_path if call else None,
                         planned=len(ours) if call else 0)
    method = ours[0].method_name if ours else "awd"
    context.gram_pass = lambda: scope.collect_tasks(
        context, method, universe.tasks, executor.math_device, executor.storage_device)
    return context


def run_merge(config, out_path: str, options, source: Optional[str] = None,
              known: Optional[scope.Collected] = None) -> List[str]:
    """mergekit's ``run_merge`` as an explicit entry point: one context for the merge,
    its report and model-card section written when run_merge has returned."""
    from mergekit.merge import run_merge as mergekit_run_merge

    run = for_recipe(config, options, out_path, known)
    with run.active():
        mergekit_run_merge(config, out_path, options=options, config_source=source)
    return run.finish()
