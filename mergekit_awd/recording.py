"""What the `awd` kernels record instead of merging, beside the kernel (``method.py``):

- a Gram pass (``scope.Collected``): each selected tensor's Gram matrix (and task
  vectors where the solver needs them), so that a global solve can run before the
  merge;
- ``--learn``'s affine maps (``scope.AffineMaps``): how each tensor's merge depends on
  the per-model weights, (a, M) with merge = base + sum_j (a_j + sum_k weight_k M[k, j])
  tau_j, refused where the merge is not such a sum.

Both return a placeholder of the tensor's shape (no memory): mergekit's task graph
goes on, and nothing is written.
"""

from __future__ import annotations

import numpy as np
import torch

from mergekit_awd import context, data_free, guards, params, scope, solver
from mergekit_awd.params import Settings


def record(kernel, group, settled, recorder, run) -> torch.Tensor:
    """Record one group (``settled``: the kernel's (name, model ids, settings,
    selected?), None for a group with nothing to merge)."""
    base = group.base.tensor
    if settled is not None:
        name, model_ids, s, selected = settled
        if isinstance(recorder, scope.AffineMaps):
            recorder.maps[name] = affine_map(kernel, group, name, model_ids, s, selected,
                                             run)
        elif selected:
            taus = (solver.task_vectors(base, [e.tensor for e in group.non_base],
                                        solver.compute_dtype(base))
                    if recorder.keeps_taus(s) else None)
            recorder.add(name, model_ids, s, base.numel(), guards.gram(name, group, taus),
                         taus)
    return base.new_zeros(()).expand(base.shape)  # a placeholder: no memory


def affine_map(kernel, group, name, model_ids, s: Settings, selected: bool, run):
    """(a, M) such that this tensor's merge is base + sum_j (a_j + sum_k weight_k
    M[k, j]) tau_j, where it is a weighted sum of task vectors with the per-model
    weights factored out (M holds lambda; normalize, which divides by the weights'
    sum, is not affine in them). Refused where the merge is not such a sum."""
    K, combine_with = len(model_ids), kernel.combine_with
    if s.normalize:
        raise params.AWDParameterError(
            f"{kernel.spec.name}: normalize divides by the sum of the weights, so "
            f"the merge is not linear in them; learn with normalize: false")
    if not selected:
        if s.others == "base":
            return np.zeros(K), np.zeros((K, K))
        if combine_with == "task_arithmetic":
            return np.zeros(K), s.lam * np.eye(K)
    elif combine_with == "task_arithmetic" and s.optimizer == "sgd":
        w, _ = context.solution(run, group, name, model_ids, s, None)
        return awd_affine(w, s)
    why = ("optimizer: adam's delta is not in their span"
           if combine_with == "task_arithmetic"
           else f"{combine_with}'s SVD or optimisation depends on the weights"
           if combine_with in data_free.RULES
           else "TIES's sign election depends on the weights")
    raise params.AWDParameterError(
        f"{kernel.spec.name} (tensor {name}): the merge is not a weighted sum of "
        f"task vectors ({why})")


def awd_affine(w: np.ndarray, s: Settings):
    """``combination.awd_coefficients`` with the weights factored out (normalize off): the
    coefficients are a + weights @ M, a = keep_delta * w, M[k, j] = lambda *
    ([k == j] - w_j): weight_k scales tau_k - delta, delta = sum_j w_j tau_j."""
    w = np.asarray(w, dtype=np.float64)
    return s.keep_delta * w, s.lam * (np.eye(len(w)) - w[None, :])
