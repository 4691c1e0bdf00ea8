"""The data-free per-tensor merges of 2025, as pure functions of one matrix's task vectors.

Each rule takes the (weighted) task vectors of one weight matrix stacked as
``taus`` (T x m x n, float32 or float64) and returns the merged task vector
M (m x n); the kernel (``data_free.py``) adds ``base + lambda * M``. The
algorithms are those of FusionBench 0.2.33's reference code, cited per rule;
where that code's result depends on how LAPACK picks singular vectors for a zero
singular value (a task vector that is zero on the tensor, or of low rank, as
a LoRA fine-tune's is), the directions that carry nothing are left out here, so
the result is defined (equal to the reference wherever the reference's is).

    k = min(m, n); svd(X) = U diag(s) Vh with k triplets, s descending.
    polar(A) = U Vh of A's thin SVD: the nearest matrix with orthonormal columns
    (rows, for a wide A), the "orthogonal Procrustes" step of TSV-M and Iso-CTS.

Null directions: a singular triplet with s <= s_1 * max(m, n) * eps(dtype)
(numpy's matrix_rank rule) is numerically zero; its vectors are arbitrary.

``progress``, where a rule takes it, is called with the share of the tensor's work
done (0 < f < 1) after each of its long steps (an SVD, a WUDI step): a 1B model's
embedding takes WUDI over an hour on CPU, and the caller says how it goes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Progress = Optional[Callable[[float], None]]


def _said(progress: Progress, done: int, total: int) -> None:
    """``progress`` told that ``done`` of ``total`` parts are done (not at the end)."""
    if progress is not None and 0 < done < total:
        progress(done / total)


def _svd(x: torch.Tensor):
    """Thin SVD; where float32 gesdd fails to converge (it did on a near-orthonormal
    576 x 576 stack in Iso-CTS's polar step on SmolLM2: many repeated singular
    values), the same in float64, cast back."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def rank_cut(s: torch.Tensor, shape) -> int:
    """How many of the descending singular values ``s`` are not numerically zero."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``a`` (U Vh of its thin SVD)."""
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        return a.clone()
    u, _, vh = _svd(a)
    return u @ vh


def recombine(us, ss, vhs) -> torch.Tensor:
    """polar([U_1 .. U_T]) diag([s_1 .. s_T]) polar([Vh_1; ..; Vh_T]): the TSV-M /
    Iso-CTS step that makes the concatenated singular vectors of the tasks
    orthonormal (column permutations commute with it: the order does not matter)."""
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return (polar(u) * s) @ polar(vh)


# -- TSV-M (Gargiulo et al., CVPR 2025; FusionBench compute_and_sum_svd_mem_reduction) --

def tsv_m(taus: torch.Tensor, progress: Progress = None) -> torch.Tensor:
    """Each task's top r = int(k * (1/T)) singular triplets (FusionBench's rounding),
    concatenated; U and Vh replaced by their polar factors; recombined."""
    T, m, n = taus.shape
    r = int(min(m, n) * (1.0 / T))
    us, ss, vhs = [], [], []
    for i, tau in enumerate(taus):
        u, s, vh = _svd(tau)
        keep = min(r, rank_cut(s, (m, n)))
        us.append(u[:, :keep]), ss.append(s[:keep]), vhs.append(vh[:keep])
        _said(progress, i + 1, T + 1)
    return recombine(us, ss, vhs)


# -- Iso-C / Iso-CTS (Marczak et al., 2025; FusionBench iso_c, iso_cts) -----------------

def iso_c(taus: torch.Tensor) -> torch.Tensor:
    """The sum of the task vectors with every one of its k singular values replaced by
    their mean: mean(s) * U Vh (the mean over all k, zeros included, as published)."""
    total = taus.sum(dim=0)
    u, s, vh = _svd(total)
    keep = rank_cut(s, total.shape)
    return (u[:, :keep] * s.mean()) @ vh[:keep]


def common_size(k: int, T: int, fraction: float) -> int:
    """Iso-CTS's common subspace size: int(k * fraction), moved so that the rest splits
    evenly among the T tasks (FusionBench's rounding)."""
    common = int(k * fraction)
    specific = round((k - common) / T) * T
    return max(0, k - specific)


def iso_cts(taus: torch.Tensor, fraction: float, progress: Progress = None) -> torch.Tensor:
    """The top ``common_size`` directions of the sum, plus for each task the top
    (k - common) / T directions of its task vector with the common left space
    projected out; U and Vh made orthonormal (polar); every singular value replaced
    by the mean of the combined ones (over all k slots, as published)."""
    T, m, n = taus.shape
    k = min(m, n)
    common = common_size(k, T, fraction)
    per_task = (k - common) // T
    u, s, vh = _svd(taus.sum(dim=0))
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    _said(progress, 1, T + 2)
    for i, tau in enumerate(taus):
        rest = tau - us[0] @ (us[0].T @ tau)
        ut, st, vht = _svd(rest)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vhs.append(vht[:per_task])
        _said(progress, i + 2, T + 2)
    level = torch.cat(ss).sum() / k  # the mean over the k slots the reference fills
    kept = [min(len(x), rank_cut(x, (m, n))) for x in ss]
    us = [x[:, :c] for x, c in zip(us, kept)]
    vhs = [x[:c] for x, c in zip(vhs, kept)]
    ss = [torch.full((c,), float(level), dtype=taus.dtype, device=taus.device) for c in kept]
    return recombine(us, ss, vhs)


