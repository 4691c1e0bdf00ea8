"""The one place that reads what mergekit 0.1.5 knows about a running merge but
does not pass to a merge method.

Under plain ``mergekit-yaml`` (and ``run_merge`` called by a program) a method
gets one tensor group at a time and nothing else: not the other tensors of the
merge (which `scope: global` must read first), not the output folder (where the
report goes), not ``--quiet``. mergekit holds them in its own objects on the
call stack, and this module reads exactly these names there (``READS``):

- ``mergekit.merge.run_merge``'s locals ``merge_config``, ``out_path``,
  ``options`` and ``exec`` (its executor), in any thread: ``--multi-gpu`` runs
  the kernels on worker threads while ``run_merge`` waits in the main one;
- ``mergekit.graph.Executor._run``'s ``self``: the executor running the kernel
  in this thread, with its ``universe`` (every task of the merge, shared by the
  per-device executors of ``--multi-gpu``), ``math_device`` and
  ``storage_device``;
- ``mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute``'s
  ``tensors``: the loaded inputs of the planned task being executed (a task whose inputs are not floating point is a buffer that mergekit
  copies without calling the method: it still counts towards the merge's end).

It also plans a recipe as ``run_merge`` does (``plan_tensor_tasks``), for the
entry points that read a recipe's tensors without merging: that needs
mergekit's private ``mergekit.merge._model_out_config`` (``PRIVATE``).

``check()`` verifies that these names still exist in the installed mergekit and
raises ``MergekitMoved``, naming what moved, when they do not: a mergekit
release that renames one fails loudly instead of silently losing the report,
the guards or `scope: global`. The explicit entry points (``mergekit-awd
merge / report / sweep / tune`` and mergekit's in-memory API) need none of it
(``--multi-gpu`` worker threads excepted, which find their merge by
``run_merge``'s ``merge_config``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

READS = {
    "mergekit.merge.run_merge": ("merge_config", "out_path", "options", "exec"),
    "mergekit.graph.Executor._run": ("self",),
    "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute": ("tensors",),
}
EXECUTOR_ATTRIBUTES = ("universe", "math_device", "storage_device")
PRIVATE = ("mergekit.merge._model_out_config",)


class MergekitMoved(RuntimeError):
    """The installed mergekit no longer has a name this module reads."""


@lru_cache(maxsize=1)
def _functions():
    from mergekit import merge
    from mergekit.graph import Executor
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return {
        "mergekit.merge.run_merge": merge.run_merge,
        "mergekit.graph.Executor._run": Executor._run,
        "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute":
            ExecuteMergeMethodTask.execute,
    }


_CHECKED = False


def check() -> None:
    """Raise ``MergekitMoved`` unless every name in ``READS`` exists."""
    global _CHECKED
    if _CHECKED:
        return
    from mergekit.graph import Executor

    functions = _functions.__wrapped__()  # as installed now, not as first seen
    missing = []
    for where, names in READS.items():
        code = getattr(functions.get(where), "__code__", None)
        local = set(code.co_varnames) if code is not None else set()
        missing += [f"{where}: local '{n}'" for n in names if n not in local]
    from mergekit import merge

    missing += [name for name in PRIVATE
                if not callable(getattr(merge, name.rsplit(".", 1)[1], None))]
    annotations = getattr(Executor, "__annotations__", {})
    missing += [f"mergekit.graph.Executor.{a}" for a in EXECUTOR_ATTRIBUTES
                if a not in annotations]
    if missing:
        raise MergekitMoved(
            "mergekit-awd cannot follow this mergekit version under plain "
            "mergekit-yaml: it reads " + "; ".join(missing) + ", which this mergekit "
            "no longer has. Run the recipe with `mergekit-awd merge` instead (same "
            "options), or install mergekit 0.1.5."
        )
    _CHECKED = True


def _frames(frame) -> Iterator[Any]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def _local_of(where: str, name: str) -> Optional[Any]:
    """Local ``name`` of the innermost call of ``where`` in this thread's stack."""
    check()
    code = _functions()[where].__code__
    for frame in _frames(sys._getframe(2)):
        if frame.f_code is code:
            return frame.f_locals.get(name)
    return None


_EXECUTE = "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute"


def current_inputs():
    """The loaded inputs ({model: tensor}) of the task this thread is executing."""
    return _local_of(_EXECUTE, "tensors")


def current_executor():
    """The mergekit ``Executor`` running in this thread, or None."""
    return _local_of("mergekit.graph.Executor._run", "self")


@dataclass(frozen=True)
class RunMergeCall:
    """One ``run_merge`` call: its recipe, output folder and options."""

    config: Any
    out_path: Optional[str]
    options: Any


def run_merge_call(universe=None) -> Optional[RunMergeCall]:
    """The ``run_merge`` call of this thread, else the one (in any thread) whose
    executor runs ``universe``; None outside ``run_merge``."""
    from mergekit import merge

    check()
    code = merge.run_merge.__code__
    top = frame = None
    stacks = [sys._getframe(1)]
    if universe is not None:
        stacks += list(sys._current_frames().values())
    try:
        for i, top in enumerate(stacks):
            for frame in _frames(top):
                if frame.f_code is not code:
                    continue
                local = frame.f_locals
                executor = local.get("exec")
                if i > 0 and getattr(executor, "universe", None) is not universe:
                    continue
                return RunMergeCall(local.get("merge_config"), local.get("out_path"),
                                    local.get("options"))
        return None
    finally:
        # frames refer to their locals: do not keep a finished merge alive
        del stacks, top, frame


def out_config(config, options):
    """The config ``mergekit-yaml`` writes for the recipe (its layer count after
    ``slices:``, its dtype)."""
    from mergekit import merge
    from mergekit.architecture import get_architecture_info

    check()
    return merge._model_out_config(config, get_architecture_info(config, options),
                                   options.trust_remote_code)


def plan_tensor_tasks(config, options) -> list:
    """The recipe's per-tensor tasks, planned by mergekit's own planner as
    ``mergekit-yaml`` plans them (nothing is read or written)."""
    from mergekit import merge
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    check()
    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options)
    out_config = merge._model_out_config(config, arch_info, options.trust_remote_code)
    # plan_to_disk only plans (the writer is a task that is never run here);
    # mergekit 0.1.5's plan_in_memory cannot build its own return tasks
    planned = MergePlanner(config, arch_info, options, out_config).plan_to_disk("unused")
    return [t.tensor_task for t in planned if hasattr(t, "tensor_task")]
