"""The data-free per-tensor merges `tsv`, `iso_c`, `iso_cts` and `wudi` as mergekit methods.

Merged tensor, with tau_i = input_i - base and weight_i its per-model weight
(default 1):

    a matrix (2-D; a 3-D tensor is a stack of matrices, e.g. fused MoE experts,
    each merged on its own), unless ``exclude`` names it:
        base + lambda * RULE(weight_1 tau_1, ..., weight_T tau_T)   (``spectral.py``)
    anything else (norms, biases), and excluded matrices:
        base + lambda * mean_i(weight_i tau_i)

as FusionBench 0.2.33's reference code does it (every 2-D tensor by the rule,
embeddings and head included; the others averaged), with ``lambda`` the final
scale (default 1, the published one). ``exclude: vocabulary`` averages the
tensors that mergekit's architecture gives a vocabulary axis (embeddings, LM
head), a regular expression the tensors whose names it matches. One tensor at a
time, on the device mergekit computes on (``--cuda``): 70B merges stream as any
mergekit merge.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
from mergekit_awd import context, guards, params, solver, spectral
from mergekit_awd.params import Settings

RULES = {
    "tsv": ("Task Singular Vectors (TSV-M)", "https://arxiv.org/abs/2412.00081"),
    "iso_c": ("Isotropic merging in common subspace (Iso-C)",
              "https://arxiv.org/abs/2502.04959"),
    "iso_cts": ("Isotropic merging in common and task-specific subspaces (Iso-CTS)",
                "https://arxiv.org/abs/2502.04959"),
    "wudi": ("Whoever Started the Interference Should End It (WUDI)",
             "https://arxiv.org/abs/2503.08099"),
}
SHARED = ("weight", "lambda", "exclude")  # every rule's parameters, besides its own


def declared(rule: str) -> tuple:
    """The parameters of ``rule``, declared once in params.py."""
    return tuple(params.declared(n) for n in SHARED + params.RULE_KNOBS[rule])


def is_matrix(tensor: torch.Tensor) -> bool:
    """What the rule merges: a matrix, or a stack of them (3-D)."""
    return tensor.ndim in (2, 3)


def excluded(exclude: str, name: Optional[str], vocabulary_axis: Optional[int]) -> bool:
    """The `exclude` rule for one tensor."""
    if exclude == "none":
        return False
    if exclude == "vocabulary":
        return vocabulary_axis is not None
    return name is not None and re.search(exclude, name) is not None


def knobs(rule: str, s: Settings) -> dict:
    """The rule's own knobs, as ``spectral.merged`` takes them."""
    if rule == "iso_cts":
        return {"fraction": s.common_space_fraction}
    if rule == "wudi":
        return {"steps": s.wudi_steps, "lr": s.wudi_lr}
    return {}


def merged_delta(rule: str, taus: torch.Tensor, s: Settings, name: Optional[str],
                 vocabulary_axis: Optional[int]) -> torch.Tensor:
    """The merged task vector (before lambda) of one tensor's stacked, weighted task
    vectors ``taus`` (T x shape); the rule's progress said where it runs long."""
    if is_matrix(taus[0]) and not excluded(s.exclude, name, vocabulary_axis):
        progress = tensor_progress(rule, name, taus.shape[1:])
        return spectral.merged(rule, taus, progress, **knobs(rule, s))
    return spectral.average(taus)


class TensorProgress:
    """How one tensor's rule goes, said on stderr: nothing for its first ``after``
    seconds (most tensors form in less), then a line every ``every`` seconds with the
    share done and the time left at the rate since the first step (a rule's set-up,
    e.g. WUDI's A and B, is not a step's cost). A 1B model's embedding takes WUDI
    over an hour on CPU, under a progress bar that counts whole tensors."""

    def __init__(self, what: str, write: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, after: float = 30.0,
                 every: float = 60.0):
        self.what, self.write, self.clock, self.every = what, write, clock, every
        self.start = clock()
        self.due = self.start + after
        self.first: Optional[tuple] = None  # (time, share) of the first step

    def __call__(self, fraction: float) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (now, fraction)
        if now < self.due:
            return
        self.due = now + self.every
        t0, f0 = self.first
        rate = (now - t0) / (fraction - f0) if fraction > f0 else (now - self.start) / fraction
        self.write(f"{self.what}: {100 * fraction:.0f}% done after "
                   f"{duration(now - self.start)}, about {duration(rate * (1 - fraction))} left")


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 45 s, 12 min 5 s, 1 h 16 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _stderr(line: str) -> None:
    """A line above mergekit's progress bar (tqdm's), not through it."""
    import tqdm

    tqdm.tqdm.write(line, file=sys.stderr)


def tensor_progress(rule: str, name: Optional[str], shape) -> Optional[TensorProgress]:
    """The progress of ``rule`` on one tensor, or None under ``--quiet``."""
    run = context.current()
    if run is not None and run.quiet:
        return None
    dims = " x ".join(str(d) for d in shape)
    return TensorProgress(f"{rule}: {name or '<unnamed>'} ({dims})", _stderr)


def weighted(taus: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """weight_i tau_i (in place; the weights' product rounded once)."""
    if any(w != 1.0 for w in weights):
        w = torch.tensor(weights, dtype=taus.dtype, device=taus.device)
        taus.mul_(w.reshape(-1, *([1] * (taus.ndim - 1))))
    return taus


def scaled_delta(rule: str, taus: torch.Tensor, s: Settings, metadata) -> torch.Tensor:
    """lambda * the merged task vector of one tensor's stacked task vectors ``taus``
    (weighted in place), ``metadata`` its mergekit TensorMetadata."""
    taus = weighted(taus, s.weights)
    return s.lam * merged_delta(rule, taus, s, metadata.name, metadata.vocabulary_axis)


class DataFreeMerge(GroupMergeMethod):
    """One of the data-free per-tensor rules (``RULES``) as a mergekit method."""

    def __init__(self, rule: str):
        self.rule = rule
        self.declared = declared(rule)
        pretty, url = RULES[rule]
        self.spec = params.method_spec(rule, pretty, url, self.declared, label=rule)

    def validate_inputs(self, input_ids: Sequence[Any], base_id: Optional[Any] = None, *,
                        group_name: Optional[str] = None) -> None:
        guards.check_recipe(self.spec, context.current(), input_ids)
        guards.validate_with_base(self.rule, super().validate_inputs, input_ids, base_id,
                                  group_name)

    def merge_group(self, group: TensorGroup, /, **p: Any) -> torch.Tensor:
        base = group.base.tensor
        if not group.non_base or not base.is_floating_point():
            return base
        s = Settings.of(p, tuple(e.id for e in group.non_base))
        dtype = solver.compute_dtype(base)
        name = group.metadata.name or "<unnamed>"
        taus = guards.finite_task_vectors(name, group, solver.task_vectors(
            base, [e.tensor for e in group.non_base], dtype))
        result = base.to(dtype) + scaled_delta(self.rule, taus, s, group.metadata)
        return guards.settle_nonfinite(name, group, result).to(base.dtype)
