"""`scope: global`: one delta for the whole model, from one streaming Gram pass.

mergekit calls a merge method once per output tensor and has no hook before
the first one, so the first call for a selected tensor streams every selected
tensor of every input through mergekit's own loaders (one tensor group in memory at a
time, on the merge device), solves once, and keeps the solution until every
selected tensor has been merged. Because the solution is shared, every tensor
must resolve the solver's parameters to the same values; a tensor that does not
stops the merge before it is written.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Set, Tuple

import numpy as np
import torch

from mergekit_awd import merge_log, solver
from mergekit_awd.params import AWDInputError, AWDParameterError
from mergekit_awd.selection import is_selected, layer_weight_names, output_weights

LOG = logging.getLogger(__name__)

# Parameters that shape the one global solve, so must not vary per tensor.
SOLVER_PARAMETERS = ("alpha", "lr", "steps", "optimizer", "units", "select", "adam_max_gb")


@dataclass
class GlobalRun:
    """The solved delta of one merge, until all of its tensors have used it."""

    solver_params: Tuple
    names: Set[str]
    solution: Optional[solver.Solution] = None
    delta: Dict[str, torch.Tensor] = field(default_factory=dict)
    consumed: Set[str] = field(default_factory=set)
    fingerprints: Dict[str, torch.Tensor] = field(default_factory=dict)


_RUNS: Dict[Tuple[Hashable, ...], GlobalRun] = {}
_LOCK = threading.Lock()


def lookup(
    base_id: Hashable,
    model_ids: Tuple[Hashable, ...],
    name: str,
    params: Dict,
    device: torch.device,
) -> GlobalRun:
    """The run for this merge, for the selected tensor ``name``.

    The tensor is marked as merged; when all are, the run is dropped. Seeing a
    tensor a second time means that a new merge has started.
    """
    key = (base_id, model_ids)
    solver_params = tuple(params[p] for p in SOLVER_PARAMETERS)
    with _LOCK:
        run = _RUNS.get(key)
        if run is not None and name in run.consumed:
            run = None
        if run is None:
            run = _prepare(base_id, model_ids, solver_params, params, device)
            _RUNS[key] = run
        elif run.solver_params != solver_params:
            _RUNS.pop(key, None)
            _raise_inconsistent(name, run.solver_params, solver_params)
        if name not in run.names:
            _RUNS.pop(key, None)
            raise AWDInputError(
                f"tensor {name} is selected for awd but was not found in every "
                f"input during the Gram pass (an optional or non-float weight?); "
                f"exclude it with a 'select' regular expression"
            )
        run.consumed.add(name)
        if run.consumed >= run.names:
            _RUNS.pop(key, None)
        return run


def forget(base_id: Hashable, model_ids: Tuple[Hashable, ...]) -> None:
    """Drop a run (after a failure), so that a rerun starts from a fresh pass."""
    with _LOCK:
        _RUNS.pop((base_id, model_ids), None)


def _raise_inconsistent(name: str, first: Tuple, now: Tuple) -> None:
    diffs = [
        f"{p}={b!r} (other tensors: {a!r})"
        for p, a, b in zip(SOLVER_PARAMETERS, first, now)
        if a != b
    ]
    raise AWDParameterError(
        f"awd with scope: global solves one delta for the whole model, so its "
        f"solver parameters must be the same for every tensor, but tensor {name} "
        f"resolves {', '.join(diffs)}. Remove the filter or gradient on these "
        f"parameters, or use scope: tensor for per-tensor values."
    )


def _prepare(base_id, model_ids, solver_params, params, device) -> GlobalRun:
    """The Gram pass over the selected tensors and the solve."""
    names, G, numel, taus, per_tensor = gram_pass(
        base_id,
        model_ids,
        params["select"],
        device,
        keep_taus=params["optimizer"] == "adam" and params["steps"] > 0,
        max_gb=params["adam_max_gb"],
    )
    run = GlobalRun(solver_params=solver_params, names=set(names))
    run.fingerprints = {name: per_tensor[name][2] for name in names}
    run.solution = solve(G, numel, params, list(taus.values()))
    if run.solution.delta is not None:
        run.delta = dict(zip(taus.keys(), run.solution.delta))
    if names:
        log = merge_log.record(
            base_id,
            model_ids,
            names,
            [params["weight"][m] for m in model_ids],
            params,
            G,
            disentangled(G, run.solution, list(taus.values())),
            run.solution,
            numel,
        )
        LOG.info(
            "awd (scope: global): %d parameters; %s", numel, merge_log.summary_line(log)
        )
    return run


def solve(G: np.ndarray, numel: int, params: Dict, taus: List[torch.Tensor]):
    """Run the chosen optimizer in the chosen units on one scope's Gram matrix."""
    alpha, lr = solver.raw_hyperparameters(
        params["alpha"],
        params["lr"],
        units=params["units"],
        optimizer=params["optimizer"],
        s=solver.scale_of(G),
        numel=numel,
    )
    if params["optimizer"] == "sgd":
        return solver.sgd_gram(G, alpha, lr, params["steps"])
    return solver.adam_full(taus, G, alpha, lr, params["steps"])


