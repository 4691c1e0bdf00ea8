"""The `awd` merge methods: a mergekit kernel around the solver.

Merged tensor (docs/design.md), with W = sum_i weight_i and scale = lambda
(lambda / W under `normalize`):

    selected:  base + scale * sum_i weight_i * (tau_i - delta) + keep_delta * delta
    others:    mergekit's own method on the raw task vectors (task_arithmetic,
               or ties / dare_ties for awd_ties / awd_dare_ties), or base
               (`others: base`)

Under sgd delta = sum_k w_k tau_k, so the selected case is task arithmetic
with the coefficients scale * (weight_k - W w_k) + keep_delta * w_k. With
sparsification (`awd_ties`, `awd_dare_ties`) the disentangled vectors go
through mergekit's own TIES / DARE-TIES instead of plain task arithmetic.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, List, Optional, Sequence

import numpy as np
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
from mergekit_awd import params, report, running, scope, solver
from mergekit_awd.params import AWDInputError, Settings
from mergekit_awd.selection import is_selected, layer_weight_names

LOG = logging.getLogger(__name__)


class AWDMerge(GroupMergeMethod):
    """Adaptive Weight Disentanglement (Xiong et al., arXiv 2411.18729).

    ``combine_with`` names the mergekit method that combines the (disentangled)
    task vectors: task_arithmetic (the paper), ties or dare_ties.
    """

    def __init__(self, name: str = "awd", *, pretty_name: str = "Adaptive Weight Disentanglement",
                 combine_with: str = "task_arithmetic", default_normalize: bool = False,
                 default_rescale: bool = False):
        self.combine_with = combine_with
        defaults = {"normalize": default_normalize, "rescale": default_rescale}
        declared = params.COMMON + (params.SPARSIFY if combine_with != "task_arithmetic" else ())
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url="https://arxiv.org/abs/2411.18729",
            parameters=tuple(
                ParameterSpec(
                    p.name,
                    p.type,
                    ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED,
                    default=defaults.get(p.name, p.default),
                    description=p.description,
                )
                for p in declared
            ),
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
        )

    # -- planning ---------------------------------------------------------------

    def validate_inputs(self, input_ids: Sequence[Any], base_id: Optional[Any] = None, *,
                        group_name: Optional[str] = None) -> None:
        run = running.run_merge()
        if run is not None:
            _refuse_output_among_inputs(run.out_path, input_ids)
            _refuse_unknown_parameters(self.spec, run.config)
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

    # -- execution --------------------------------------------------------------

    def merge_group(self, group: TensorGroup, /, **p: Any) -> torch.Tensor:
        """One group, as mergekit hands it over (already in its dtype)."""
        return self.merge_aligned(group, p, scope.IN_MEMORY.get())

    def _execute(self, groups, parameters: List[dict], options, *, input_dtypes,
                 out_dtype=None):
        """mergekit's own loop over the groups; with its in-memory API (no planned
        task running) the groups handed over are the whole merge, solved first."""
        if running.current_task() is not None:
            return super()._execute(groups, parameters, options,
                                    input_dtypes=input_dtypes, out_dtype=out_dtype)
        state = scope.MergeState()
        if any(p["scope"] == "global" for p in parameters):
            state.global_solution(lambda: scope.collect(lambda: super(AWDMerge, self)._execute(
                groups, parameters, options, input_dtypes=input_dtypes)))
        token = scope.IN_MEMORY.set(state)
        try:
            results = super()._execute(groups, parameters, options,
                                       input_dtypes=input_dtypes, out_dtype=out_dtype)
        finally:
            scope.IN_MEMORY.reset(token)
        state.finish()
        return results

    def merge_aligned(self, group: TensorGroup, p: dict,
                      state: Optional[scope.MergeState]) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries or not base.is_floating_point():
            return base
        name = group.metadata.name or "<unnamed>"
        model_ids = tuple(e.id for e in entries)
        s = Settings.of(p, model_ids)
        selected = is_selected(s.select, name, base.ndim, group.metadata.vocabulary_axis,
                               layer_weight_names(group.base.id))
        dtype = _compute_dtype(base)
        collecting = scope.COLLECTING.get()
        if collecting is not None:  # a Gram pass: record, do not merge
            if selected:
                taus = solver.task_vectors(base, [e.tensor for e in entries], dtype)
                collecting.add(name, model_ids, s, taus, _gram(name, group, taus))
            return base.new_zeros(()).expand(base.shape)  # a placeholder: no memory
        executor = None
        if state is None:
            state, executor = scope.state_of_running_merge()
        if state is not None:
            state.warn_once_if(
                len(entries) == 1,
                "awd merges one fine-tune: with a single task vector there is "
                "nothing to disentangle (delta = 0), so this is task arithmetic. "
                "AWD needs two or more fine-tuned models.",
            )
            set_in_recipe = state.recipe_parameters
            explicit = ("lambda" in set_in_recipe if set_in_recipe is not None
                        else s.lam != 1.0)
            warning = report.lambda_warning(self.spec.name, s.lam, s.weights,
                                            s.normalize, explicit)
            state.warn_once_if(warning is not None, warning)
        if not selected:
            result = self._others(group, s)
        else:
            result = self._disentangled(group, name, model_ids, s, state, executor, dtype)
        return _settle_nonfinite(name, group, result).to(base.dtype)

    def _others(self, group: TensorGroup, s: Settings) -> torch.Tensor:
        """Tensors not disentangled: the base, or mergekit's own method."""
        if s.others == "base":  # the fine-tunes are not used, but NaN/Inf in them refused
            for entry in group.non_base:
                if not _finite(entry.tensor):
                    _settle_nonfinite(group.metadata.name, group, entry.tensor)
            return group.base.tensor
        return self._mergekit(group.base.tensor, [e.tensor for e in group.non_base], s)

    def _disentangled(self, group, name, model_ids, s: Settings, state, executor, dtype):
        """A selected tensor: solve (or look up) delta, then combine tau_k - delta."""
        base = group.base.tensor.to(dtype)
        taus = solver.task_vectors(base, [e.tensor for e in group.non_base], dtype)
        if s.scope == "global" and state is not None:
            solved = state.global_solution(lambda: self._gram_pass(executor, state), s,
                                           model_ids)
            w, delta = solved.delta_for(name)
            return self._combine(base, taus, w, delta, s)
        G = _gram(name, group, taus)
        solution = scope.solve(G, taus[0].numel(), s, [taus])
        w, delta = solution.w, solution.delta[0] if solution.delta is not None else None
        if state is not None:
            H = scope.disentangled(G, solution, [taus])
            state.log.add(model_ids, s, [name], G, H, solution, taus[0].numel())
        return self._combine(base, taus, w, delta, s)

    def _combine(self, base, taus, w, delta, s: Settings) -> torch.Tensor:
        """base + the (TIES-/DARE-) combination of tau_k - delta (+ keep_delta * delta)."""
        if self.combine_with == "task_arithmetic":
            return awd_task_arithmetic(base, taus, w, delta, s)
        if w is not None:
            delta = combine(torch.zeros_like(base), taus, torch.from_numpy(w), 1.0)
        hat = taus - delta.to(taus.device, taus.dtype) if delta is not None else taus
        merged = base + self._mergekit(torch.zeros_like(base), list(hat.unbind(0)), s)
        if delta is not None and s.keep_delta:
            merged.add_(delta.to(merged.device, merged.dtype), alpha=s.keep_delta)
        return merged

    def _gram_pass(self, executor, state):
        return scope.collect_tasks(
            self.spec.name,
            executor.universe.tasks,
            executor.math_device,
            executor.storage_device,
            quiet=state.run.quiet if state.run else False,
        )

    def _mergekit(self, base: torch.Tensor, tensors: List[torch.Tensor], s: Settings):
        """mergekit's own task_arithmetic / ties / dare_ties on these inputs.

        In float32 at least: mergekit's methods compute in the inputs' dtype, and
        bf16 task vectors (differences of nearby bf16 numbers) lose most of their bits.
        """
        from mergekit.merge_methods.api import merge_tensors

        parameters = {"weight": list(s.weights), "lambda": s.lam, "normalize": s.normalize}
        if self.combine_with != "task_arithmetic":
            parameters.update(density=list(s.densities), rescale=s.rescale,
                              int8_mask=s.int8_mask)
        return merge_tensors([base, *tensors], self.combine_with, parameters=parameters,
                             base_index=0, dtype=_compute_dtype(base))


