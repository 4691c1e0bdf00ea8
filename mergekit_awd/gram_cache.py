"""Gram passes kept on disk, so that `report`, `sweep`, `tune` and the merge of the
same inputs pay for one pass in total.

A Gram pass reads every selected tensor of every input: at 7B–70B that is the
cost of a whole read of the inputs. What it produces is tiny (one K x K matrix
and a size per selected tensor), so it is kept, under a key that changes with
anything that could change it:

- per planned tensor: its output name, what mergekit's task reads for it (the
  models, the stored names and aliases, the recipe's ``dtype:``), the base
  model, the model order and the ``select`` rule;
- per input model: every file in its folder (the weights, the config, a LoRA
  adapter), by resolved path, size and modification time in nanoseconds. A file
  rewritten in place changes its size or its time: the key changes.

An input that cannot be identified this way (a hub id not in the local cache, a
LoRA adapter from the hub) is not kept. `optimizer: adam` is never kept (it
needs the task vectors, not only G). The folder is ``$MERGEKIT_AWD_CACHE``
(``off`` to disable), else ``$XDG_CACHE_HOME/mergekit-awd/gram`` (default
``~/.cache/mergekit-awd/gram``); a file is a few kilobytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import List, Optional

import numpy as np

LOG = logging.getLogger(__name__)
# 2: G from the exact float64 differences of the inputs (1: from float32 task
# vectors, which round float32 inputs' differences): a kept 1 is never reused
FORMAT = 2


def folder() -> Optional[str]:
    """Where kept Gram passes go (None: keeping is off)."""
    value = os.environ.get("MERGEKIT_AWD_CACHE", "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mergekit-awd", "gram")


def _model_files(model) -> Optional[list]:
    """(resolved path, size, mtime_ns) of every file of ``model`` (None: unknown)."""
    parts = [getattr(model, "model", None), getattr(model, "lora", None)]
    out = []
    for part in parts:
        if part is None:
            continue
        path = getattr(part, "path", None)
        if path is None:
            return None
        if not os.path.isdir(path):
            if part is parts[1]:
                return None  # a LoRA adapter from the hub
            from mergekit.io.tasks import LoaderCache

            path = LoaderCache().get(model).index.base_path  # the hub cache's snapshot
            if not path or not os.path.isdir(path):
                return None
        for name in sorted(os.listdir(path)):
            full = os.path.realpath(os.path.join(path, name))
            if os.path.isfile(full):
                st = os.stat(full)
                out.append([full, st.st_size, st.st_mtime_ns])
    return out


def _plain(value, depth: int = 0):
    """A mergekit task (pydantic models, ImmutableMaps, enums) as plain JSON data,
    without its ``device`` (where it runs does not change what it reads)."""
    from pydantic import BaseModel

    if depth > 20:
        raise ValueError("too deep to describe")
    if isinstance(value, BaseModel):
        return [type(value).__name__, {k: _plain(getattr(value, k), depth + 1)
                                       for k in type(value).model_fields if k != "device"}]
    if hasattr(value, "items") and callable(value.items):  # dict, ImmutableMap
        return sorted(([_plain(k, depth + 1), _plain(v, depth + 1)] for k, v in value.items()),
                      key=lambda kv: json.dumps(kv, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _describe(task) -> Optional[list]:
    """What one planned tensor's Gram record depends on (None: cannot describe it)."""
    from mergekit_awd import params

    try:
        reads = _plain(task.gather_tensors)
    except Exception:  # an input mergekit-awd cannot write out
        return None
    return [_plain(task.output_weight), reads, str(task.base_model),
            [str(m) for m in task.model_order], params.of_task(task, "select")]


def key(tasks) -> Optional[str]:
    """The key of the Gram pass over ``tasks`` (None: not to be kept)."""
    described, models = [], {}
    for task in tasks:
        d = _describe(task)
        if d is None:
            return None
        described.append(d)
        for m in task.model_order:
            models[str(m)] = m
    files = []
    for name in sorted(models):
        ident = _model_files(models[name])
        if ident is None:
            return None
        files.append([name, ident])
    blob = json.dumps([FORMAT, described, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load(k: str) -> Optional[dict]:
    """The kept record of key ``k``: names, G (T x K x K), numel; None if absent."""
    where = folder()
    path = os.path.join(where, f"{k}.npz") if where else None
    if path is None or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return {"names": meta["names"], "numel": meta["numel"], "G": data["G"].copy()}
    except Exception as error:  # a damaged file is a miss, never an error
        LOG.warning("mergekit-awd: ignoring the unreadable kept Gram pass %s: %s", path, error)
        return None


def save(k: str, names: List[str], G: np.ndarray, numel: List[int]) -> Optional[str]:
    """Keep a Gram pass (written to a temporary file, then renamed: never half)."""
    where = folder()
    if where is None:
        return None
    try:
        os.makedirs(where, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, G=G, meta=np.array(json.dumps({"names": names, "numel": numel})))
        path = os.path.join(where, f"{k}.npz")
        os.replace(tmp, path)
        return path
    except OSError as error:  # a read-only home must not fail a merge
        LOG.warning("mergekit-awd: could not keep the Gram pass in %s: %s", where, error)
        return None