def disentangled(G, solution, taus) -> np.ndarray:
    """Inner products of the disentangled vectors, whichever optimizer ran."""
    if solution.w is not None:
        return solver.disentangled_inner(G, solution.w)
    return solver.full_inner(taus, solution.delta, G)


def gram_pass(
    base_id,
    model_ids,
    select: str,
    device: torch.device,
    *,
    keep_taus: bool = False,
    max_gb: float = float("inf"),
):
    """Stream the selected tensors of base and models once; accumulate G (float64).

    Returns the selected names, G, the number of parameters in the scope,
    with ``keep_taus`` (Adam) the task vectors themselves (within ``max_gb``),
    and each tensor's own Gram matrix and size.
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    loaders = [cache.get(m) for m in (base_id, *model_ids)]
    layer_names = layer_weight_names(base_id)
    K = len(model_ids)
    G = np.zeros((K, K))
    names: List[str] = []
    taus: Dict[str, torch.Tensor] = {}
    per_tensor: Dict[str, Tuple[np.ndarray, int, torch.Tensor]] = {}
    numel = 0
    candidates = [
        w
        for w in output_weights(base_id)
        if select != "linear" or is_selected(select, w[0], 2, w[2], layer_names)
    ]
    for name, other_names, vocabulary_axis, optional in _progress(candidates):
        tensors = []
        for model, loader in zip((base_id, *model_ids), loaders):
            key = next(
                (n for n in (name, *other_names) if n in loader.index.tensor_paths),
                None,
            )
            if key is None:
                if optional:
                    break
                raise AWDInputError(
                    f"tensor {name} is missing from model {model}; every input "
                    f"must have the same architecture as the base model"
                )
            tensors.append(loader.get_tensor(key, device="cpu").to(device))
        else:
            base, rest = tensors[0], tensors[1:]
            if not is_selected(select, name, base.ndim, vocabulary_axis, layer_names):
                continue
            if not base.is_floating_point():
                continue
            check_shapes(name, (base_id, *model_ids), tensors)
            dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
            tau = solver.task_vectors(base, rest, dtype)
            G_t = solver.gram(tau).cpu().numpy()
            if not np.isfinite(G_t).all():
                raise_nonfinite(name, labelled(base_id, model_ids, tensors))
            del tensors, base, rest
            G += G_t
            per_tensor[name] = (G_t, tau[0].numel(), fingerprint(tau))
            numel += tau[0].numel()
            names.append(name)
            if keep_taus:
                taus[name] = tau
                needed = (K + 4) * numel * tau.element_size() / 2**30
                if needed > max_gb:
                    raise AWDParameterError(
                        f"optimizer: adam with scope: global keeps all selected task "
                        f"vectors and Adam's state in memory: {needed:.1f} GB so far, "
                        f"over adam_max_gb={max_gb:g}. Use optimizer: sgd (exact "
                        f"Algorithm 1, no such memory), scope: tensor, or raise "
                        f"adam_max_gb."
                    )
    return names, G, numel, taus, per_tensor


def fingerprint(taus: torch.Tensor) -> torch.Tensor:
    """A cheap per-model signature of a tensor's task vectors (first 4096 entries)."""
    return taus.reshape(taus.shape[0], -1)[:, :4096].to(torch.float64).sum(dim=1).cpu()


def check_fingerprint(run: GlobalRun, name: str, taus: torch.Tensor) -> None:
    """The kernel merges what the Gram pass read (slices: may map other tensors here)."""
    expected = run.fingerprints.pop(name, None)
    if expected is None:
        return
    got = fingerprint(taus)
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-8):
        raise AWDInputError(
            f"tensor {name}: the inputs merged into it are not the tensors of that "
            f"name that the scope: global Gram pass read (a slices:/modules: recipe "
            f"that takes layers from other positions?). Use scope: tensor for such "
            f"recipes."
        )


def _progress(items):
    from tqdm import tqdm

    from mergekit_awd.cli_context import quiet

    return tqdm(items, desc="awd Gram pass", disable=True if quiet() else None, leave=False)


def check_shapes(name: str, model_ids, tensors) -> None:
    """Mismatched shapes, with the model that differs from the base."""
    shape = tensors[0].shape
    for model, tensor in zip(model_ids, tensors):
        if tensor.shape != shape:
            raise AWDInputError(
                f"tensor {name} has shape {tuple(tensor.shape)} in model {model} "
                f"but {tuple(shape)} in the base model {model_ids[0]}; awd merges "
                f"fine-tunes of one architecture and size"
            )


def labelled(base_id, model_ids, tensors):
    """(label, tensor) pairs for error messages; the base tensor comes first."""
    labels = [f"{base_id} (base)"] + [str(m) for m in model_ids]
    return list(zip(labels, tensors))


def raise_nonfinite(name: str, labelled_tensors) -> None:
    """Name the input(s) holding NaN/Inf in tensor ``name``."""
    bad = [label for label, t in labelled_tensors if not torch.isfinite(t).all()]
    where = ", ".join(bad) if bad else "the computed task vectors (overflow)"
    raise AWDInputError(
        f"tensor {name} contains NaN or Inf in model {where}; fix or drop that "
        f"model, merging it would spread NaN/Inf into the output"
    )
