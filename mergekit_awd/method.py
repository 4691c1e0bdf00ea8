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

from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
from mergekit_awd import context, data_free, guards, mergekit_run, params, report, scope, solver
from mergekit_awd.params import Settings
from mergekit_awd.selection import is_selected, layer_weight_names



class AWDMerge(GroupMergeMethod):
    """Adaptive Weight Disentanglement (Xiong et al., arXiv 2411.18729).

    ``combine_with`` names the mergekit method that combines the (disentangled)
    task vectors: task_arithmetic (the paper), ties or dare_ties. The parameters
    that method has default as there (``normalize: true`` under ties).
    """

    def __init__(self, name: str = "awd", *, pretty_name: str = "Adaptive Weight Disentanglement",
                 combine_with: str = "task_arithmetic"):
        from mergekit import merge_methods

        self.combine_with = combine_with
        theirs = {p.name: p for p in merge_methods.get(combine_with).spec.parameters}
        self.declared = combined_parameters(combine_with, theirs)
        self.defaults = {p.name: theirs[p.name].default for p in self.declared
                         if p.name in theirs and not theirs[p.name].required
                         and theirs[p.name].default is not None}
        self.spec = params.method_spec(name, pretty_name, "https://arxiv.org/abs/2411.18729",
                                       self.declared)

    # -- planning ---------------------------------------------------------------

    def validate_inputs(self, input_ids: Sequence[Any], base_id: Optional[Any] = None, *,
                        group_name: Optional[str] = None) -> None:
        run = context.current()
        guards.check_recipe(self.spec, run, input_ids)
        if run is not None:
            if run.planned and run.recorder() is None:
                inputs = mergekit_run.current_inputs()  # executing, not planning
                if inputs is not None and not all(
                        t.is_floating_point() for t in inputs.values()):
                    run.tensor_merged()  # a buffer: mergekit copies it, no kernel call
        guards.validate_with_base(self.spec.name, super().validate_inputs, input_ids,
                                  base_id, group_name)

    # -- execution --------------------------------------------------------------

    def __call__(self, groups, /, **kwargs):
        """mergekit's in-memory API (merge_tensors / merge_state_dicts): the groups
        handed over are the whole merge, so they are its Gram pass too."""
        run = context.RunContext()
        run.gram_pass = lambda: scope.collect(run, lambda: super(AWDMerge, self).__call__(
            groups, **kwargs))
        with run.active():
            results = super().__call__(groups, **kwargs)
        run.finish()
        return results

    def merge_group(self, group: TensorGroup, /, **p: Any) -> torch.Tensor:
        """One group, as mergekit hands it over (already in its dtype)."""
        run = context.current()
        recorder = run.recorder() if run is not None else None
        if isinstance(recorder, scope.AffineMaps):  # how it depends on the weights
            return self._record_map(group, p, recorder, run)
        if recorder is not None:  # a Gram pass: record, do not merge
            return self._record(group, p, recorder, run)
        result = self._merge(group, p, run)
        if run is not None:
            run.tensor_merged()
        return result

    def _settings(self, group: TensorGroup, p: dict, run):
        """(name, model ids, settings, selected?) of one group."""
        model_ids = tuple(e.id for e in group.non_base)
        s = Settings.of(p, model_ids, self.defaults)
        name = group.metadata.name or "<unnamed>"
        remote = getattr(run.options, "trust_remote_code", None) if run is not None else None
        selected = is_selected(s.select, name, group.base.tensor.ndim,
                               group.metadata.vocabulary_axis,
                               layer_weight_names(group.base.id, remote))
        return name, model_ids, s, selected

    def _record(self, group: TensorGroup, p: dict, recorder, run) -> torch.Tensor:
        base = group.base.tensor
        if group.non_base and base.is_floating_point():
            name, model_ids, s, selected = self._settings(group, p, run)
            if selected:
                taus = (solver.task_vectors(base, [e.tensor for e in group.non_base],
                                            solver.compute_dtype(base))
                        if recorder.keeps_taus(s) else None)
                recorder.add(name, model_ids, s, base.numel(),
                             guards.gram(name, group, taus), taus)
        return base.new_zeros(()).expand(base.shape)  # a placeholder: no memory

    def _record_map(self, group: TensorGroup, p: dict, maps, run) -> torch.Tensor:
        """The tensor's (a, M) (``scope.AffineMaps``) instead of the merge."""
        base = group.base.tensor
        if group.non_base and base.is_floating_point():
            name, model_ids, s, selected = self._settings(group, p, run)
            maps.maps[name] = self.affine_map(group, name, model_ids, s, selected, run)
        return base.new_zeros(()).expand(base.shape)

    def affine_map(self, group, name, model_ids, s: Settings, selected: bool, run):
        """(a, M) such that this tensor's merge is base + sum_j (a_j + sum_k weight_k
        M[k, j]) tau_j, where it is a weighted sum of task vectors with the per-model
        weights factored out (M holds lambda; normalize, which divides by the weights'
        sum, is not affine in them). Refused where the merge is not such a sum."""
        K = len(model_ids)
        if s.normalize:
            raise params.AWDParameterError(
                f"{self.spec.name}: normalize divides by the sum of the weights, so "
                f"the merge is not linear in them; learn with normalize: false")
        if not selected:
            if s.others == "base":
                return np.zeros(K), np.zeros((K, K))
            if self.combine_with == "task_arithmetic":
                return np.zeros(K), s.lam * np.eye(K)
        elif self.combine_with == "task_arithmetic" and s.optimizer == "sgd":
            w, _ = self._solution(group, name, model_ids, s, run, None)
            return awd_affine(w, s)
        why = ("optimizer: adam's delta is not in their span"
               if self.combine_with == "task_arithmetic"
               else f"{self.combine_with}'s SVD or optimisation depends on the weights"
               if self.combine_with in data_free.RULES
               else "TIES's sign election depends on the weights")
        raise params.AWDParameterError(
            f"{self.spec.name} (tensor {name}): the merge is not a weighted sum of "
            f"task vectors ({why})")

    def _merge(self, group: TensorGroup, p: dict, run) -> torch.Tensor:
        base = group.base.tensor
        if not group.non_base or not base.is_floating_point():
            return base
        name, model_ids, s, selected = self._settings(group, p, run)
        if run is not None:
            self._warn(run, s)
        if not selected:
            result = self._others(group, s)
        else:
            result = self._disentangled(group, name, model_ids, s, run)
        return guards.settle_nonfinite(name, group, result).to(base.dtype)

    def _warn(self, run, s: Settings) -> None:
        run.warn_once_if(
            len(s.weights) == 1,
            "awd merges one fine-tune: with a single task vector there is "
            "nothing to disentangle (delta = 0), so this is task arithmetic. "
            "AWD needs two or more fine-tuned models.",
        )
        if self.combine_with in data_free.RULES:  # lambda 1 is their published default
            return
        warning = report.lambda_warning(self.spec.name, s.lam, s.weights, s.normalize,
                                        explicit="lambda" in s.given)
        run.warn_once_if(warning is not None, warning)

    def _others(self, group: TensorGroup, s: Settings) -> torch.Tensor:
        """Tensors not disentangled: the base, or mergekit's own method."""
        if s.others == "base":  # the fine-tunes are not used, but NaN/Inf in them refused
            guards.refuse_nonfinite_inputs(group.metadata.name, group)
            return group.base.tensor
        base, inputs = group.base.tensor, [e.tensor for e in group.non_base]
        if self.combine_with in data_free.RULES:
            dtype = solver.compute_dtype(base)
            return base.to(dtype) + data_free.scaled_delta(
                self.combine_with, solver.task_vectors(base, inputs, dtype), s, group.metadata)
        return self._mergekit(base, inputs, s)

    def _disentangled(self, group, name, model_ids, s: Settings, run):
        """A selected tensor: solve (or look up) delta, then combine tau_k - delta."""
        base, inputs = group.base.tensor, [e.tensor for e in group.non_base]
        dtype = solver.compute_dtype(base)
        # the task vectors themselves only where delta is a full-space vector (adam)
        # or sparsification needs them; else G and the combination read the inputs
        taus = None
        if s.optimizer == "adam" or self.combine_with != "task_arithmetic":
            taus = solver.task_vectors(base, inputs, dtype)
        w, delta = self._solution(group, name, model_ids, s, run, taus)
        if self.combine_with == "task_arithmetic" and w is not None:
            return solver.combination(base, inputs, awd_coefficients(w, s), dtype)
        if taus is None:
            taus = solver.task_vectors(base, inputs, dtype)
        return self._combine(base.to(dtype), taus, w, delta, s, group.metadata)

    def _solution(self, group, name, model_ids, s: Settings, run, taus):
        """(w, delta) of this tensor's scope: the global solve, or its own."""
        if s.scope == "global":
            if run is None:
                run = context.RunContext()  # nothing to read the scope from: it says so
            return run.global_solution(s, model_ids).delta_for(name)
        G = guards.gram(name, group, taus)
        solution = (run or context.RunContext()).solve(
            model_ids, s, [name], G, group.base.tensor.numel(), [taus])
        return solution.w, solution.delta[0] if solution.delta is not None else None

    def _combine(self, base, taus, w, delta, s: Settings, metadata) -> torch.Tensor:
        """base + the (TIES-/DARE-) combination of tau_k - delta (+ keep_delta * delta)."""
        if self.combine_with == "task_arithmetic":
            return awd_task_arithmetic(base, taus, delta, s)
        if w is not None:
            delta = combine(torch.zeros_like(base), taus, torch.from_numpy(w), 1.0)
        hat = taus - delta.to(taus.device, taus.dtype) if delta is not None else taus
        if self.combine_with in data_free.RULES:  # the rule on hat itself (no copy)
            merged = base + data_free.scaled_delta(self.combine_with, hat, s, metadata)
        else:
            merged = base + self._mergekit(torch.zeros_like(base), list(hat.unbind(0)), s)
        if delta is not None and s.keep_delta:
            merged.add_(delta.to(merged.device, merged.dtype), alpha=s.keep_delta)
        return merged

    def _mergekit(self, base: torch.Tensor, tensors: List[torch.Tensor], s: Settings):
        """mergekit's own task_arithmetic / ties / dare_ties on these inputs.

        In float32 at least: mergekit's methods compute in the inputs' dtype, and
        bf16 task vectors (differences of nearby bf16 numbers) lose most of their bits.
        """
        from mergekit.merge_methods.api import merge_tensors

        from mergekit import merge_methods

        theirs = {p.name for p in merge_methods.get(self.combine_with).spec.parameters}
        parameters = {p.name: s.value(p.name) for p in self.declared if p.name in theirs}
        return merge_tensors([base, *tensors], self.combine_with, parameters=parameters,
                             base_index=0, dtype=solver.compute_dtype(base))


