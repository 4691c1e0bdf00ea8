"""`merge_method: awd` through the real `mergekit-yaml`, checked against a naive reference."""

import os

import pytest
import torch

import reference
from conftest import mergekit_yaml, recipe


def assert_merge_matches(out_dir, expected, base, tol=1e-5):
    """Every merged tensor's delta from base matches the reference's to ``tol``
    relative, above the float32 result's own rounding (one unit of its last place,
    norm-wise): these deltas are 1/200 of the weights, so one unit is 2.6e-5 of a
    delta, and the merges differ from the reference by 0.35-0.39 units (0.9-1.0e-5
    of the delta: the result's rounding alone)."""
    merged = reference.load(str(out_dir))
    assert set(merged) == set(expected)
    for name, ref in expected.items():
        got = merged[name].double()
        want_delta = ref - base[name]
        moved = want_delta.norm().clamp_min(1e-30)
        err = (got - ref).norm()
        bound = tol * moved + 2.0 ** -23 * ref.norm()
        assert err < bound, f"{name}: error {err / moved:.2e} of the delta > {bound / moved:.2e}"


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_sgd_matches_naive_full_space_algorithm_1(family, tmp_path, scope):
    params = dict(alpha=0.01, lr=0.005, steps=1000, scope=scope)
    mergekit_yaml(recipe(family["base"], family["fts"], **params), tmp_path / "out")
    expected, base = reference.merge(family["base"], family["fts"], **params)
    assert_merge_matches(tmp_path / "out", expected, base)
    # disentangling really moved the selected tensors away from task arithmetic
    ta, _ = reference.merge(family["base"], family["fts"], steps=0)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (expected[name] - ta[name]).norm() > 1e-3 * (ta[name] - base[name]).norm()


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_adam_matches_torch_adam_in_full_space(family, tmp_path, scope):
    params = dict(alpha=0.01, lr=0.01, steps=50, optimizer="adam", scope=scope)
    mergekit_yaml(recipe(family["base"], family["fts"], **params), tmp_path / "out")
    expected, base = reference.merge(family["base"], family["fts"], **params)
    assert_merge_matches(tmp_path / "out", expected, base)


def test_weights_lambda_normalize_and_others_base(family, tmp_path):
    params = dict(steps=200, scope="tensor", others="base", normalize=True,
                  **{"lambda": 0.7})
    weights = [1.0, 0.5, 2.0]
    mergekit_yaml(recipe(family["base"], family["fts"], weights=weights, **params),
                  tmp_path / "out")
    expected, base = reference.merge(family["base"], family["fts"], weights=weights,
                                     lam=0.7, steps=200, scope="tensor",
                                     others="base", normalize=True)
    assert_merge_matches(tmp_path / "out", expected, base)
    merged = reference.load(str(tmp_path / "out"))
    # `others: base` keeps every unselected tensor exactly the base's
    assert torch.equal(merged["model.embed_tokens.weight"].double(),
                       base["model.embed_tokens.weight"])


def test_others_task_arithmetic_with_weights(family, tmp_path):
    weights = [0.3, 1.0, 0.6]
    mergekit_yaml(recipe(family["base"], family["fts"], weights=weights, steps=100),
                  tmp_path / "out")
    expected, base = reference.merge(family["base"], family["fts"], weights=weights, steps=100)
    assert_merge_matches(tmp_path / "out", expected, base)


def test_steps_zero_equals_mergekit_task_arithmetic(family, tmp_path):
    weights = [1.0, 0.5, 0.8]
    mergekit_yaml(recipe(family["base"], family["fts"], weights=weights, steps=0,
                         **{"lambda": 0.9}), tmp_path / "awd")
    ta = recipe(family["base"], family["fts"], weights=weights, **{"lambda": 0.9})
    ta["merge_method"] = "task_arithmetic"
    mergekit_yaml(ta, tmp_path / "ta")
    a, b = reference.load(str(tmp_path / "awd")), reference.load(str(tmp_path / "ta"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_merged_model_loads_and_gives_finite_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    mergekit_yaml(recipe(family["base"], family["fts"], steps=50), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    logits = model(torch.arange(10)[None]).logits
    assert logits.shape == (1, 10, 64)
    assert torch.isfinite(logits).all()
    assert os.path.exists(tmp_path / "out" / "README.md")


def test_bf16_inputs_compute_in_float32_and_keep_bf16_output(tmp_path):
    from synthetic import make_family

    fam = make_family(str(tmp_path / "bf16"), n_models=3, shared=0.02, noise=0.01,
                      dtype=torch.bfloat16, seed=3)
    params = dict(alpha=0.01, lr=0.005, steps=200, scope="tensor")
    mergekit_yaml(recipe(fam["base"], fam["fts"], **params), tmp_path / "out")
    merged = reference.load(str(tmp_path / "out"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    expected, base = reference.merge(fam["base"], fam["fts"], **params)
    exact = total = 0
    for name, ref in expected.items():
        # float32 math on the bf16 inputs, one rounding to bf16 at the end: the
        # correctly rounded value almost everywhere, never more than 1 ulp off
        want = ref.to(torch.bfloat16)
        exact += int((merged[name] == want).sum())
        total += want.numel()
        assert ((merged[name].double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-12).all(), name
    assert exact / total > 0.999
