"""awd_ties / awd_dare_ties: mergekit's own sparsify + get_mask applied to tau_i - delta."""

import pytest
import torch
from mergekit.merge_methods import TensorGroup, get
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

import mergekit_awd  # noqa: F401  (registers the methods)
import reference
from conftest import mergekit_yaml, recipe

NAME = "model.layers.0.mlp.up_proj.weight"


def make_group(K=3, shape=(48, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)
    fts = [base + 0.02 * shared + 0.01 * torch.randn(shape, generator=g) for _ in range(K)]
    group = TensorGroup.from_tensors([base, *fts], ids=["base", "a", "b", "c"][: K + 1],
                                     base_index=0, name=NAME)
    return group, base, fts


def expected(base, fts, method, weights, density, lam, normalize, rescale, steps):
    taus = torch.stack([(f - base).double() for f in fts])
    delta = reference.solve_delta(taus.reshape(len(fts), -1), 0.01, 0.005, steps).reshape(base.shape)
    hat = (taus - delta).float()
    deltas = torch.stack([
        sparsify(hat[k], density=d, method=method, rescale_norm=RescaleNorm.l1 if rescale else None)
        for k, d in enumerate(density)
    ])
    w = torch.tensor(weights).reshape(-1, 1, 1)
    deltas = deltas * w
    mask = get_mask(deltas, method="sum", mask_dtype=deltas.dtype)
    mixed = (deltas * mask).sum(0)
    if normalize:
        div = (w * mask).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed


@pytest.mark.parametrize("name,method,normalize,rescale", [
    ("awd_ties", SparsificationMethod.magnitude, True, False),
    ("awd_dare_ties", SparsificationMethod.random, False, True),
])
def test_kernel_matches_mergekit_sparsify_and_get_mask(name, method, normalize, rescale):
    group, base, fts = make_group()
    weights, density = [1.0, 0.5, 0.8], [0.5, 0.3, 0.7]
    params = dict(scope="tensor", steps=300, alpha=0.01, weight={"a": 1.0, "b": 0.5, "c": 0.8},
                  density={"a": 0.5, "b": 0.3, "c": 0.7}, **{"lambda": 0.9})
    torch.manual_seed(7)
    (got,) = get(name)([group], parameters=params)
    torch.manual_seed(7)
    want = expected(base, fts, method, weights, density, 0.9, normalize, rescale, 300)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and disentangling mattered: plain TIES on the raw task vectors differs
    (plain,) = get("ties" if name == "awd_ties" else "dare_ties")(
        [group], parameters={k: params[k] for k in ("weight", "density", "lambda")})
    assert (got - plain).abs().max() > 1e-4


def test_awd_ties_through_mergekit_yaml(family, tmp_path):
    """The YAML path equals mergekit's own sparsify + get_mask on tau_i - delta."""
    config = recipe(family["base"], family["fts"], steps=100, alpha=0.01, scope="tensor")
    config["merge_method"] = "awd_ties"
    for m in config["models"]:
        m["parameters"] = {"weight": 1.0, "density": 0.5}
    mergekit_yaml(config, tmp_path / "out")
    merged = reference.load(str(tmp_path / "out"))
    base = reference.load(family["base"])[NAME]
    fts = [reference.load(p)[NAME] for p in family["fts"]]
    want = expected(base, fts, SparsificationMethod.magnitude, [1.0] * 3, [0.5] * 3, 1.0,
                    normalize=True, rescale=False, steps=100)
    torch.testing.assert_close(merged[NAME], want, rtol=1e-5, atol=1e-6)
    # and not plain TIES on the raw task vectors
    group = TensorGroup.from_tensors([base, *fts], ids=["base", "a", "b", "c"], base_index=0,
                                     name=NAME)
    (plain,) = get("ties")([group], parameters={"weight": 1.0, "density": 0.5})
    assert (merged[NAME] - plain).abs().max() > 1e-4