# -- WUDI (Cheng et al., ICML 2025; FusionBench wudi_merging) -----------------------------
#
# min over tau_m of L = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / n_i,  n_i = ||tau_i||_F^2,
# by Adam from tau_m = sum_i tau_i. The reference builds the T x m x m products; its
# gradient is
#     dL/dtau_m = 2 sum_i (tau_m - tau_i) tau_i^T tau_i / n_i = 2 (tau_m A - B),
#     A = sum_i tau_i^T tau_i / n_i  (n x n),   B = sum_i tau_i tau_i^T tau_i / n_i  (m x n),
# B formed once through the smaller side (``_triple``: never an m x m product for a tall
# matrix), so one step costs tau_m A: m n^2 flops, O(m n + n^2) memory. Where n > 2 T m, A has
# rank <= T m and tau_m A = (tau_m C^T) C with C = [tau_i / sqrt(n_i)] (T m x n) costs
# 2 T m^2 n instead: a step costs m n min(n, 2 T m). A task vector that is zero on the
# tensor has no term (the reference divides 0 by 0 and returns NaN).

def wudi_terms(taus: torch.Tensor):
    """(apply, B): ``apply(x)`` = x A in the cheaper exact form, and B."""
    T, m, n = taus.shape
    norms = taus.reshape(T, -1).square().sum(dim=1)
    roots = norms[norms > 0].sqrt()
    live = taus[norms > 0] / roots[:, None, None]  # c_i = tau_i / sqrt(n_i): one copy
    C = live.reshape(-1, n)  # (T' m) x n: A = C^T C
    if n <= 2 * C.shape[0]:
        A = C.T @ C

        def apply(x):
            return x @ A
    else:
        def apply(x):
            return (x @ C.T) @ C
    B = torch.zeros_like(taus[0])
    for c, root in zip(live, roots):  # tau_i tau_i^T tau_i / n_i = sqrt(n_i) c_i c_i^T c_i
        B.add_(_triple(c), alpha=float(root))
    return apply, B


def _triple(c: torch.Tensor) -> torch.Tensor:
    """c c^T c (m x n) through the smaller side: c (c^T c) builds an n x n product
    (2 m n^2 flops), (c c^T) c an m x m one (2 m^2 n): for a 49152 x 576 embedding the
    latter is 9.7 GB, for Llama 3's 128256 x 2048 one 66 GB."""
    if c.shape[0] > c.shape[1]:
        return c @ (c.T @ c)
    return (c @ c.T) @ c


def wudi(taus: torch.Tensor, steps: int, lr: float, progress: Progress = None) -> torch.Tensor:
    """WUDI's tau_m: torch.optim.Adam (betas 0.9/0.999, eps 1e-8, no weight decay, as
    the reference) for ``steps`` steps of learning rate ``lr`` from the sum, with the
    gradient 2 (tau_m A - B) in closed form (no autograd, no T x m x m product)."""
    merged = taus.sum(dim=0)
    if steps == 0:
        return merged
    apply, B = wudi_terms(taus)
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for step in range(steps):
        with torch.no_grad():
            merged.grad = 2.0 * (apply(merged) - B)
        optimizer.step()
        _said(progress, step + 1, steps)
    return merged.detach()


def merged(rule: str, taus: torch.Tensor, progress: Progress = None, **knobs) -> torch.Tensor:
    """RULE ("tsv", "iso_c", "iso_cts" with ``fraction``, "wudi" with ``steps`` and
    ``lr``) of one matrix's stacked task vectors (T x m x n), or of each matrix of a
    stack of them (T x E x m x n, e.g. fused MoE experts) on its own."""
    if taus.ndim == 4:
        E = taus.shape[1]
        return torch.stack([merged(rule, taus[:, e], _part(progress, e, E), **knobs)
                            for e in range(E)])
    if rule == "tsv":
        return tsv_m(taus, progress)
    if rule == "iso_c":
        return iso_c(taus)
    if rule == "iso_cts":
        return iso_cts(taus, knobs["fraction"], progress)
    if rule == "wudi":
        return wudi(taus, knobs["steps"], knobs["lr"], progress)
    raise ValueError(f"unknown data-free rule {rule!r}")


def _part(progress: Progress, e: int, E: int) -> Progress:
    """``progress`` of the whole stack, told from the e-th of its E matrices (the
    matrices before it done; the end of one is said as the stack's share)."""
    if progress is None:
        return None
    _said(progress, e, E)
    return lambda f: progress((e + f) / E)


def average(taus: torch.Tensor) -> torch.Tensor:
    """What every rule does to a tensor that is not a matrix (and to excluded ones):
    the mean of the task vectors, in the reference's running form."""
    mean = taus[0].clone()
    for i in range(1, taus.shape[0]):
        mean += (taus[i] - mean) / (i + 1)
    return mean
