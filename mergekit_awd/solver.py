"""AWD's objective and solvers, as pure math on plain tensors (no mergekit, no I/O).

Notation follows the paper (Xiong et al., arXiv 2411.18729) and docs/design.md:
tau_k are the task vectors (the K rows of T), delta is the redundant vector,
the disentangled vectors are tau_k - delta, and

    L(delta) = L_O + alpha * L_R
    L_O = 1/(K(K-1)) * sum_{i != j} |cos(tau_i - delta, tau_j - delta)|
    L_R = ||delta||_2

Plain gradient descent from delta = 0 never leaves span{tau_k}, so with
delta = T^T w every quantity is a function of the K x K Gram matrix G = T T^T
and Algorithm 1 runs exactly in R^K (``sgd_gram``). Adam scales each element
separately and leaves the span, so it needs the full-space solver
(``adam_full``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

def task_vectors(base: torch.Tensor, tensors, dtype: torch.dtype) -> torch.Tensor:
    """tau_k = tensors[k] - base, stacked (K x base.shape) in ``dtype``, one allocation."""
    base = base.to(dtype)
    taus = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for k, tensor in enumerate(tensors):
        torch.sub(tensor.to(dtype), base, out=taus[k])
    return taus


# Elements of each input (or task vector) taken at a time by G and the
# combination on a CPU: the K float64 rows of a chunk stay in a core's cache. On a
# GPU the chunk is large (launches cost more than cache misses). float64 matters:
# plain GD on |cos| oscillates around its kinks, so after ~1000 steps a 1e-8
# error in G (float32 partial sums) grows to ~1e-5 in delta.
FUSED_CHUNK = 65536
FUSED_CHUNK_CUDA = 1 << 22  # K float64 rows: 128 MiB at K = 4 (not measured on a GPU)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 at least (float64 stays float64), whatever the inputs' dtype."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunk(base: torch.Tensor, chunk: Optional[int]) -> int:
    step = chunk or (FUSED_CHUNK_CUDA if base.is_cuda else FUSED_CHUNK)
    return max(1, min(step, base.numel()))


def _spans(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(step, n - start)


def _gram_from(chunks, K: int, device, dots: bool) -> np.ndarray:
    """sum over ``chunks`` (K x m float64) of x x^T: the K(K+1)/2 dot products
    (``dots``, on a CPU: torch's ddot on contiguous rows) or one addmm (on a GPU,
    where launches cost more). For K x K outputs a CPU GEMM is the slow way, and
    numpy's BLAS is worse still here: its threads and torch's take turns spinning
    (measured on one 2.9M x 4 bf16 tensor: 0.48 s vs 0.03 s)."""
    G = np.zeros((K, K)) if dots else torch.zeros((K, K), dtype=torch.float64,
                                                   device=device)
    for x in chunks:
        if not dots:
            G.addmm_(x, x.T)
            continue
        for i in range(K):
            for j in range(i, K):
                G[i, j] += float(torch.dot(x[i], x[j]))
    return np.triu(G) + np.triu(G, 1).T if dots else G.cpu().numpy()


def gram(taus: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """G = T T^T of K stacked vectors (any trailing shape), in float64, one chunk
    converted at a time (no K x P float64 copy); a K x K tensor on taus' device."""
    flat = taus.reshape(taus.shape[0], -1)
    step = _chunk(flat[0], chunk)
    chunks = (flat[:, start:start + m].to(torch.float64)
              for start, m in _spans(flat.shape[1], step))
    G = _gram_from(chunks, flat.shape[0], flat.device, dots=not flat.is_cuda)
    return torch.from_numpy(G).to(flat.device)


def gram_of(base: torch.Tensor, tensors: Sequence[torch.Tensor],
            chunk: Optional[int] = None, dots: Optional[bool] = None) -> np.ndarray:
    """G of tau_k = tensors[k] - base (float64, K x K), without the K x P stack:
    ``gram(task_vectors(...))`` fused, each chunk's differences straight into a
    float64 buffer (exact for bf16 / fp16 / fp32 inputs). ``dots``: how the chunks
    are summed (``_gram_from``; default: dot products on a CPU, addmm on a GPU)."""
    K = len(tensors)
    b = base.reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    step = _chunk(b, chunk)
    T = torch.empty((K, step), dtype=torch.float64, device=b.device)
    b64 = torch.empty(step, dtype=torch.float64, device=b.device)

    def chunks():
        for start, m in _spans(b.numel(), step):
            b64[:m].copy_(b[start:start + m])
            for k, f in enumerate(flat):
                torch.sub(f[start:start + m], b64[:m], out=T[k, :m])
            yield T[:, :m]

    return _gram_from(chunks(), K, b.device, dots=not b.is_cuda if dots is None else dots)