def awd_task_arithmetic(base, taus, w, delta, s: Settings) -> torch.Tensor:
    """base + scale * sum_k weight_k (tau_k - delta) + keep_delta * delta.

    Under sgd delta = sum_k w_k tau_k, so this is one combination of the taus
    with coefficients scale * weight_k + (keep_delta - scale * W) * w_k.
    """
    W, scale = sum(s.weights), _scale(s)
    weights = torch.tensor(s.weights, dtype=torch.float64)
    if w is not None:
        coeffs = scale * weights + (s.keep_delta - scale * W) * torch.from_numpy(w)
        return combine(base, taus, coeffs, 1.0)
    merged = combine(base, taus, weights, scale)
    if delta is not None:
        merged.add_(delta.to(merged.device, merged.dtype), alpha=s.keep_delta - scale * W)
    return merged


def combine(base, taus, coeffs, scale: float) -> torch.Tensor:
    """base + scale * sum_k coeffs_k * tau_k (taus stacked along dim 0)."""
    c = (coeffs * scale).to(device=taus.device, dtype=taus.dtype)
    return base + torch.tensordot(c, taus, dims=1)


def _scale(s: Settings) -> float:
    """lambda, divided by the sum of weights under `normalize` (as task_arithmetic)."""
    W = sum(s.weights)
    if s.normalize:
        return s.lam / (W if abs(W) >= 1e-8 else 1.0)
    return s.lam


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 at least (float64 stays float64), whatever the inputs' dtype."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _gram(name: str, group: TensorGroup, taus: torch.Tensor) -> np.ndarray:
    """G of the task vectors; NaN/Inf in an input is refused, naming it (a non-finite
    G is the cheap sign of it), unless the inputs agree there (a -inf mask buffer)."""
    G = solver.gram(taus).cpu().numpy()
    if not np.isfinite(G).all():
        if not _repair(group, taus):
            _raise_nonfinite(name, group)
        G = solver.gram(taus).cpu().numpy()
    return G


