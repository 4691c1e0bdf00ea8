"""The `awd` merge methods: a mergekit kernel around the solver.

One tensor group: its settings and whether it is selected (``selection.py``), the
solve or its share of the global one (``context.py``, ``solver.py``), then the
combination of tau_k - delta (``combination.py``, where the formula is). In a Gram
pass, or for --learn's affine maps, the kernel records instead (``recording.py``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
from mergekit_awd import (combination, context, data_free, guards, mergekit_run, params,
                          recording, report, scope)
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
        """One group, as mergekit hands it over (already in its dtype): its settings,
        then (in a Gram pass, or for --learn's affine maps) a record and no merge, or
        the merge of the selected tensor (tau_k - delta) or of another."""
        run = context.current()
        base = group.base.tensor
        mergeable = bool(group.non_base) and base.is_floating_point()
        settled = self.settings(group, p, run) if mergeable else None
        recorder = run.recorder() if run is not None else None
        if recorder is not None:  # a Gram pass, or --learn's affine maps: no merge
            return recording.record(self, group, settled, recorder, run)
        result = base
        if settled is not None:
            name, model_ids, s, selected = settled
            if run is not None:
                warn(run, self.spec.name, self.combine_with, s)
            if not selected:
                result = combination.others(self.combine_with, self.declared, group, s)
            else:
                result = combination.disentangled(
                    self.combine_with, self.declared, group, s,
                    lambda taus: context.solution(run, group, name, model_ids, s, taus))
            result = guards.settle_nonfinite(name, group, result).to(base.dtype)
        if run is not None:
            run.tensor_merged()  # after the merge: the last one writes the report
        return result

    def settings(self, group: TensorGroup, p: dict, run):
        """(name, model ids, settings, selected?) of one group."""
        model_ids = tuple(e.id for e in group.non_base)
        s = Settings.of(p, model_ids, self.defaults)
        name = group.metadata.name or "<unnamed>"
        remote = getattr(run.options, "trust_remote_code", None) if run is not None else None
        selected = is_selected(s.select, name, group.base.tensor.ndim,
                               group.metadata.vocabulary_axis,
                               layer_weight_names(group.base.id, remote))
        return name, model_ids, s, selected


def warn(run, name: str, combine_with: str, s: Settings) -> None:
    """The recipe's warnings, once per run: one fine-tune; a lambda off its scale."""
    run.warn_once_if(
        len(s.weights) == 1,
        "awd merges one fine-tune: with a single task vector there is "
        "nothing to disentangle (delta = 0), so this is task arithmetic. "
        "AWD needs two or more fine-tuned models.",
    )
    if combine_with in data_free.RULES:  # lambda 1 is their published default
        return
    warning = report.lambda_warning(name, s.lam, s.weights, s.normalize,
                                    explicit="lambda" in s.given)
    run.warn_once_if(warning is not None, warning)


def combined_parameters(combine_with: str, theirs) -> tuple:
    """AWD's parameters, and those of the method combining the disentangled vectors
    (TIES's / DARE's sparsification, a data-free rule's knobs); normalize only where
    that method has it."""
    if combine_with in data_free.RULES:
        common = tuple(p for p in params.COMMON if p.name != "normalize")
        return common + tuple(p for p in data_free.declared(combine_with)
                              if p not in params.COMMON)
    return params.COMMON + (params.SPARSIFY if combine_with != "task_arithmetic" else ())