def combination(base: torch.Tensor, tensors: Sequence[torch.Tensor], coeffs: Sequence[float],
                dtype: torch.dtype, chunk: Optional[int] = None) -> torch.Tensor:
    """base + sum_k coeffs_k (tensors[k] - base), computed in ``dtype`` one chunk at a
    time and returned (contiguous) in the base's dtype: the K x P task vectors are
    never made. Per element the float operations of ``base + sum_k coeffs_k tau_k``
    in ``dtype``, rounded once to the output dtype (mergekit's task_arithmetic
    computes bf16 inputs in bf16)."""
    b = base.reshape(-1)
    flat = [t.reshape(-1) if torch.promote_types(t.dtype, dtype) == dtype
            else t.reshape(-1).to(dtype) for t in tensors]  # a wider input: as task_vectors
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    o = out.view(-1)
    step = _chunk(b, chunk)
    bc, acc, tmp = (torch.empty(step, dtype=dtype, device=b.device) for _ in range(3))
    coeffs = [float(c) for c in coeffs]
    for start, m in _spans(b.numel(), step):
        bc[:m].copy_(b[start:start + m])
        acc[:m].copy_(bc[:m])
        for c, f in zip(coeffs, flat):
            torch.sub(f[start:start + m], bc[:m], out=tmp[:m])
            acc[:m].add_(tmp[:m], alpha=c)
        o[start:start + m].copy_(acc[:m])
    return out


def scale_of(G: np.ndarray) -> float:
    """s = sqrt(mean_k ||tau_k||^2): the unit of `units: relative`."""
    return math.sqrt(max(float(np.mean(np.diag(G))), 0.0))


def raw_hyperparameters(
    alpha: float,
    lr: float,
    *,
    units: str,
    optimizer: str,
    s: float,
    numel: int,
) -> tuple:
    """Convert (alpha, lr) to raw units (docs/design.md, "Units").

    cos is scale invariant but ||delta|| and the plain-GD step are not:
    alpha_raw = alpha_rel / s, lr_raw(sgd) = lr_rel * s^2, and for Adam, whose
    steps are per element, lr_raw = lr_rel * (RMS entry of tau) = lr_rel * s / sqrt(P).
    With s = 0 (all task vectors zero) there is nothing to solve; the raw values
    are returned unchanged.
    """
    if units == "raw" or s == 0.0:
        return alpha, lr
    alpha_raw = alpha / s
    if optimizer == "sgd":
        return alpha_raw, lr * s * s
    return alpha_raw, lr * s / math.sqrt(max(numel, 1))


def cosine_matrix(H: np.ndarray) -> np.ndarray:
    """cos_ij from inner products H_ij; a zero vector has cosine 0 with everything."""
    n = np.sqrt(np.clip(np.diag(H), 0.0, None))
    inv = np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)
    return H * inv[:, None] * inv[None, :]


def disentangled_inner(G: np.ndarray, w: np.ndarray) -> np.ndarray:
    """<tau_i - delta, tau_j - delta> for delta = sum_k w_k tau_k, from G alone."""
    Gw = G @ w
    return G - Gw[:, None] - Gw[None, :] + float(w @ Gw)


def active_tasks(G: np.ndarray) -> np.ndarray:
    """Task vectors that have a direction (nonzero norm).

    A zero task vector (a "fine-tune" equal to its base) has no cosine with
    anything, and the gradient of cos(tau_j - delta, -delta) grows like
    1/||delta||, which throws plain GD out of its first steps. It is left out
    of L_O (it still receives -delta in the merge).
    """
    d = np.diag(G)
    top = float(d.max()) if d.size else 0.0
    return d > 1e-12 * top if top > 0 else np.zeros(d.shape, dtype=bool)


