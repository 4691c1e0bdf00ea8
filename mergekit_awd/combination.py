"""How the `awd` kernels combine the task vectors of one tensor, given the solve (pure
helpers; ``method.py`` plans and dispatches, ``solver.py`` solves).

Merged tensor (docs/design.md), with W = sum_i weight_i and scale = lambda
(lambda / W under `normalize`):

    selected:  base + scale * sum_i weight_i * (tau_i - delta) + keep_delta * delta
    others:    mergekit's own method on the raw task vectors (task_arithmetic,
               or ties / dare_ties for awd_ties / awd_dare_ties; a data-free rule for
               awd_RULE), or base (`others: base`)

Under sgd delta = sum_k w_k tau_k, so the selected case is task arithmetic
with the coefficients scale * (weight_k - W w_k) + keep_delta * w_k. With
sparsification (`awd_ties`, `awd_dare_ties`) the disentangled vectors go
through mergekit's own TIES / DARE-TIES instead of plain task arithmetic, and
through the rule for `awd_tsv`, `awd_iso_c`, `awd_iso_cts` and `awd_wudi`.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from mergekit_awd import data_free, guards, solver
from mergekit_awd.params import Settings


def others(combine_with: str, declared, group, s: Settings) -> torch.Tensor:
    """Tensors not disentangled: the base, or mergekit's own method."""
    if s.others == "base":  # the fine-tunes are not used, but NaN/Inf in them refused
        guards.refuse_nonfinite_inputs(group.metadata.name, group)
        return group.base.tensor
    base, inputs = group.base.tensor, [e.tensor for e in group.non_base]
    if combine_with in data_free.RULES:
        dtype = solver.compute_dtype(base)
        taus = solver.task_vectors(base, inputs, dtype)
        return base.to(dtype) + data_free.scaled_delta(combine_with, taus, s, group.metadata)
    return mergekit_combination(combine_with, declared, base, inputs, s)

def disentangled(combine_with: str, declared, group, s: Settings, solve) -> torch.Tensor:
    """A selected tensor: solve (or look up) delta (``solve(taus) -> (w, delta)``),
    then combine tau_k - delta."""
    base, inputs = group.base.tensor, [e.tensor for e in group.non_base]
    dtype = solver.compute_dtype(base)
    # the task vectors themselves only where delta is a full-space vector (adam)
    # or sparsification needs them; else G and the combination read the inputs
    taus = None
    if s.optimizer == "adam" or combine_with != "task_arithmetic":
        taus = solver.task_vectors(base, inputs, dtype)
    w, delta = solve(taus)
    if combine_with == "task_arithmetic" and w is not None:
        return solver.combination(base, inputs, awd_coefficients(w, s), dtype)
    if taus is None:
        taus = solver.task_vectors(base, inputs, dtype)
    return _combine(combine_with, declared, base.to(dtype), taus, w, delta, s,
                    group.metadata)


def _combine(combine_with: str, declared, base, taus, w, delta, s: Settings,
             metadata) -> torch.Tensor:
    """base + the (TIES-/DARE-) combination of tau_k - delta (+ keep_delta * delta)."""
    if combine_with == "task_arithmetic":
        return awd_task_arithmetic(base, taus, delta, s)
    if w is not None:
        delta = combine(torch.zeros_like(base), taus, torch.from_numpy(w), 1.0)
    hat = taus - delta.to(taus.device, taus.dtype) if delta is not None else taus
    if combine_with not in data_free.RULES:
        merged = base + mergekit_combination(combine_with, declared, torch.zeros_like(base),
                                             list(hat.unbind(0)), s)
    else:  # the rule on hat itself (no copy)
        merged = base + data_free.scaled_delta(combine_with, hat, s, metadata)
    if delta is not None and s.keep_delta:
        merged.add_(delta.to(merged.device, merged.dtype), alpha=s.keep_delta)
    return merged


def mergekit_combination(combine_with: str, declared, base: torch.Tensor,
                         tensors: List[torch.Tensor], s: Settings) -> torch.Tensor:
    """mergekit's own task_arithmetic / ties / dare_ties on these inputs.

    In float32 at least: mergekit's methods compute in the inputs' dtype, and
    bf16 task vectors (differences of nearby bf16 numbers) lose most of their bits.
    """
    from mergekit.merge_methods.api import merge_tensors

    from mergekit import merge_methods

    theirs = {p.name for p in merge_methods.get(combine_with).spec.parameters}
    parameters = {p.name: s.value(p.name) for p in declared if p.name in theirs}
    return merge_tensors([base, *tensors], combine_with, parameters=parameters,
                         base_index=0, dtype=solver.compute_dtype(base))


def awd_coefficients(w: np.ndarray, s: Settings) -> torch.Tensor:
    """Under sgd delta = sum_k w_k tau_k, so base + scale * sum_k weight_k (tau_k -
    delta) + keep_delta * delta is one combination of the taus, with coefficients
    scale * weight_k + (keep_delta - scale * W) * w_k."""
    W, scale = sum(s.weights), coefficient_scale(s)
    weights = torch.tensor(s.weights, dtype=torch.float64)
    return scale * weights + (s.keep_delta - scale * W) * torch.from_numpy(w)


def awd_task_arithmetic(base, taus, delta, s: Settings) -> torch.Tensor:
    """base + scale * sum_k weight_k (tau_k - delta) + keep_delta * delta, for a
    full-space delta (adam; under sgd ``solver.combination`` with
    ``awd_coefficients`` merges without the task vectors)."""
    W, scale = sum(s.weights), coefficient_scale(s)
    merged = combine(base, taus, torch.tensor(s.weights, dtype=torch.float64), scale)
    if delta is not None:
        merged.add_(delta.to(merged.device, merged.dtype), alpha=s.keep_delta - scale * W)
    return merged


def combine(base, taus, coeffs, scale: float) -> torch.Tensor:
    """base + scale * sum_k coeffs_k * tau_k (taus stacked along dim 0)."""
    c = (coeffs * scale).to(device=taus.device, dtype=taus.dtype)
    return base + torch.tensordot(c, taus, dims=1)


def coefficient_scale(s: Settings) -> float:
    """lambda, divided by the sum of weights under `normalize` (as task_arithmetic)."""
    W = sum(s.weights)
    if s.normalize:
        return s.lam / (W if abs(W) >= 1e-8 else 1.0)
    return s.lam
