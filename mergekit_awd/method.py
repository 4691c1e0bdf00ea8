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
import os
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
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
from mergekit_awd import global_scope, merge_log, params, solver
from mergekit_awd.global_scope import labelled, raise_nonfinite
from mergekit_awd.selection import is_selected, layer_weight_names

LOG = logging.getLogger(__name__)

# Relative units (DESIGN.md §2): one alpha/lr for any model and tensor size.
DEFAULTS = {
    "lambda": 1.0,
    "alpha": 0.001,
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
    """Adaptive Weight Disentanglement (Xiong et al., arXiv 2411.18729).

    With ``sparsification`` set, the disentangled vectors tau_i - delta go
    through mergekit's own sparsification and TIES sign consensus instead of
    plain task arithmetic (`awd_ties`, `awd_dare_ties`; the paper notes that
    AWD composes with such methods).
    """

    def __init__(
        self,
        name: str = "awd",
        *,
        pretty_name: str = "Adaptive Weight Disentanglement",
        sparsification: Optional[SparsificationMethod] = None,
        default_normalize: bool = False,
        default_rescale: bool = False,
    ):
        self.sparsification = sparsification
        defaults = dict(DEFAULTS, normalize=default_normalize)
        extra = ()
        if sparsification is not None:
            extra = (
                ParameterSpec(
                    "density",
                    params.Density,
                    ParameterScope.NON_BASE,
                    default=1.0,
                    description="fraction of each disentangled vector kept",
                ),
                ParameterSpec(
                    "rescale", params.Rescale, ParameterScope.SHARED, default=default_rescale
                ),
                ParameterSpec(
                    "int8_mask", params.Int8Mask, ParameterScope.SHARED, default=False
                ),
            )
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
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
                    for key, value in defaults.items()
                ),
                *extra,
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
        _refuse_output_among_inputs(input_ids)
        try:
            super().validate_inputs(input_ids, base_id, group_name=group_name)
        except ValueError as error:
            if base_id is None or base_id not in input_ids:
                raise ValueError(
                    f"{error}. {self.spec.name} needs base_model: the pretrained "
                    f"model the fine-tunes started from (task vectors are fine-tune "
                    f"minus base). Add 'base_model: <path or hub id>' to the recipe."
                ) from error
            raise

    def merge_group(self, group: TensorGroup, /, **p: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries or not base.is_floating_point():
            return base
        name = group.metadata.name or "<unnamed>"
        model_ids = tuple(e.id for e in entries)
        tensors = [base, *(e.tensor for e in entries)]
        if len(entries) == 1 and not self._warned_single:
            self._warned_single = True
            LOG.warning(
                "awd merges one fine-tune: with a single task vector there is "
                "nothing to disentangle (delta = 0), so this is task arithmetic. "
                "AWD needs two or more fine-tuned models."
            )
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        try:
            result = self._merge(group, name, model_ids, p, dtype)
        except Exception:
            if p["scope"] == "global":
                global_scope.forget(group.base.id, model_ids)
            raise
        if not torch.isfinite(result).all():
            raise_nonfinite(name, labelled(group.base.id, model_ids, tensors))
        return result.to(base.dtype)

    def _merge(self, group, name, model_ids, p, dtype):
        base = group.base.tensor.to(dtype)
        entries = group.non_base
        weights = torch.tensor([p["weight"][e.id] for e in entries], dtype=torch.float64)
        selected = is_selected(
            p["select"],
            name,
            base.ndim,
            group.metadata.vocabulary_axis,
            layer_weight_names(group.base.id),
        )
        if not selected and p["others"] == "base":
            return _check_finite_inputs(group, name, model_ids, base)
        if not selected and self.sparsification is None:
            return task_arithmetic(base, [e.tensor for e in entries], weights, _scale(p, weights))

        taus = solver.task_vectors(base, [e.tensor for e in entries], dtype)
        if not selected:
            return self._ties(base, taus, entries, weights, p)
        if p["scope"] == "global":
            run = global_scope.lookup(group.base.id, model_ids, name, p, base.device)
            global_scope.check_fingerprint(run, name, taus)
            solution = run.solution
            delta = run.delta.pop(name, None)
        else:
            G = solver.gram(taus).cpu().numpy()
            solution = global_scope.solve(G, taus[0].numel(), p, [taus])
            delta = solution.delta[0] if solution.delta is not None else None
            merge_log.record(
                group.base.id,
                model_ids,
                [name],
                weights.tolist(),
                p,
                G,
                global_scope.disentangled(G, solution, [taus]),
                solution,
                taus[0].numel(),
            )
        if self.sparsification is not None:
            return self._ties(base, disentangle(taus, solution.w, delta), entries, weights, p)
        scale = _scale(p, weights)
        W = float(weights.sum())
        if solution.w is not None:
            coeffs = weights - W * torch.from_numpy(solution.w)
            return combine(base, taus, coeffs, scale)
        merged = combine(base, taus, weights, scale)
        if delta is not None:
            merged.sub_(delta.to(merged.device, merged.dtype), alpha=scale * W)
        return merged

    def _ties(self, base, deltas, entries, weights, p) -> torch.Tensor:
        """mergekit's sparsification and sign consensus on (disentangled) task vectors."""
        rescale = RescaleNorm.l1 if p["rescale"] else None
        for k, entry in enumerate(entries):
            deltas[k] = sparsify(
                deltas[k],
                density=p["density"][entry.id],
                method=self.sparsification,
                rescale_norm=rescale,
            )
        w = weights.to(dtype=deltas.dtype, device=deltas.device)
        w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
        deltas.mul_(w)
        mask = get_mask(
            deltas,
            method=ConsensusMethod.sum,
            mask_dtype=torch.int8 if p["int8_mask"] else deltas.dtype,
        )
        mixed = (deltas * mask).sum(dim=0)
        if p["normalize"]:
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
        return base + mixed * p["lambda"]


def _refuse_output_among_inputs(input_ids) -> None:
    """Writing the merge into an input's folder would overwrite what is being read."""
    from mergekit_awd.cli_context import out_path

    out = out_path()
    if not out:
        return
    target = os.path.realpath(out)
    for model in input_ids:
        for part in (getattr(model, "model", None), getattr(model, "lora", None)):
            path = getattr(part, "path", None)
            if path and os.path.isdir(path) and os.path.realpath(path) == target:
                raise ValueError(
                    f"the output folder {out} is the input model {model}: the merge "
                    f"would overwrite the weights it is reading. Choose another "
                    f"output folder."
                )


def _scale(p, weights) -> float:
    """lambda, divided by the sum of weights under `normalize` (as task_arithmetic)."""
    W = float(weights.sum())
    if p["normalize"]:
        return p["lambda"] / (W if abs(W) >= 1e-8 else 1.0)
    return p["lambda"]


def disentangle(taus, w, delta) -> torch.Tensor:
    """tau_k - delta for all k, in place; delta = sum_k w_k tau_k under sgd."""
    if w is not None:
        delta = torch.tensordot(torch.from_numpy(w).to(taus.device, taus.dtype), taus, dims=1)
    if delta is not None:
        taus.sub_(delta.to(taus.device, taus.dtype))
    return taus


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