def pair_weights(active: np.ndarray) -> np.ndarray:
    """Weights of |cos_ij| in L_O: 1/(K(K-1)) for ordered pairs of active tasks."""
    K = int(active.sum())
    M = np.outer(active, active).astype(np.float64)
    np.fill_diagonal(M, 0.0)
    return M / (K * (K - 1)) if K >= 2 else M


def mean_abs_offdiag(C: np.ndarray, M: Optional[np.ndarray] = None) -> float:
    """L_O for a cosine matrix: mean |cos| over ordered pairs i != j."""
    if M is None:
        M = pair_weights(np.ones(C.shape[0], dtype=bool))
    return float((np.abs(C) * M).sum())


def objective_gram(G: np.ndarray, w: np.ndarray, alpha: float) -> tuple:
    """(L, L_O, L_R) at delta = sum_k w_k tau_k."""
    H = disentangled_inner(G, w)
    L_O = mean_abs_offdiag(cosine_matrix(H), pair_weights(active_tasks(G)))
    L_R = math.sqrt(max(float(w @ G @ w), 0.0))
    return L_O + alpha * L_R, L_O, L_R


def _orthogonality_terms(H: np.ndarray, M: np.ndarray) -> tuple:
    """(r, L_O) with grad_delta L_O = -2 sum_i r_i (tau_i - delta).

    From d cos(a, b)/da = b/(|a||b|) - cos(a, b) a/|a|^2 and d a/d delta = -I:
    r_i = (1/n_i) sum_j S_ij / n_j - (1/n_i^2) sum_j S_ij C_ij, with
    S_ij = sign(C_ij) M_ij (M: ``pair_weights``; sign(0) = 0, as autograd's
    subgradient of |x|) and n_i = ||tau_i - delta||; a zero vector contributes 0.
    Written for speed: it runs once per solver step.
    """
    d = H.diagonal()
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    C = H * np.multiply.outer(inv, inv)
    S = np.sign(C)
    S *= M
    SC = S * C
    row = SC.sum(axis=1)
    return inv * (S @ inv) - inv * inv * row, float(row.sum())


class SolverDiverged(ArithmeticError):
    """Plain gradient descent left the finite numbers: the step size is too large."""


@dataclass
class Solution:
    """What a solve found, in the paper's terms.

    ``w`` (sgd only): delta = sum_k w_k tau_k. ``delta`` (adam only): the
    full-space redundant vector, one tensor per input chunk. ``losses`` holds
    L at delta^0 .. delta^N (N + 1 values).
    """

    alpha: float
    lr: float
    steps: int
    losses: List[float] = field(default_factory=list)
    w: Optional[np.ndarray] = None
    delta: Optional[List[torch.Tensor]] = None


# Up to this many tasks the steps run as straight-line Python code written for
# K (scalars in local variables, no arrays): 6x faster than numpy's per-call
# overhead on K x K arrays at K = 4 (2.4 vs 14 ms for 1000 steps), 1.3x at K = 12.
UNROLLED_MAX_K = 12


def sgd_gram(G, alpha: float, lr: float, steps: int) -> Solution:
    """Algorithm 1 (plain GD on delta from delta^0 = 0) solved exactly in R^K.

    grad_delta L = T^T g with g = -2 (r - w * sum(r)) + alpha * w / ||delta||,
    so the full-space step delta <- delta - lr * grad equals w <- w - lr * g.
    No least-squares step is needed, so a singular G (identical or zero task
    vectors) is harmless. A step is O(K^2) arithmetic on tiny arrays, so its
    cost is interpreter overhead: straight-line Python for K <= UNROLLED_MAX_K
    (~2.4 us a step at K = 4), numpy above (one solve per tensor under
    `scope: tensor`).
    """
    G = _as_numpy(G)
    K = G.shape[0]
    w = np.zeros(K)
    active = active_tasks(G)
    if active.sum() < 2:
        return Solution(alpha, lr, steps, [objective_gram(G, w, alpha)[0]] * (steps + 1), w=w)
    M = pair_weights(active)
    run = _steps_unrolled if K <= UNROLLED_MAX_K else _steps_numpy
    w, losses = run(G, M, alpha, lr, steps)
    if not np.isfinite(w).all():
        step = next((i for i, L in enumerate(losses) if not math.isfinite(L)), steps)
        raise SolverDiverged(
            f"awd's plain gradient descent diverged (step {step} of {steps}): "
            f"lower lr, or use units: relative (the default)"
        )
    losses.append(objective_gram(G, w, alpha)[0])
    return Solution(alpha, lr, steps, losses, w=w)


