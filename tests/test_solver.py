"""The solver on plain tensors: Gram-space Algorithm 1 against naive full-space autograd."""

import math

import numpy as np
import pytest
import torch

import reference
from mergekit_awd import solver


def task_vectors(K=4, P=3000, shared=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(P, generator=g, dtype=torch.float64)
    return torch.randn(K, P, generator=g, dtype=torch.float64) + shared * common


def gram_space_delta(T, alpha, lr, steps, units="relative"):
    G = solver.gram(T).numpy()
    a, b = solver.raw_hyperparameters(alpha, lr, units=units, optimizer="sgd",
                                      s=solver.scale_of(G), numel=T.shape[1])
    sol = solver.sgd_gram(G, a, b, steps)
    return torch.from_numpy(sol.w) @ T, sol


@pytest.mark.parametrize("alpha,lr,steps", [(0.01, 0.02, 200), (0.1, 0.05, 50), (0.0, 0.01, 100)])
def test_sgd_gram_is_algorithm_1_exactly(alpha, lr, steps):
    T = task_vectors()
    delta, sol = gram_space_delta(T, alpha, lr, steps)
    naive = reference.solve_delta(T, alpha, lr, steps)
    assert (delta - naive).norm() / naive.norm() < 1e-9
    assert len(sol.losses) == steps + 1
    s = math.sqrt(float((T * T).sum(1).mean()))
    assert sol.losses[-1] == pytest.approx(float(reference.loss(T, naive, alpha / s)), rel=1e-9)
    assert sol.losses[-1] < sol.losses[0]


def test_raw_units_match_the_papers_hyperparameters():
    T = task_vectors(P=500) * 0.05
    delta, _ = gram_space_delta(T, 1e-3, 5e-3, 100, units="raw")
    naive = reference.solve_delta(T, 1e-3, 5e-3, 100, units="raw")
    assert (delta - naive).norm() / naive.norm() < 1e-9


def test_relative_units_are_scale_free():
    T = task_vectors()
    d1, s1 = gram_space_delta(T, 0.01, 0.02, 100)
    d2, s2 = gram_space_delta(T * 1e-3, 0.01, 0.02, 100)
    np.testing.assert_allclose(s1.w, s2.w, rtol=1e-9)
    np.testing.assert_allclose(s1.losses, s2.losses, rtol=1e-9)


def test_loss_at_zero_is_mean_abs_cosine():
    T = task_vectors(K=3)
    G = solver.gram(T).numpy()
    L, L_O, L_R = solver.objective_gram(G, np.zeros(3), alpha=0.5)
    n = T.norm(dim=1)
    C = (T @ T.T) / (n[:, None] * n[None, :])
    assert L_O == pytest.approx(float((C.sum() - 3) / 6), rel=1e-12)
    assert L_R == 0 and L == L_O


def test_disentangling_lowers_mean_cosine():
    T = task_vectors(shared=1.5)
    G = solver.gram(T).numpy()
    _, sol = gram_space_delta(T, 0.01, 0.02, 1000)
    before = solver.mean_abs_offdiag(solver.cosine_matrix(G))
    after = solver.mean_abs_offdiag(solver.cosine_matrix(solver.disentangled_inner(G, sol.w)))
    assert before > 0.5 and after < 0.5 * before


@pytest.mark.parametrize("case", ["identical", "zero", "all_zero", "single"])
def test_singular_gram_gives_no_nan(case):
    T = task_vectors(K=3)
    if case == "identical":
        T[1] = T[0]
    elif case == "zero":
        T[2] = 0
    elif case == "all_zero":
        T[:] = 0
    else:
        T = T[:1]
    delta, sol = gram_space_delta(T, 0.01, 0.02, 200)
    assert torch.isfinite(delta).all() and np.isfinite(sol.losses).all()
    if case == "identical":
        naive = reference.solve_delta(T, 0.01, 0.02, 200)
        assert (delta - naive).norm() / naive.norm() < 1e-9
    if case in ("all_zero", "single"):
        assert not sol.w.any()


def test_adam_full_is_torch_adam():
    T = task_vectors(P=2000)
    G = solver.gram(T).numpy()
    s = solver.scale_of(G)
    a, b = solver.raw_hyperparameters(0.01, 0.01, units="relative", optimizer="adam", s=s, numel=2000)
    # split delta into two chunks, as scope: global does across tensors
    sol = solver.adam_full([T[:, :700], T[:, 700:]], G, a, b, 60)
    delta = torch.cat(sol.delta)
    naive = reference.solve_delta(T, 0.01, 0.01, 60, optimizer="adam")
    assert (delta - naive).norm() / naive.norm() < 1e-9
    # Adam leaves span{tau}: the residual of a least-squares fit is not zero
    w = torch.linalg.lstsq(T.T, delta[:, None]).solution
    assert (T.T @ w[:, 0] - delta).norm() > 1e-3 * delta.norm()


@pytest.mark.parametrize("P", [1001, 64, 30])
def test_gram_is_float64_chunk_by_chunk(P):
    T = task_vectors(K=3, P=P)
    G = solver.gram(T, chunk=64)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, T @ T.T, rtol=1e-12, atol=1e-12)
    # float32 task vectors: computed in float64 too
    G32 = solver.gram(T.float(), chunk=64)
    exact = T.float().double() @ T.float().double().T
    torch.testing.assert_close(G32, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dots", [True, False])  # the CPU's ddot path, the GPU's addmm path
def test_fused_gram_and_combination_equal_the_stacked_ones(dtype, dots):
    """G and the combination read from the inputs chunk by chunk (chunks that do not
    divide the size, a non-contiguous input) equal gram(task_vectors(...)) and
    base + c @ T on the stacked task vectors."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 29, generator=g, dtype=torch.float64) * 0.02
    inputs = [(base + torch.randn(37, 29, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
              for _ in range(3)]
    inputs[1] = inputs[1].T.contiguous().T  # same values, transposed strides
    base = base.to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    T = solver.task_vectors(base, inputs, compute)
    # G of the exact differences (for fp32 inputs, float32 task vectors would round)
    expected = solver.gram(solver.task_vectors(base, inputs, torch.float64)).numpy()
    for chunk in (None, 100, 37 * 29):
        G = solver.gram_of(base, inputs, chunk=chunk, dots=dots)
        np.testing.assert_allclose(G, expected, rtol=1e-12, atol=0)
        c = [0.7, -0.2, 0.45]
        merged = solver.combination(base, inputs, c, compute, chunk=chunk)
        reference = (base.to(compute) + torch.tensordot(torch.tensor(c, dtype=compute), T, 1))
        assert merged.dtype == dtype and merged.is_contiguous()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(merged.to(compute), reference.to(dtype).to(compute),
                                   rtol=0, atol=tol * float(base.abs().max()) + (
                                       0 if dtype in (torch.float32, torch.float64)
                                       else float(reference.abs().max()) * 2**-7))


def test_zero_task_vector_is_left_out_of_the_orthogonality_loss():
    """A fine-tune equal to its base has no direction; with twins beside it, plain GD
    would otherwise chase cos(tau - delta, -delta), whose gradient grows like 1/||delta||."""
    T = task_vectors(K=4)
    T[1] = T[0]
    T[3] = 0
    delta, sol = gram_space_delta(T, 1e-4, 20.0, 300, units="raw")
    assert torch.isfinite(delta).all() and delta.norm() > 0
    # identical to solving without the zero vector (raw units: same alpha and lr)
    expected, _ = gram_space_delta(T[:3], 1e-4, 20.0, 300, units="raw")
    assert (delta - expected).norm() <= 1e-9 * expected.norm() + 1e-12



@pytest.mark.parametrize("K,kind", [(2, "correlated"), (3, "correlated"), (4, "correlated"),
                                    (8, "correlated"), (12, "correlated"), (4, "zero task"),
                                    (3, "identical tasks"), (8, "identical tasks")])
def test_python_and_numpy_steps_agree(K, kind):
    """Small K runs as unrolled Python, larger K on numpy: the same steps either way.

    (Two identical tasks alone have gradient 0 exactly: rounding noise decides there.)
    """
    T = task_vectors(K=K, P=400, seed=K)
    if kind == "zero task":
        T[1] = 0
    elif kind == "identical tasks":
        T[1] = T[0]
    G = solver.gram(T).numpy()
    a, b = solver.raw_hyperparameters(0.01, 0.02, units="relative", optimizer="sgd",
                                      s=solver.scale_of(G), numel=T.shape[1])
    M = solver.pair_weights(solver.active_tasks(G))
    w_py, l_py = solver._steps_unrolled(G, M, a, b, 300)
    w_np, l_np = solver._steps_numpy(G, M, a, b, 300)
    assert np.abs(w_py - w_np).max() <= 1e-12 * max(1.0, np.abs(w_np).max())
    assert np.allclose(l_py, l_np, rtol=1e-12, atol=1e-14)
    assert np.abs(w_np).max() > 0  # the solve moved

