"""Reading ahead: ask the kernel to fetch a pass's next tensors while this one computes.

mergekit's executor reads each tensor when its task runs, so a pass over inputs
larger than memory alternates between waiting for the disk and computing. A
``Readahead`` walks the same tasks in the same order on a thread of its own and
asks the kernel to start reading their bytes (``posix_fadvise(WILLNEED)``: the
reads go to the page cache, nothing is held by this process), keeping at most
``window`` bytes ahead of the task being computed. Which bytes a task reads is
what mergekit's own ``LoadTensor`` tasks resolve (``group_label()``: the stored
name, after aliases and tied names) in its own shard index; the offsets come
from the safetensors header. Only a hint: anything it cannot place (pickled
checkpoints, LoRA, a platform without fadvise) is simply not read ahead.

``MERGEKIT_AWD_READAHEAD``: the window in MB (default 1024), or ``off``.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Dict, List, Optional, Sequence, Tuple

Range = Tuple[str, int, int]  # file, offset, length

WINDOW_MB = 1024


def window() -> int:
    """Bytes to keep read ahead (0: off), from ``MERGEKIT_AWD_READAHEAD``."""
    value = os.environ.get("MERGEKIT_AWD_READAHEAD", "").strip().lower()
    if value in ("off", "0", "no", "false"):
        return 0
    try:
        return int(float(value) * 2**20) if value else WINDOW_MB * 2**20
    except ValueError:
        raise ValueError(f"MERGEKIT_AWD_READAHEAD={value!r}: give a window in MB "
                         f"(e.g. 1024) or 'off'") from None


def tensor_ranges(task) -> List[Range]:
    """The byte ranges the LoadTensor tasks under ``task`` read (safetensors only)."""
    from mergekit.io.tasks import LoaderCache, LoadTensor

    out, todo = [], [task]
    while todo:
        t = todo.pop()
        if isinstance(t, LoadTensor):
            out.extend(_load_range(t, LoaderCache().get(t.model)))
        else:
            todo.extend(t.arguments().values())
    return out


_HEADERS: Dict[str, Tuple[int, dict]] = {}
_HEADERS_LOCK = threading.Lock()


def _header(path: str) -> Tuple[int, dict]:
    with _HEADERS_LOCK:
        if path not in _HEADERS:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                _HEADERS[path] = (8 + size, json.loads(f.read(size)))
        return _HEADERS[path]


def _load_range(task, loader) -> List[Range]:
    index = loader.index
    name = task.group_label()  # mergekit's resolution of the stored name
    if not index.is_safetensors or not name or name not in index.tensor_paths:
        return []
    path = os.path.join(index.base_path, index.tensor_paths[name])
    start, header = _header(path)
    begin, end = header[name]["data_offsets"]
    return [(path, start + begin, end - begin)]


class Readahead:
    """Read ``tasks``' inputs ahead of ``at(i)`` (the task being computed)."""

    def __init__(self, tasks: Sequence, window: Optional[int] = None):
        self._window = globals()["window"]() if window is None else window
        self._tasks = list(tasks) if self._window > 0 else []
        self._done = -1  # the last task whose bytes were asked for
        self._now = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        if hasattr(os, "posix_fadvise") and self._tasks:
            self._thread = threading.Thread(target=self._run, name="awd-readahead",
                                            daemon=True)
            self._thread.start()

    def at(self, i: int) -> None:
        with self._cond:
            self._now = i
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Readahead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        fds: Dict[str, int] = {}
        ahead: List[int] = []  # bytes asked for, per task
        try:
            for i, task in enumerate(self._tasks):
                try:
                    ranges = tensor_ranges(task)
                except Exception:  # only a hint
                    ranges = []
                size = sum(r[2] for r in ranges)
                with self._cond:
                    while not self._stop and i > self._now and (
                            sum(ahead[self._now:i]) + size > self._window):
                        self._cond.wait()
                    if self._stop:
                        return
                ahead.append(size)
                for path, offset, length in ranges:
                    try:
                        if path not in fds:
                            fds[path] = os.open(path, os.O_RDONLY)
                        os.posix_fadvise(fds[path], offset, length, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        pass
        finally:
            for fd in fds.values():
                os.close(fd)
