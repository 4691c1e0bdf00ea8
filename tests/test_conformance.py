"""Real LLM families and recipe options against the naive reference (fast subset of
benchmarks/conformance.py), and one regression test per finding of the conformance issue."""

import json
import os

import pytest
import torch

import conformance
import families
import reference
from conformance import Cell
from conftest import mergekit_yaml


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    import mergekit_awd  # noqa: F401  (in-process merges)

    return conformance.Matrix(str(tmp_path_factory.mktemp("conformance")))


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_family_at_the_defaults(matrix, family):
    outcome = matrix.run(Cell(family), abs(hash(family)) % 10_000)
    assert outcome.status == "pass", outcome.detail


_METHODS = conformance.DATA_FREE + conformance.AWD_DATA_FREE


@pytest.mark.parametrize("i, family", list(enumerate(families.FAMILIES)))
def test_every_family_with_a_data_free_rule(matrix, i, family):
    """Each family with one of the data-free rules or their AWD variants (all eight
    over the sixteen families; the whole cross is `benchmarks/conformance.py
    --data-free`), with weights, lambda and keep_delta on every other family."""
    options = {"method": _METHODS[i % len(_METHODS)]}
    if i % 2:
        options["weighting"] = "weights+normalize+keep_delta"
    outcome = matrix.run(Cell(family, options), 300 + i)
    assert outcome.status == "pass", outcome.detail


@pytest.mark.parametrize("special", ["union", "sharded", "bin", "state_dicts"])
def test_input_forms(matrix, special):
    outcome = matrix.run(Cell("llama", {"optimizer": "adam"} if special == "state_dicts" else {},
                              special), 100 + len(special))
    assert outcome.status == "pass", outcome.detail


# 1. `dtype:` different from the stored precision (mergekit casts before the kernel;
#    the Gram pass used to read the stored tensors and refuse the merge)
@pytest.mark.parametrize("storage,dtype,scope", [("fp32", "bfloat16", "global"),
                                                 ("bf16", "float16", "global"),
                                                 ("fp16", "float32", "tensor")])
def test_recipe_dtype_differs_from_storage(matrix, storage, dtype, scope):
    cell = Cell("llama", {"storage": storage, "dtype": dtype, "scope": scope})
    outcome = matrix.run(cell, 200 + len(storage + dtype + scope))
    assert outcome.status == "pass", outcome.detail


def scope_parameters(out):
    with open(os.path.join(out, "awd_report.json")) as f:
        return json.load(f)["scope_parameters"]


def selected_numel(path, family, select):
    state = conformance.load_state(path, family, torch.float32)
    return sum(t.numel() for n, t in state.items() if conformance.selected(select, n, t))


# 2. MoE checkpoints in the hub's per-expert layout: mergekit converts them to fused
#    3-D experts; the Gram pass must see those (it looked them up by name), and
#    `select: linear` must include them and the router (it kept 2-D tensors only)
@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_experts_are_disentangled(matrix, family, tmp_path):
    paths = matrix.family(family, "fp32")
    config, _, _ = conformance.recipe(Cell(family), paths)
    out = tmp_path / "out"
    mergekit_yaml(config, out)
    state = conformance.load_state(paths["base"], family, torch.float32)
    experts = [n for n, t in state.items() if t.ndim == 3]
    assert experts, "the family has fused 3-D experts"
    assert scope_parameters(out) == selected_numel(paths["base"], family, "linear")
    matrices_only = sum(t.numel() for n, t in state.items()
                        if t.ndim == 2 and conformance.LAYER.search(n))
    assert scope_parameters(out) > matrices_only  # the 3-D experts are in


# 3. tied embeddings: each stored tensor once in G and in the parameter count
@pytest.mark.parametrize("family", ["qwen2-tied", "qwen3"])
def test_tied_embeddings_counted_once(matrix, family, tmp_path):
    outcome = matrix.run(Cell(family, {"select": "all"}), 300 + len(family))
    assert outcome.status == "pass", outcome.detail
    paths = matrix.family(family, "fp32")
    config, _, _ = conformance.recipe(Cell(family, {"select": "all"}), paths)
    out = tmp_path / "out"
    mergekit_yaml(config, out)
    assert scope_parameters(out) == selected_numel(paths["base"], family, "all")


# buffers that are -inf in every input (GPT-NeoX's masked_bias in float16) are kept,
# not refused as NaN/Inf, and add nothing to delta
def test_infinite_buffer_identical_in_every_input(matrix):
    outcome = matrix.run(Cell("gpt-neox", {"storage": "fp16", "select": "all"}), 450)
    assert outcome.status == "pass", outcome.detail
    paths = matrix.family("gpt-neox", "fp16")
    stored = conformance.stored_tensors(paths["base"])
    assert torch.isinf(stored["gpt_neox.layers.0.attention.masked_bias"]).all()