def combined_parameters(combine_with: str, theirs) -> tuple:
    """AWD's parameters, and those of the method combining the disentangled vectors
    (TIES's / DARE's sparsification, a data-free rule's knobs); normalize only where
    that method has it."""
    if combine_with in data_free.RULES:
        common = tuple(p for p in params.COMMON if p.name != "normalize")
        return common + tuple(p for p in data_free.declared(combine_with)
                              if p not in params.COMMON)
    return params.COMMON + (params.SPARSIFY if combine_with != "task_arithmetic" else ())


def awd_coefficients(w: np.ndarray, s: Settings) -> torch.Tensor:
    """Under sgd delta = sum_k w_k tau_k, so base + scale * sum_k weight_k (tau_k -
    delta) + keep_delta * delta is one combination of the taus, with coefficients
    scale * weight_k + (keep_delta - scale * W) * w_k."""
    W, scale = sum(s.weights), coefficient_scale(s)
    weights = torch.tensor(s.weights, dtype=torch.float64)
    return scale * weights + (s.keep_delta - scale * W) * torch.from_numpy(w)


def awd_affine(w: np.ndarray, s: Settings):
    """``awd_coefficients`` with the weights factored out (normalize off): the
    coefficients are a + weights @ M, a = keep_delta * w, M[k, j] = lambda *
    ([k == j] - w_j): weight_k scales tau_k - delta, delta = sum_j w_j tau_j."""
    w = np.asarray(w, dtype=np.float64)
    return s.keep_delta * w, s.lam * (np.eye(len(w)) - w[None, :])


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