def _repair(group: TensorGroup, taus: torch.Tensor) -> bool:
    """tau_k = 0 where input k equals the base exactly (also both -inf); finite now?"""
    base = group.base.tensor
    for k, entry in enumerate(group.non_base):
        taus[k].masked_fill_(entry.tensor == base, 0.0)
    return bool(torch.isfinite(taus).all())


def _finite(tensor: torch.Tensor) -> bool:
    """All entries finite (one summing pass; the exact check only if the sum is not)."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _settle_nonfinite(name: str, group: TensorGroup, result: torch.Tensor) -> torch.Tensor:
    """NaN/Inf: kept where every input holds the same value (a -inf mask buffer, as
    GPT-NeoX's float16 checkpoints have), refused anywhere else, naming the input."""
    if _finite(result):
        return result
    base = group.base.tensor
    odd = ~torch.isfinite(base)
    for entry in group.non_base:
        odd |= ~torch.isfinite(entry.tensor)
    agreed = all(torch.equal(e.tensor[odd], base[odd]) for e in group.non_base)
    result = torch.where(odd, base.to(result.dtype), result)
    if not agreed or not torch.isfinite(result[~odd]).all():
        _raise_nonfinite(name, group)
    return result


def _raise_nonfinite(name: str, group: TensorGroup) -> None:
    """Name the input(s) holding NaN/Inf in tensor ``name``."""
    bad = [
        f"{e.id} (base)" if e.is_base else str(e.id)
        for e in group.entries
        if not torch.isfinite(e.tensor).all()
    ]
    where = ", ".join(bad) if bad else "the computed task vectors (overflow)"
    raise AWDInputError(
        f"tensor {name} contains NaN or Inf in model {where}; fix or drop that "
        f"model, merging it would spread NaN/Inf into the output"
    )


def _refuse_output_among_inputs(out: Optional[str], input_ids) -> None:
    """Writing the merge into an input's folder would overwrite what is being read."""
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


def _refuse_unknown_parameters(spec: MergeMethodSpec, config) -> None:
    """Recipe parameters the method does not have, wherever the recipe puts them."""
    if config is None or getattr(config, "merge_method", None) != spec.name:
        return
    given = {}
    for where, values in params.parameter_blocks(config):
        given.setdefault(where, []).extend(values or {})
    params.check_known(spec.name, (p.name for p in spec.parameters), given)
