"""Naive float64 TSV-M, Iso-C, Iso-CTS and WUDI, written from the published algorithms
(the shape of FusionBench 0.2.33's reference code), not from mergekit_awd.

Each takes the task vectors of one matrix as a list of T (m x n) float64 tensors and
returns the merged task vector (float32 tensors: the same algorithm in float32, which
tells how much of a float32 merge's difference from the float64 reference is the
algorithm's own float32 error). WUDI builds the T x m x m products and lets autograd
differentiate them, as the reference does. The whole-model merge (``merge``) reads
the safetensors files itself: every 2-D tensor by the rule (3-D: each slice), the
others averaged, ``lambda`` scaling all of it.
"""

import torch

import reference


def tsv_m(taus, r=None):
    """Top r = int(k * (1/T)) triplets per task into fixed slots, zero-padded to k;
    U and Vh of the padded stacks replaced by U_u Vh_u of their own SVDs."""
    T, (m, n) = len(taus), taus[0].shape
    k = min(m, n)
    r = int(k * (1 / T)) if r is None else r
    sum_u = torch.zeros(m, k, dtype=taus[0].dtype)
    sum_s = torch.zeros(k, dtype=taus[0].dtype)
    sum_vh = torch.zeros(k, n, dtype=taus[0].dtype)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_vh[i * r:(i + 1) * r, :] = vh[:r, :]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


def iso_c(taus):
    total = sum(taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


def iso_cts(taus, fraction=0.8):
    T, shape = len(taus), taus[0].shape
    k = min(shape)
    common = int(k * fraction)
    common = k - round((k - common) / T) * T
    u, s, v = torch.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((k - common) / T)
    U = torch.zeros(shape[0], k, dtype=taus[0].dtype)
    S = torch.zeros(k, dtype=taus[0].dtype)
    V = torch.zeros(k, shape[1], dtype=taus[0].dtype)
    for i, w in enumerate(taus):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        U[:, i * per:(i + 1) * per] = ut[:, :per]
        S[i * per:(i + 1) * per] = st[:per]
        V[i * per:(i + 1) * per, :] = vt[:per, :]
    U[:, T * per:T * per + common] = cu
    S[T * per:T * per + common] = cs
    V[T * per:T * per + common, :] = cv
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    c, _, d = torch.linalg.svd(V, full_matrices=False)
    S = torch.ones_like(S) * S.mean()
    return torch.linalg.multi_dot((a @ b, torch.diag(S), c @ d))


def wudi(taus, steps=300, lr=1e-5):
    tvs = torch.stack(taus)
    merged = torch.nn.Parameter(tvs.sum(0).clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
    for _ in range(steps):
        product = torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2))
        loss = torch.sum(torch.square(product) / norms.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merged.detach()


def rule(method, taus, params):
    if method == "tsv":
        return tsv_m(taus)
    if method == "iso_c":
        return iso_c(taus)
    if method == "iso_cts":
        return iso_cts(taus, params.get("common_space_fraction", 0.8))
    if method == "wudi":
        return wudi(taus, params.get("wudi_steps", 300), params.get("wudi_lr", 1e-5))
    raise ValueError(method)


def merge_tensor(method, base, fts, params, weights=None, excluded=False,
                 dtype=torch.float64):
    """base + lambda * (RULE or mean) of weight_i * tau_i, computed in ``dtype`` and
    returned in float64."""
    weights = weights or [1.0] * len(fts)
    taus = [w * (f.to(dtype) - base.to(dtype)) for w, f in zip(weights, fts)]
    lam = params.get("lambda", 1.0)
    if excluded or base.ndim not in (2, 3):
        merged = sum(taus) / len(taus)
    elif base.ndim == 2:
        merged = rule(method, taus, params)
    else:
        merged = torch.stack([rule(method, [t[e] for t in taus], params)
                              for e in range(base.shape[0])])
    return base.double() + lam * merged.double()


def merge(method, base_path, ft_paths, params, weights=None, excluded=lambda name: False,
          load=reference.load, dtype=torch.float64):
    """The merged state dict (computed in ``dtype``, returned in float64) and the
    base's (``load``: path -> state dict)."""
    base = load(base_path)
    fts = [load(p) for p in ft_paths]
    return {name: merge_tensor(method, b, [f[name] for f in fts], params, weights,
                               excluded(name), dtype)
            for name, b in base.items()}, base