def _steps_numpy(G: np.ndarray, M: np.ndarray, alpha: float, lr: float, steps: int):
    """``steps`` plain-GD steps from w = 0: (w, L at steps 0 .. steps-1)."""
    w = np.zeros(G.shape[0])
    losses = []
    with np.errstate(all="ignore"):
        for _ in range(steps):
            Gw = G @ w
            q = max(float(w @ Gw), 0.0)
            H = G - Gw[:, None]
            H -= Gw
            H += q
            r, L_O = _orthogonality_terms(H, M)
            norm = math.sqrt(q)
            losses.append(L_O + alpha * norm)
            g = w * (2.0 * float(r.sum()) + (alpha / norm if norm > 0 else 0.0))
            g -= 2.0 * r
            w = w - lr * g
    return w, losses


def _steps_unrolled(G: np.ndarray, M: np.ndarray, alpha: float, lr: float, steps: int):
    """The same steps as ``_steps_numpy``, unrolled for this K (see ``_unrolled_source``)."""
    K = G.shape[0]
    pairs = tuple((i, j, float(M[i, j])) for i in range(K) for j in range(K) if M[i, j])
    w, losses = _unrolled(K, pairs)(G.tolist(), alpha, lr, steps, math.sqrt)
    return np.array(w), losses


@lru_cache(maxsize=64)
def _unrolled(K: int, pairs: tuple):
    """The compiled steps for K, registered with ``linecache`` under their own file
    name so that tracebacks, pdb and profilers show the generated lines."""
    import linecache

    source = _unrolled_source(K, pairs)
    filename = f"<mergekit_awd.solver steps K={K} pairs={abs(hash(pairs)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["run"]


def _unrolled_source(K: int, pairs: tuple) -> str:
    """Python source of ``steps`` plain-GD steps for K tasks, every index written out.

    p = G w, q = w^T G w = ||delta||^2; n_i = 1 / ||tau_i - delta||; for each weighted
    pair (i, j, m): C_ij = (G_ij - p_i - p_j + q) n_i n_j, A_i += m sign(C_ij) n_j,
    B_i += m |C_ij|; then r_i = n_i A_i - n_i^2 B_i (as in _orthogonality_terms),
    L_O = sum_i B_i and w <- w - lr (w (2 sum(r) + alpha / ||delta||) - 2 r).
    """
    ks = range(K)
    lines = ["def run(G, alpha, lr, steps, sqrt):"]
    lines += [f"    g{i}_{j} = G[{i}][{j}]" for i in ks for j in ks]
    lines += [f"    w{i} = 0.0" for i in ks]
    lines += ["    losses = []", "    for _ in range(steps):"]
    body = [f"p{i} = " + " + ".join(f"g{i}_{j} * w{j}" for j in ks) for i in ks]
    body += ["q = " + " + ".join(f"w{i} * p{i}" for i in ks), "if q < 0.0: q = 0.0"]
    for i in ks:
        body += [f"d = g{i}_{i} - 2.0 * p{i} + q", f"n{i} = 1.0 / sqrt(d) if d > 0.0 else 0.0",
                 f"A{i} = 0.0", f"B{i} = 0.0"]
    for i, j, m in pairs:
        body += [f"c = (g{i}_{j} - p{i} - p{j} + q) * n{i} * n{j}",
                 f"if c > 0.0: A{i} += {m!r} * n{j}; B{i} += {m!r} * c",
                 f"elif c < 0.0: A{i} -= {m!r} * n{j}; B{i} -= {m!r} * c"]
    body += [f"r{i} = n{i} * A{i} - n{i} * n{i} * B{i}" for i in ks]
    body += ["norm = sqrt(q)",
             "losses.append((" + " + ".join(f"B{i}" for i in ks) + ") + alpha * norm)",
             "f = 2.0 * (" + " + ".join(f"r{i}" for i in ks) + ")"
             " + (alpha / norm if norm > 0.0 else 0.0)"]
    body += [f"w{i} = w{i} - lr * (w{i} * f - 2.0 * r{i})" for i in ks]
    lines += ["        " + line for line in body]
    lines.append("    return [" + ", ".join(f"w{i}" for i in ks) + "], losses")
    return "\n".join(lines) + "\n"


