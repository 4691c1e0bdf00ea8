"""What each `awd` merge did, collected while it runs, for its report and model card.

mergekit tells a merge method neither where the model goes nor when the merge
ends, so the kernels record here (per merge: base and models), and whoever
knows the output folder writes the files (``finish``): the `mergekit-awd merge`
command, or, under plain `mergekit-yaml`, an exit hook that reads the output
folder from mergekit-yaml's own command line.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np

from mergekit_awd import solver
from mergekit_awd.cli_context import mergekit_yaml_params

LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()
_STARTED = time.time()


@dataclass
class MergeLog:
    """Sums over the solves of one merge (one for scope global, one per tensor)."""

    models: Tuple[Hashable, ...]
    weights: List[float]
    params: Dict
    G: Optional[np.ndarray] = None
    H: Optional[np.ndarray] = None
    losses: Optional[np.ndarray] = None
    delta_sq: float = 0.0
    tensors: List[str] = field(default_factory=list)
    solves: int = 0
    numel: int = 0
    w: Optional[np.ndarray] = None

    def add(self, names: List[str], G, H, solution: solver.Solution, numel: int):
        self.G = G if self.G is None else self.G + G
        self.H = H if self.H is None else self.H + H
        losses = np.asarray(solution.losses, dtype=np.float64)
        self.losses = losses if self.losses is None else self.losses + losses
        self.delta_sq += solver.delta_norm_sq(G, solution)
        self.tensors.extend(names)
        self.solves += 1
        self.numel += numel
        self.w = solution.w if self.solves == 1 else None

    def report(self) -> Dict:
        from mergekit_awd.report import summarize

        report = summarize(
            self.G,
            self.H,
            self.losses / max(self.solves, 1),
            self.delta_sq,
            self.w,
            [str(m) for m in self.models],
            self.weights,
            self.params,
            numel=self.numel,
            tensors=len(self.tensors),
        )
        if self.solves > 1:
            report["loss_note"] = f"mean over {self.solves} per-tensor solves"
        return report


_LOGS: Dict[Tuple, MergeLog] = {}


def log_for(base_id, model_ids, name: str, weights, params) -> MergeLog:
    """The log of the merge that ``name`` belongs to (a repeated name: a new merge)."""
    key = (base_id, tuple(model_ids))
    with _LOCK:
        log = _LOGS.get(key)
        if log is None or name in log.tensors:
            log = MergeLog(
                models=tuple(model_ids),
                weights=[float(w) for w in weights],
                params={k: v for k, v in params.items() if not hasattr(v, "values_for")},
            )
            _LOGS[key] = log
            _install_exit_hook()
        return log


def record(base_id, model_ids, names, weights, params, G, H, solution, numel):
    """Add one solve (over the tensors ``names``) to its merge's log."""
    log = log_for(base_id, model_ids, names[0], weights, params)
    with _LOCK:
        log.add(list(names), G, H, solution, numel)
    return log


def latest() -> Optional[MergeLog]:
    with _LOCK:
        return next(reversed(_LOGS.values()), None) if _LOGS else None


def finish(out_path: str) -> List[str]:
    """Write the last merge's report and heatmap into ``out_path``; add the card section."""
    from mergekit_awd import report as report_mod

    log = latest()
    if log is None or log.G is None:
        return []
    report = log.report()
    paths = report_mod.write(report, out_path)
    card = os.path.join(out_path, "README.md")
    if os.path.exists(card):
        with open(card, "a", encoding="utf-8") as f:
            f.write(report_mod.card_section(report))
    LOG.info("awd report written to %s", paths[0])
    return paths


def summary_line(log: Optional[MergeLog] = None) -> str:
    """Final loss and the cosine drop of a merge (default: the last), in one line."""
    log = log or latest()
    if log is None or log.G is None:
        return "no tensor was disentangled"
    from mergekit_awd.report import table

    return table(log.report()).splitlines()[-1]


_HOOKED = False


def _install_exit_hook() -> None:
    """Under plain `mergekit-yaml`, write the report when the process ends."""
    global _HOOKED
    if _HOOKED or not mergekit_yaml_params():
        return
    _HOOKED = True
    atexit.register(_finish_mergekit_yaml)


def _finish_mergekit_yaml() -> None:
    try:
        out_path = mergekit_yaml_params().get("out_path")
        config = os.path.join(out_path or "", "config.json")
        # only a merge that finished in this process: mergekit writes config.json last
        if out_path and os.path.exists(config) and os.path.getmtime(config) >= _STARTED:
            paths = finish(out_path)
            if paths:
                print(f"awd: {summary_line()}\nawd report: {paths[0]}", file=sys.stderr)
    except Exception as error:  # never turn a finished merge into a failure
        print(f"mergekit-awd: could not write the awd report: {error}", file=sys.stderr)
