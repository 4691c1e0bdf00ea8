"""A naive, independent AWD: full-space autograd on delta, float64, straight from the paper.

Written from the paper's equations, not from mergekit_awd, so that agreement
means something: it reads the safetensors files itself, selects the paper's
tensors itself, and runs Algorithm 1 (plain GD) or torch.optim.Adam on the
full-space delta.
"""

import glob
import math
import os

import torch
from safetensors.torch import load_file


def load(path):
    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(f))
    for f in sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        state.update(torch.load(f, weights_only=True))
    return state


def paper_selected(name, tensor):
    """Linear-layer weights inside the transformer blocks (paper, section 4.2)."""
    return tensor.ndim == 2 and ".layers." in name


def loss(T, delta, alpha):
    """L_O + alpha * ||delta|| over stacked task vectors T (K x P).

    A task vector that is exactly zero has no direction: it is left out of L_O
    (docs/design.md, section 1); it still receives -delta in the merge.
    """
    T = T[T.norm(dim=1) > 0]
    K = T.shape[0]
    if K < 2:
        return alpha * torch.linalg.vector_norm(delta)
    D = T - delta
    n = D.norm(dim=1)
    C = (D @ D.T) / (n[:, None] * n[None, :])
    L_O = (C.abs().sum() - C.diagonal().abs().sum()) / (K * (K - 1))
    return L_O + alpha * torch.linalg.vector_norm(delta)


def solve_delta(T, alpha, lr, steps, optimizer="sgd", units="relative"):
    """Algorithm 1 (sgd) or Adam on delta in full space; T is K x P float64."""
    P = T.shape[1]
    s = math.sqrt(float((T * T).sum(dim=1).mean()))
    if s == 0:  # all task vectors zero: nothing to disentangle
        return torch.zeros(P, dtype=torch.float64)
    if units == "relative":
        alpha = alpha / s
        lr = lr * s * s if optimizer == "sgd" else lr * s / math.sqrt(P)
    delta = torch.zeros(P, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else None
    for _ in range(steps):
        (grad,) = torch.autograd.grad(loss(T, delta, alpha), delta)
        if opt is None:
            with torch.no_grad():
                delta -= lr * grad
        else:
            delta.grad = grad
            opt.step()
    return delta.detach()


def merge(base_path, ft_paths, *, weights=None, lam=1.0, alpha=0.001, lr=0.005,
          steps=1000, optimizer="sgd", scope="global", units="relative",
          others="task_arithmetic", normalize=False, select=paper_selected):
    """The merged state dict, as docs/design.md section 1 defines it."""
    base = {k: v.double() for k, v in load(base_path).items()}
    fts = [{k: v.double() for k, v in load(p).items()} for p in ft_paths]
    weights = weights or [1.0] * len(fts)
    weights_of = weights if callable(weights) else (lambda name: weights)
    names = [k for k in base if select(k, base[k])]
    taus = {k: torch.stack([ft[k] - base[k] for ft in fts]) for k in base}
    delta = {}
    if scope == "global" and names and len(fts) > 1:
        T = torch.cat([taus[k].reshape(len(fts), -1) for k in names], dim=1)
        flat = solve_delta(T, alpha, lr, steps, optimizer, units)
        offset = 0
        for k in names:
            n = base[k].numel()
            delta[k] = flat[offset:offset + n].reshape(base[k].shape)
            offset += n
    elif len(fts) > 1:
        for k in names:
            flat = solve_delta(taus[k].reshape(len(fts), -1), alpha, lr, steps, optimizer, units)
            delta[k] = flat.reshape(base[k].shape)
    out = {}
    for k, b in base.items():
        if k not in names and others == "base":
            out[k] = b
            continue
        d = delta.get(k, torch.zeros_like(b))
        w_k = weights_of(k)
        scale = lam / sum(w_k) if normalize else lam
        out[k] = b + scale * sum(w * (tau - d) for w, tau in zip(w_k, taus[k]))
    return out, base


def merge_error_allowed(got, ref, base, rel=1e-5):
    """(error, allowed): 1e-5 of the merged delta plus one float32 rounding of the
    written values (where the disentangled vectors nearly cancel, the delta is tiny)."""
    got, ref, base = got.double(), ref.double(), base.double()
    return float((got - ref).norm()), rel * float((ref - base).norm()) + 2.0 ** -23 * float(ref.norm())