# 4. mergekit's in-memory API under the default scope (it has no model references)
def test_merge_state_dicts_default_scope(matrix):
    outcome = matrix.run(Cell("qwen2", {}, "state_dicts"), 400)
    assert outcome.status == "pass", outcome.detail


# 5. a `select:` regex reads only the tensors it matches in the Gram pass
def test_regex_gram_pass_reads_only_matching_tensors(matrix, tmp_path, monkeypatch):
    from mergekit.io.tasks import LoadTensor

    paths = matrix.family("llama", "fp32")
    loads = []
    real = LoadTensor.execute
    monkeypatch.setattr(LoadTensor, "execute", lambda self: loads.append(self.tensor) or real(self))
    config, _, _ = conformance.recipe(Cell("llama", {"select": r"mlp\.up_proj"}), paths)
    assert conformance.run_merge_in_process(config, str(tmp_path / "out")) is None
    state = reference.load(paths["base"])
    inputs = 1 + len(paths["fts"])
    matching = [n for n in state if "mlp.up_proj" in n]
    assert len(matching) == 2
    assert len(loads) == inputs * (len(state) + len(matching))


# 6. the kernel merges exactly what the Gram pass read: tested by dtype casts (1.),
#    slices that move layers (test_hardening.test_slices_recipes) and the matrix.

# 7. the report names what an sgd scope: tensor merge has instead of one coefficient
def test_report_labels_per_tensor_sgd_coefficients(family, tmp_path):
    from mergekit_awd import report

    config = {"merge_method": "awd", "base_model": family["base"],
              "models": [{"model": m} for m in family["fts"]],
              "parameters": {"scope": "tensor", "steps": 20}}
    out = tmp_path / "out"
    mergekit_yaml(config, out)
    rep = json.load(open(out / "awd_report.json"))
    assert "adam" not in report.table(rep) and "per tensor" in report.table(rep)
    card = report.card_section(rep)  # what `mergekit-awd merge` appends to the card
    assert "| per tensor |" in card and "element-wise (adam)" not in card


# 8. report for every way of running a merge: test_cli.test_report_for_every_way_of_running_a_merge

# 9. a misspelt parameter is refused at planning, naming the closest one
def test_misspelt_parameter_is_refused(family, tmp_path):
    config = {"merge_method": "awd", "base_model": family["base"],
              "models": [{"model": m} for m in family["fts"]],
              "parameters": {"alhpa": 0.5}}
    proc = mergekit_yaml(config, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "awd has no parameter 'alhpa' (in parameters); did you mean 'alpha'?" in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()
    config["parameters"] = {}
    config["models"][0]["parameters"] = {"wieght": 2}
    proc = mergekit_yaml(config, tmp_path / "out2", check=False)
    assert "did you mean 'weight'?" in proc.stderr and proc.returncode != 0


# keep_delta (theta + lambda sum w_i (tau_i - delta) + keep_delta delta) with weights
# and normalize, against the reference, for each method, scope and optimizer
@pytest.mark.parametrize("options", [
    {"scope": "global", "optimizer": "sgd"},
    {"scope": "tensor", "optimizer": "adam"},
    {"scope": "global", "optimizer": "adam", "method": "awd_ties"},
    {"scope": "tensor", "optimizer": "sgd", "method": "awd_dare_ties"},
])
def test_keep_delta_matches_the_reference(matrix, options):
    cell = Cell("qwen2", dict(options, weighting="weights+normalize+keep_delta"))
    outcome = matrix.run(cell, 500 + len(str(options)))
    assert outcome.status == "pass", outcome.detail


def test_report_says_when_delta_is_the_shared_part(tmp_path):
    """delta close to the mean task vector: the report suggests keep_delta / base_model."""
    import numpy as np

    from mergekit_awd import report
    from synthetic import make_family

    g = torch.Generator().manual_seed(0)
    T = torch.randn(4, 500, generator=g, dtype=torch.float64)
    delta = torch.randn(500, generator=g, dtype=torch.float64)
    G = (T @ T.T).numpy()
    H = ((T - delta) @ (T - delta).T).numpy()
    got = report.delta_cosine_with_mean(G, H, float(delta @ delta))
    want = float(torch.nn.functional.cosine_similarity(delta, T.mean(0), dim=0))
    assert got == pytest.approx(want, rel=1e-10)

    for shared, noted in ((0.05, True), (0.0, False)):
        fam = make_family(str(tmp_path / f"f{shared}"), n_models=3, shared=shared, noise=0.01)
        config = {"merge_method": "awd", "base_model": fam["base"],
                  "models": [{"model": m} for m in fam["fts"]], "parameters": {"steps": 300}}
        out = tmp_path / f"out{shared}"
        mergekit_yaml(config, out)
        rep = json.load(open(out / "awd_report.json"))
        assert (rep["advice"] is not None) == noted, rep["delta_cosine_with_mean_task_vector"]
        assert ("keep_delta: 1" in report.card_section(rep)) == noted
    assert np.isfinite(rep["delta_cosine_with_mean_task_vector"])