def _as_numpy(G) -> np.ndarray:
    if isinstance(G, torch.Tensor):
        G = G.detach().cpu().numpy()
    return np.asarray(G, dtype=np.float64)


def adam_full(
    taus: Sequence[torch.Tensor],
    G,
    alpha: float,
    lr: float,
    steps: int,
    *,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
) -> Solution:
    """torch.optim.Adam on the full-space delta (one tensor per chunk of tau).

    ``taus[c]`` is the K x ... slice of the task vectors for chunk c (a tensor
    of the model under `scope: global`); delta has one matching tensor per chunk.
    The gradient is analytic (no autograd graph over the model):
    p_k = <tau_k, delta>, H = G - p 1^T - 1 p^T + ||delta||^2 and
    grad = -2 sum_k r_k tau_k + (2 sum(r) + alpha / ||delta||) delta.
    Two passes over tau per step and no K x P temporaries.
    """
    G = torch.from_numpy(_as_numpy(G))
    active = active_tasks(G.numpy())
    delta = [
        torch.zeros(t.shape[1:], dtype=t.dtype, device=t.device, requires_grad=True)
        for t in taus
    ]
    losses: List[float] = []
    M = pair_weights(active)
    if active.sum() < 2 or steps == 0:
        losses = [_full_objective(taus, delta, G, alpha, M)[0]] * (steps + 1)
        return Solution(alpha, lr, steps, losses, delta=[d.detach() for d in delta])
    opt = torch.optim.Adam(delta, lr=lr, betas=betas, eps=eps)
    for _ in range(steps):
        L, H, q = _full_objective(taus, delta, G, alpha, M)
        losses.append(L)
        r = torch.from_numpy(_orthogonality_terms(H, M)[0])
        coef_delta = 2.0 * float(r.sum()) + (alpha / math.sqrt(q) if q > 0 else 0.0)
        for t, d in zip(taus, delta):
            r_t = r.to(dtype=t.dtype, device=t.device)
            grad = torch.tensordot(r_t, t, dims=1).mul_(-2.0)
            grad.add_(d.detach(), alpha=coef_delta)
            d.grad = grad
        opt.step()
    losses.append(_full_objective(taus, delta, G, alpha, M)[0])
    return Solution(alpha, lr, steps, losses, delta=[d.detach() for d in delta])


def delta_norm_sq(G, solution: "Solution") -> float:
    """||delta||^2 of a solution, from G (sgd) or from the full-space delta (adam)."""
    if solution.w is not None:
        return max(float(solution.w @ _as_numpy(G) @ solution.w), 0.0)
    return sum(float(d.double().square().sum()) for d in solution.delta or ())


def full_inner(taus: Sequence[torch.Tensor], delta: Sequence[torch.Tensor], G) -> np.ndarray:
    """<tau_i - delta, tau_j - delta> for a full-space delta (Adam's)."""
    G = _as_numpy(G)
    M = pair_weights(active_tasks(G))
    return _full_objective(taus, delta, torch.from_numpy(G), 0.0, M)[1]


def _full_objective(taus, delta, G: torch.Tensor, alpha: float, M: np.ndarray):
    """L at a full-space delta, plus the disentangled inner products H and ||delta||^2."""
    with torch.no_grad():
        p = torch.zeros(G.shape[0], dtype=torch.float64)
        q = 0.0
        for t, d in zip(taus, delta):
            flat = t.reshape(t.shape[0], -1)
            dflat = d.reshape(-1)
            p += (flat @ dflat).to(torch.float64).cpu()
            q += float(dflat.to(torch.float64).square().sum())
    H = (G - p[:, None] - p[None, :] + q).numpy()
    L = mean_abs_offdiag(cosine_matrix(H), M)
    L += alpha * math.sqrt(max(q, 0.0))
    return L, H, max(q, 0.0)
