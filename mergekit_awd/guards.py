"""What the kernel refuses or settles that is not AWD itself: NaN/Inf in the
inputs, an output folder that is an input, and recipe parameters the method
does not have (mergekit ignores unknown names silently)."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from mergekit_awd import params, solver
from mergekit_awd.params import AWDInputError


def gram(name: str, group, taus: Optional[torch.Tensor] = None) -> np.ndarray:
    """G of the group's task vectors (from ``taus`` where the caller made them);
    NaN/Inf in an input is refused, naming it (a non-finite G is the cheap sign of
    it), unless the inputs agree there (a -inf mask buffer)."""
    if taus is None:
        G = solver.gram_of(group.base.tensor, [e.tensor for e in group.non_base])
    else:
        G = solver.gram(taus).cpu().numpy()
    if not np.isfinite(G).all():
        if taus is None:
            base = group.base.tensor
            taus = solver.task_vectors(base, [e.tensor for e in group.non_base],
                                       solver.compute_dtype(base))
        if not _repair(group, taus):
            _raise_nonfinite(name, group)
        G = solver.gram(taus).cpu().numpy()
    return G


def _repair(group, taus: torch.Tensor) -> bool:
    """tau_k = 0 where input k equals the base exactly (also both -inf); finite now?"""
    base = group.base.tensor
    for k, entry in enumerate(group.non_base):
        taus[k].masked_fill_(entry.tensor == base, 0.0)
    return bool(torch.isfinite(taus).all())


def finite_task_vectors(name: str, group, taus: torch.Tensor) -> torch.Tensor:
    """``taus`` (the group's, in order), with entries where an input equals the base
    (both -inf: a mask buffer) zeroed; NaN/Inf anywhere else refused, naming the input."""
    if not _finite(taus) and not _repair(group, taus):
        _raise_nonfinite(name, group)
    return taus


def _finite(tensor: torch.Tensor) -> bool:
    """All entries finite (one summing pass; the exact check only if the sum is not)."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def settle_nonfinite(name: str, group, result: torch.Tensor) -> torch.Tensor:
    """NaN/Inf: kept where every input holds the same value (a -inf mask buffer, as
    GPT-NeoX's float16 checkpoints have), refused anywhere else, naming the input."""
    if _finite(result):
        return result
    base = group.base.tensor
    odd = ~torch.isfinite(base)
    for entry in group.non_base:
        odd |= ~torch.isfinite(entry.tensor)
    if not odd.any() and result.is_floating_point():
        raise AWDInputError(
            f"tensor {name}: the merged values overflow {result.dtype} (largest "
            f"finite {torch.finfo(result.dtype).max:g}); no input holds NaN or Inf. "
            f"Lower lambda or the weights, or merge in a wider dtype "
            f"(dtype: float32 in the recipe)"
        )
    agreed = all(torch.equal(e.tensor[odd], base[odd]) for e in group.non_base)
    result = torch.where(odd, base.to(result.dtype), result)
    if not agreed or not torch.isfinite(result[~odd]).all():
        _raise_nonfinite(name, group)
    return result


def refuse_nonfinite_inputs(name: str, group) -> None:
    """Inputs a merge does not use (`others: base`) still may not hold NaN/Inf."""
    for entry in group.non_base:
        if not _finite(entry.tensor):
            settle_nonfinite(name, group, entry.tensor)


def _raise_nonfinite(name: str, group) -> None:
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


def refuse_output_among_inputs(out: Optional[str], input_ids) -> None:
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


def refuse_unknown_parameters(spec, config) -> None:
    """Recipe parameters the method does not have, wherever the recipe puts them."""
    if config is None or getattr(config, "merge_method", None) != spec.name:
        return
    given = {}
    for where, values in params.parameter_blocks(config):
        given.setdefault(where, []).extend(values or {})
    params.check_known(spec.name, (p.name for p in spec.parameters), given)


def check_recipe(spec, run, input_ids) -> None:
    """What a planned task of the plugin's methods refuses before anything is read: an
    output folder among the inputs, parameters the method does not have."""
    if run is not None:
        refuse_output_among_inputs(run.out_path, input_ids)
        refuse_unknown_parameters(spec, run.config)


def validate_with_base(method: str, validate, input_ids, base_id, group_name) -> None:
    """mergekit's input contract (``validate``), its missing-base error said for users."""
    try:
        validate(input_ids, base_id, group_name=group_name)
    except ValueError as error:
        if base_id is None or base_id not in input_ids:
            raise ValueError(
                f"{error}. {method} needs base_model: the pretrained model the fine-tunes "
                f"started from (task vectors are fine-tune minus base). Add "
                f"'base_model: <path or hub id>' to the recipe.") from error
        raise
