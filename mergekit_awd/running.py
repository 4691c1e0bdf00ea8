"""What mergekit 0.1.5 knows about the running merge but does not pass to a method.

A merge method gets one tensor group at a time and nothing else: not the other
tensors of the merge (which `scope: global` must read first), not the output
folder (where the report goes), not `--quiet`, not the end of the merge. All of
it is held by mergekit's own objects on the call stack, and this module is the
one place that reads them there:

- the planned task being executed (``ExecuteMergeMethodTask.execute``'s
  ``self``): its ``gather_tensors`` is the exact input the kernel receives;
- the executor running it (``Executor._run``'s ``self``); its ``universe``
  holds every task of the merge (also under ``--multi-gpu``, whose per-device
  executors share the one universe), and lives exactly as long as the merge;
- ``run_merge``'s frame (in any thread): ``out_path``, ``options`` and the
  recipe.

mergekit 0.1.5 offers no public way to learn these (the supported range is
pinned in pyproject.toml); ``tests/test_running.py`` fails if a mergekit
release moves them.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional


def _frames(frame) -> Iterator[Any]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def _code(function):
    return getattr(function, "__code__", None)


def _self_in_stack(code) -> Optional[Any]:
    for frame in _frames(sys._getframe(2)):
        if frame.f_code is code:
            return frame.f_locals.get("self")
    return None


def current_task():
    """The ``ExecuteMergeMethodTask`` this thread is executing, or None."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return _self_in_stack(_code(ExecuteMergeMethodTask.execute))


def current_executor():
    """The mergekit ``Executor`` running in this thread, or None."""
    from mergekit.graph import Executor

    return _self_in_stack(_code(Executor._run))


@dataclass(frozen=True)
class RunMerge:
    """``run_merge``'s arguments: where the model goes and mergekit's options.

    ``executor`` is run_merge's own executor (a weak reference: it ends with
    the merge, after the card and tokenizer are written).
    """

    out_path: Optional[str]
    options: Any
    config: Any
    executor: Any = None

    @property
    def quiet(self) -> bool:
        return bool(getattr(self.options, "quiet", False))


def run_merge(universe=None) -> Optional[RunMerge]:
    """The ``run_merge`` call running ``universe`` (any thread), or this thread's."""
    from mergekit import merge

    code = _code(merge.run_merge)
    stacks = [sys._getframe(1), *sys._current_frames().values()]  # this thread's first
    try:
        for top in stacks:
            for frame in _frames(top):
                if frame.f_code is not code:
                    continue
                local = frame.f_locals
                executor = local.get("exec")
                if universe is not None and getattr(executor, "universe", None) is not universe:
                    continue
                return RunMerge(local.get("out_path"), local.get("options"),
                                local.get("merge_config"),
                                weakref.ref(executor) if executor is not None else None)
        return None
    finally:
        # frames refer to their locals: keeping them here would keep a finished
        # merge's executor alive (and its report unwritten) until a GC cycle
        del stacks, top, frame
