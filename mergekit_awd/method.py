"""The `awd` merge method: mergekit glue around the solver.

Merged tensor (DESIGN.md §4), with W = sum_i weight_i:
    selected:  base + lambda * sum_i weight_i * (tau_i - delta)
    others:    base + lambda * sum_i weight_i * tau_i   (others: task_arithmetic)
               base                                     (others: base)
divided by W when `normalize`. Under sgd, delta = sum_k w_k tau_k, so the
selected case is task arithmetic with coefficients weight_k - W * w_k.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from mergekit_awd import global_scope, params, solver
from mergekit_awd.global_scope import check_shapes, labelled, raise_nonfinite
from mergekit_awd.selection import is_selected, layer_weight_names

LOG = logging.getLogger(__name__)

# Relative units (DESIGN.md §2): one alpha/lr for any model and tensor size.
DEFAULTS = {
    "lambda": 1.0,
    "alpha": 0.01,
    "lr": 0.005,
    "steps": 1000,
    "optimizer": "sgd",
    "scope": "global",
    "units": "relative",
    "select": "linear",
    "others": "task_arithmetic",
    "normalize": False,
    "adam_max_gb": 8.0,
}

_TYPES = {
    "lambda": params.Lambda,
    "alpha": params.Alpha,
    "lr": params.LearningRate,
    "steps": params.Steps,
    "optimizer": params.Optimizer,
    "scope": params.Scope,
    "units": params.Units,
    "select": params.Select,
    "others": params.Others,
    "normalize": params.Normalize,
    "adam_max_gb": params.AdamMaxGB,
}

_DESCRIPTIONS = {
    "lambda": "scale of the summed disentangled task vectors",
    "alpha": "weight of ||delta|| against orthogonality (see units)",
    "lr": "step size: plain GD for sgd, Adam's lr for adam (see units)",
    "steps": "solver steps N; 0 = plain task arithmetic",
    "optimizer": "sgd (Algorithm 1, exact in Gram space) or adam (full space)",
    "scope": "global (one delta for the model, the paper) or tensor",
    "units": "relative (scale-free alpha/lr) or raw (the paper's units)",
    "select": "tensors to disentangle: linear, all, or a regex on names",
    "others": "tensors not selected: task_arithmetic or base",
    "normalize": "divide by the sum of weights, as task_arithmetic does",
    "adam_max_gb": "memory allowed for adam's resident task vectors (scope: global)",
}


class AWDMerge(GroupMergeMethod):
    """Adaptive Weight Disentanglement (Xiong et al., arXiv 2411.18729)."""

    def __init__(self, name: str = "awd"):
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name="Adaptive Weight Disentanglement",
            reference_url="https://arxiv.org/abs/2411.18729",
            parameters=(
                ParameterSpec(
                    "weight",
                    params.Weight,
                    ParameterScope.NON_BASE,
                    default=1.0,
                    description="per-model weight of its task vector",
                ),
                *(
                    ParameterSpec(
                        key,
                        _TYPES[key],
                        ParameterScope.SHARED,
                        default=value,
                        description=_DESCRIPTIONS[key],
                    )
                    for key, value in DEFAULTS.items()
                ),
            ),
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
        )
        self._warned_single = False

    def validate_inputs(
        self,
        input_ids: Sequence[Any],
        base_id: Optional[Any] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        try:
            super().validate_inputs(input_ids, base_id, group_name=group_name)
        except ValueError as error:
            if base_id is None or base_id not in input_ids:
                raise ValueError(
                    f"{error}. awd needs base_model: the pretrained model the "
                    f"fine-tunes started from (task vectors are fine-tune minus "
                    f"base). Add 'base_model: <path or hub id>' to the recipe."
                ) from error
            raise

    def merge_group(self, group: TensorGroup, /, **p: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries or not base.is_floating_point():
            return base
        name = group.metadata.name or "<unnamed>"
        model_ids = tuple(e.id for e in entries)
        check_shapes(name, (group.base.id, *model_ids), [base, *(e.tensor for e in entries)])
        if len(entries) == 1 and not self._warned_single:
            self._warned_single = True
            LOG.warning(
                "awd merges one fine-tune: with a single task vector there is "
                "nothing to disentangle (delta = 0), so this is task arithmetic. "
                "AWD needs two or more fine-tuned models."
            )
        weights = torch.tensor(
            [p["weight"][e.id] for e in entries], dtype=torch.float64
        )
        W = float(weights.sum())
        scale = p["lambda"]
        if p["normalize"]:
            scale /= W if abs(W) >= 1e-8 else 1.0
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        try:
            result = self._merge(group, name, model_ids, p, weights, W, scale, dtype)
        except Exception:
            if p["scope"] == "global":
                global_scope.forget(group.base.id, model_ids)
            raise
        if not torch.isfinite(result).all():
            raise_nonfinite(
                name,
                labelled(group.base.id, model_ids, [base, *(e.tensor for e in entries)]),
            )
        return result.to(base.dtype)

    def _merge(self, group, name, model_ids, p, weights, W, scale, dtype):
        base = group.base.tensor.to(dtype)
        entries = group.non_base
        selected = is_selected(
            p["select"],
            name,
            base.ndim,
            group.metadata.vocabulary_axis,
            layer_weight_names(group.base.id),
        )
        if not selected:
            if p["others"] == "base":
                return _check_finite_inputs(group, name, model_ids, base)
            return task_arithmetic(base, [e.tensor for e in entries], weights, scale)

        taus = solver.task_vectors(base, [e.tensor for e in entries], dtype)
        if p["scope"] == "global":
            run = global_scope.lookup(group.base.id, model_ids, name, p, base.device)
            solution = run.solution
            delta = run.delta.pop(name, None)
        else:
            G = solver.gram(taus).cpu().numpy()
            solution = global_scope.solve(G, taus[0].numel(), p, [taus])
            delta = solution.delta[0] if solution.delta is not None else None
        if solution.w is not None:
            coeffs = weights - W * torch.from_numpy(solution.w)
            return combine(base, taus, coeffs, scale)
        merged = combine(base, taus, weights, scale)
        if delta is not None:
            merged.sub_(delta.to(merged.device, merged.dtype), alpha=scale * W)
        return merged


def combine(base, taus, coeffs, scale: float) -> torch.Tensor:
    """base + scale * sum_k coeffs_k * tau_k (taus stacked along dim 0)."""
    c = (coeffs * scale).to(device=taus.device, dtype=taus.dtype)
    return base + torch.tensordot(c, taus, dims=1)


def task_arithmetic(base, tensors, weights, scale: float) -> torch.Tensor:
    """mergekit's task arithmetic, one task vector at a time (no K x P stack)."""
    merged = base.clone()
    for tensor, weight in zip(tensors, weights.tolist()):
        merged.add_(tensor.to(base.dtype) - base, alpha=weight * scale)
    return merged


def _check_finite_inputs(group, name, model_ids, base):
    """`others: base` ignores the fine-tunes' values, but not their NaN/Inf."""
    tensors = [group.base.tensor, *(e.tensor for e in group.non_base)]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise_nonfinite(name, labelled(group.base.id, model_ids, tensors))
    return base
