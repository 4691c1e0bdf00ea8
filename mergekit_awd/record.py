"""The record of a `mergekit-awd tune` run (``OUT/record.jsonl``), so that no scored
candidate is lost: the first line says what the rows depend on (the recipe, the models'
files, the --data files, the methods and knob values, the scorer's settings, the
versions); each scored candidate's row is appended, and flushed to disk, as soon as it
is scored. A run started again with the same ``--out`` reuses every row whose candidate
it meets again, so that a run stopped at any candidate (Ctrl-C, a crash, a lost
machine) continues where it stopped and ends with the same table. A record of another
run is refused in one line (``--restart`` starts over).

Failed rows are not recorded (a resumed run tries them again), nor are the learned
merges and the test scores: they are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

FORMAT = 1
NAME = "record.jsonl"


class RecordMismatch(Exception):
    """``--out`` holds the record of another run."""


def header(req, the_plan, metric: str) -> dict:
    """Everything a recorded row depends on, as JSON."""
    import mergekit
    import torch
    import transformers

    import mergekit_awd

    options = req.options
    return {
        "record": FORMAT,
        "recipe": req.config.to_yaml(),
        "models": {str(m): _model_identity(m) for m in req.config.referenced_models()},
        "data": [[spec, _file_digest(spec)] for spec in req.data],
        "methods": the_plan.methods,
        "values": {k: list(v) for k, v in the_plan.values.items()},
        "lambda": "searched" if the_plan.searched else "grid",
        "budget": req.budget,
        "metric": metric,
        "eval_cmd": req.eval_cmd,
        # with --learn the rows are scored without the examples set aside to decide
        "decide": req.learning.decide if req.learning is not None else None,
        "max_new_tokens": req.max_new_tokens,
        "batch_tokens": req.batch_tokens,
        "device": options.device or "cpu",
        "random_seed": options.random_seed,
        "versions": {"mergekit_awd": getattr(mergekit_awd, "__version__", None),
                     "mergekit": getattr(mergekit, "__version__", None),
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _file_digest(spec: str) -> str:
    path = spec.split("=", 1)[1] if "=" in spec and not os.path.exists(spec) else spec
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _model_identity(reference) -> list:
    """A local model folder's files (name, size, modification time); a hub model's
    revision."""
    path = str(reference.model.path)
    if not os.path.isdir(path):
        return [path, reference.model.revision]
    return sorted([name, st.st_size, st.st_mtime_ns] for name in os.listdir(path)
                  for st in [os.stat(os.path.join(path, name))]
                  if os.path.isfile(os.path.join(path, name)))


def first_difference(a: dict, b: dict) -> Optional[str]:
    for key in dict.fromkeys([*a, *b]):
        if a.get(key) != b.get(key):
            return key
    return None


class Record:
    """Rows already scored (by candidate label) and the file new ones go to."""

    def __init__(self, path: Optional[str], rows: Dict[str, dict]):
        self.path = path
        self.rows = rows

    @classmethod
    def none(cls) -> "Record":
        return cls(None, {})

    @classmethod
    def open(cls, req, the_plan, metric: str, say) -> "Record":
        """The record of ``req.out_dir``: continued if it is this run's, started
        otherwise; another run's is refused (or removed with ``req.restart``)."""
        path = os.path.join(req.out_dir, NAME)
        head = json.loads(json.dumps(header(req, the_plan, metric)))
        rows: Dict[str, dict] = {}
        if os.path.exists(path) and not req.restart:
            found, rows = _read(path)
            differs = first_difference(found, head)
            if differs is not None:
                raise RecordMismatch(
                    f"{path}: the record of another tune run (its {differs} differs "
                    f"from this one's); give --restart to start over in {req.out_dir}, "
                    f"or another --out")
            say(f"tune: continuing the run recorded in {path} ({len(rows)} candidates "
                f"scored)")
        else:
            os.makedirs(req.out_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(head) + "\n")
        return cls(path, rows)

    def row(self, label: str) -> Optional[dict]:
        return self.rows.get(label)

    def add(self, row: dict) -> None:
        self.rows[row["candidate"]] = row
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read(path: str):
    """The header and the rows of a record; a last line cut short by a crash is
    left out."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    head = json.loads(lines[0])
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # written in part when the run stopped
        rows[row["candidate"]] = row
    return head, rows
