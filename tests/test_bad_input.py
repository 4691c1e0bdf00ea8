"""Bad recipes and bad inputs: a clear message, and nothing that looks like a finished model."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference
from conftest import mergekit_yaml, recipe


def assert_failed(proc, out_dir, *needles):
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-3000:]}"
    assert not os.path.exists(os.path.join(out_dir, "config.json"))


@pytest.mark.parametrize(
    "name,value,expect",
    [
        ("alpha", -1.0, "a finite number >= 0"),
        ("lr", 0, "a finite number > 0"),
        ("steps", -3, "an integer >= 0"),
        ("steps", 2.5, "an integer >= 0"),
        ("optimizer", "lbfgs", "one of sgd, adam"),
        ("scope", "layer", "one of global, tensor"),
        ("units", "meters", "one of relative, raw"),
        ("others", "drop", "one of task_arithmetic, base"),
        ("select", "(", "'linear', 'all' or a valid regular expression on tensor names"),
    ],
)
def test_bad_parameter_fails_at_planning_naming_it(family, tmp_path, name, value, expect):
    proc = mergekit_yaml(recipe(family["base"], family["fts"], **{name: value}),
                         tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", f"awd parameter '{name}' must be {expect}; got {value!r}")
    # planning time: the executor never started
    assert "Executing graph" not in proc.stderr


def test_bad_weight_names_it(family, tmp_path):
    proc = mergekit_yaml(recipe(family["base"], family["fts"], weights=[1, "heavy", 1]),
                         tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", "awd parameter 'weight' must be a finite number; got 'heavy'")


def test_missing_base_model(family, tmp_path):
    proc = mergekit_yaml(recipe(None, family["fts"]), tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", "awd needs base_model", "base_model: <path or hub id>")


def test_global_solver_parameter_varying_per_tensor(family, tmp_path):
    config = recipe(family["base"], family["fts"], steps=10)
    config["parameters"]["alpha"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.01}]
    proc = mergekit_yaml(config, tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", "scope: global", "alpha=", "use scope: tensor")


def copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"])
def test_nan_in_an_input_names_model_and_tensor(family, tmp_path, scope, tensor):
    def poison(state):
        state[tensor][3, 2] = float("nan")

    bad = copy_with(family["fts"][1], tmp_path / "bad_ft", poison)
    fts = [family["fts"][0], bad, family["fts"][2]]
    proc = mergekit_yaml(recipe(family["base"], fts, steps=5, scope=scope), tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", f"tensor {tensor} contains NaN or Inf in model {bad}")


def test_inf_in_base_under_others_base(family, tmp_path):
    def poison(state):
        state["model.norm.weight"][0] = float("inf")

    bad = copy_with(family["base"], tmp_path / "bad_base", poison)
    proc = mergekit_yaml(recipe(bad, family["fts"], steps=5, others="base"), tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out", f"tensor model.norm.weight contains NaN or Inf in model {bad} (base)")


def test_shape_mismatch_names_the_model(family, tmp_path):
    from synthetic import make_family, tiny_llama_config

    other = make_family(str(tmp_path / "other"), config=tiny_llama_config(intermediate_size=48), n_models=1)
    fts = [family["fts"][0], other["fts"][0]]
    for scope in ("global", "tensor"):
        out = tmp_path / f"out_{scope}"
        proc = mergekit_yaml(recipe(family["base"], fts, steps=5, scope=scope), out, check=False)
        assert_failed(proc, out)
        # mergekit checks shapes before calling a merge method: its message names the
        # tensor and the shapes in input order; the Gram pass names the model too
        last = proc.stderr.strip().splitlines()[-1]
        assert ("Tensor size mismatch for model.layers.0.mlp." in last and "48)" in last) or (
            f"in model {other['fts'][0]} but" in last), last


def test_zero_and_identical_task_vectors_merge_finite(family, tmp_path):
    twin = shutil.copytree(family["fts"][0], tmp_path / "twin")
    fts = [family["fts"][0], str(twin), family["base"] + "/../base_copy"]
    shutil.copytree(family["base"], fts[2])
    for scope in ("global", "tensor"):
        out = tmp_path / f"out_{scope}"
        mergekit_yaml(recipe(family["base"], fts, steps=200, scope=scope), out)
        merged = reference.load(str(out))
        assert all(torch.isfinite(t).all() for t in merged.values())
        # two identical fine-tunes and a zero task vector (left out of the orthogonality
        # loss, it still receives -delta): the naive solver, treating them the same way
        expected, base = reference.merge(family["base"], fts, steps=200, scope=scope)
        for name, ref in expected.items():
            err, allowed = reference.merge_error_allowed(merged[name], ref, base[name])
            assert err <= allowed, (name, err, allowed)


def test_single_model_is_task_arithmetic_with_a_warning(family, tmp_path):
    proc = mergekit_yaml(recipe(family["base"], family["fts"][:1], steps=100), tmp_path / "out")
    assert "AWD needs two or more fine-tuned models" in proc.stderr
    merged = reference.load(str(tmp_path / "out"))
    expected, _ = reference.merge(family["base"], family["fts"][:1], steps=0)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-6, atol=1e-7)


def test_default_lambda_with_many_task_vectors_warns_once_with_a_value(family, tmp_path):
    fts = family["fts"]  # three task vectors summed at the default lambda 1
    proc = mergekit_yaml(recipe(family["base"], fts, steps=10), tmp_path / "out")
    line = "lambda is 1 (the default, as in mergekit's task_arithmetic)"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    assert "Set 'lambda: 0.8'" in proc.stderr  # LAMBDA_TOTAL / sum(weights) = 2.4 / 3
    # set in the recipe (even to 1): the user chose it, no warning
    proc = mergekit_yaml(recipe(family["base"], fts, steps=10, **{"lambda": 1.0}),
                         tmp_path / "out2")
    assert line not in proc.stderr


def test_lambda_warning_conditions():
    from mergekit_awd.report import lambda_warning

    assert lambda_warning("awd", 1.0, [1, 1, 1, 1], False, explicit=False)
    assert lambda_warning("awd", 1.0, [1, 1, 1, 1], False, explicit=True) is None
    assert lambda_warning("awd", 1.0, [1, 1, 1, 1], True, explicit=False) is None  # normalize
    assert lambda_warning("awd", 1.0, [1, 1], False, explicit=False) is None  # two: TA's sum
    assert lambda_warning("awd", 0.35, [1] * 8, False, explicit=False) is None  # total 2.8
    assert "lambda: 0.3'" in lambda_warning("awd_dare_ties", 1.0, [1] * 8, False, False)


def test_adam_global_over_its_memory_is_refused_before_reading(family, tmp_path):
    """What a 7B merge gets from optimizer: adam (scope: global): the memory it would
    need, computed from the checkpoint headers before any tensor is read, and what
    to use instead."""
    base = load_file(os.path.join(family["base"], "model.safetensors"))
    numel = sum(t.numel() for n, t in base.items() if reference.paper_selected(n, t))
    need = (3 + 4) * numel * 4 / 2**30
    proc = mergekit_yaml(recipe(family["base"], family["fts"], optimizer="adam", steps=5,
                                adam_max_gb=need / 2), tmp_path / "out", check=False)
    assert_failed(proc, tmp_path / "out",
                  f"3 task vectors + 4 of {numel:,} parameters = {need:.3g} GB, over "
                  f"adam_max_gb={need / 2:g}", "Use optimizer: sgd", "scope: tensor")
    assert "awd Gram pass" not in proc.stderr  # refused before reading a tensor
    ok = mergekit_yaml(recipe(family["base"], family["fts"], optimizer="adam", steps=5,
                              adam_max_gb=need * 1.01), tmp_path / "ok")
    assert ok.returncode == 0


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_merge_overflowing_float16_is_refused_not_written_as_inf(scope):
    """Finite float16 inputs whose merge exceeds float16's range: refused, saying so
    (the previous version wrote inf)."""
    import mergekit_awd.registration  # noqa: F401
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_awd.params import AWDInputError

    base = torch.full((8, 8), 60000.0, dtype=torch.float16)
    fts = [base + torch.full((8, 8), 3000.0 * (1 + 0.1 * k), dtype=torch.float16)
           for k in range(2)]
    with pytest.raises(AWDInputError, match=r"overflow torch\.float16 \(largest finite "
                                            r"65504\); no input holds NaN or Inf"):
        merge_tensors([base, *fts], "awd", base_index=0,
                      parameters={"lambda": 1.0, "select": "all", "steps": 10,
                                  "scope": scope})
    # within range: merged, finite
    ok = merge_tensors([base / 8, *(f / 8 for f in fts)], "awd", base_index=0,
                       parameters={"lambda": 1.0, "select": "all", "steps": 10,
                                   "scope": scope})
    assert ok.dtype == torch.float16 and torch.isfinite(ok).all()
