"""`mergekit-awd report | sweep | merge`, and the report every awd merge leaves behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import reference
from conftest import mergekit_yaml, recipe


def cli(*args, check=True):
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-awd")
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def write_recipe(tmp_path, config, name="r.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def check_report(path, K):
    with open(path) as f:
        rep = json.load(f)
    for key in ("models", "weights", "parameters", "task_vector_norms", "cosine_before",
                "cosine_after", "mean_abs_cosine_before", "mean_abs_cosine_after",
                "delta_norm", "delta_norm_relative", "coefficients", "loss", "schema_version"):
        assert key in rep, key
    assert np.array(rep["cosine_before"]).shape == (K, K)
    assert np.array(rep["cosine_after"]).shape == (K, K)
    assert np.allclose(np.diag(rep["cosine_before"]), 1.0)
    assert rep["mean_abs_cosine_after"] < rep["mean_abs_cosine_before"]
    assert len(rep["loss"]) == rep["parameters"]["steps"] + 1
    if rep["w"] is not None:
        W = sum(rep["weights"])
        assert np.allclose(rep["coefficients"], np.array(rep["weights"]) - W * np.array(rep["w"]))
    return rep


def check_svg(path, K=None):
    """A well-formed SVG; the heatmap has 2 K x K cells, each with its value."""
    import xml.etree.ElementTree as ET

    root = ET.parse(str(path)).getroot()
    assert root.tag.endswith("svg") and float(root.get("width")) > 100
    ns = "{http://www.w3.org/2000/svg}"
    if K is not None:
        cells = root.findall(f"{ns}rect")[1:]
        assert len(cells) == 2 * K * K
        values = [t.text for t in root.findall(f"{ns}text") if t.text and t.text[-3:-2] == "."]
        assert values[:K * K:K + 1] == ["1.00"] * K  # the diagonal of the "before" heatmap
    else:
        assert root.find(f"{ns}polyline") is not None


def test_report_writes_json_and_pictures_and_no_model(family, tmp_path):
    path = write_recipe(tmp_path, recipe(family["base"], family["fts"], weights=[1, 0.5, 1], steps=300, alpha=0.01))
    proc = cli("report", path, "--out", tmp_path / "rep")
    assert "mean |cos|" in proc.stdout
    rep = check_report(tmp_path / "rep" / "awd_report.json", 3)
    check_svg(tmp_path / "rep" / "awd_cosine.svg", 3)
    check_svg(tmp_path / "rep" / "awd_loss.svg")
    assert sorted(os.listdir(tmp_path / "rep")) == ["awd_cosine.svg", "awd_loss.svg", "awd_report.json"]
    # the same numbers as the naive solver over the same tensors
    base = reference.load(family["base"])
    fts = [reference.load(p) for p in family["fts"]]
    names = [k for k in base if reference.paper_selected(k, base[k])]
    T = torch.stack([torch.cat([(ft[k] - base[k]).double().reshape(-1) for k in names]) for ft in fts])
    delta = reference.solve_delta(T, 0.01, 0.005, 300)
    s = float((T * T).sum(1).mean().sqrt())
    assert rep["delta_norm_relative"] == pytest.approx(float(delta.norm()) / s, rel=1e-6)
    n = T.norm(dim=1)
    C = (T @ T.T) / (n[:, None] * n[None, :])
    np.testing.assert_allclose(rep["cosine_before"], C.numpy(), rtol=1e-9, atol=1e-12)


def test_report_tensor_scope_and_bad_recipe(family, tmp_path):
    path = write_recipe(tmp_path, recipe(family["base"], family["fts"], steps=100, scope="tensor"))
    cli("report", path, "--out", tmp_path / "rep")
    rep = check_report(tmp_path / "rep" / "awd_report.json", 3)
    assert rep["scope_tensors"] == 14 and rep["coefficients"] is None
    bad = recipe(family["base"], family["fts"])
    bad["merge_method"] = "ties"
    proc = cli("report", write_recipe(tmp_path, bad, "bad.yml"), check=False)
    assert proc.returncode != 0 and "'ties' is not an AWD method" in proc.stderr


def test_sweep_table_and_merges(family, tmp_path):
    path = write_recipe(tmp_path, recipe(family["base"], family["fts"], steps=200))
    proc = cli("sweep", path, "--alpha", "0.001,0.5", "--lambda", "0.5,1",
               "--merge-to", tmp_path / "sweep", "--no-copy-tokenizer")
    rows = [line for line in proc.stdout.splitlines() if line.strip() and line.split()[0][0].isdigit()]
    assert len(rows) == 4
    # a larger alpha keeps delta smaller
    small, large = float(rows[0].split()[3]), float(rows[2].split()[3])
    assert large < small
    out = tmp_path / "sweep" / "alpha0.5_lambda1"
    assert sorted(os.listdir(tmp_path / "sweep")) == [
        "alpha0.001_lambda0.5", "alpha0.001_lambda1", "alpha0.5_lambda0.5", "alpha0.5_lambda1"]
    assert (out / "config.json").exists() and (out / "awd_report.json").exists()
    expected, base = reference.merge(family["base"], family["fts"], alpha=0.5, steps=200)
    merged = reference.load(str(out))
    for name, ref in expected.items():
        err = (merged[name].double() - ref).norm() / (ref - base[name]).norm()
        assert err < 1e-5, name


def test_every_awd_merge_leaves_a_report_and_mergekit_awd_merge_a_card_section(
        family, tmp_path):
    """Plain mergekit-yaml: the report, written after the last tensor (mergekit writes
    its card after that); mergekit-awd merge: the report and the card's section."""
    config = recipe(family["base"], family["fts"], steps=100)
    for how in ("mergekit-yaml", "mergekit-awd merge"):
        out = tmp_path / how.replace(" ", "_")
        if how == "mergekit-yaml":
            proc = mergekit_yaml(config, out)
        else:
            proc = cli("merge", write_recipe(tmp_path, config), out, "--no-copy-tokenizer")
        assert proc.stderr.count("mean |cos|") == 1 and proc.stderr.count("awd report:") == 1
        check_report(out / "awd_report.json", 3)
        check_svg(out / "awd_cosine.svg", 3)
        card = (out / "README.md").read_text()
        assert "mergekit" in card  # mergekit's own card is kept
        section = "## Adaptive Weight Disentanglement" in card and "awd_cosine.svg" in card
        assert section == (how == "mergekit-awd merge")


def test_failed_merge_writes_no_report(family, tmp_path):
    """A merge that fails after the global solve (NaN in a tensor merged later): the
    solve is recorded, but the model is unfinished, so no report is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(family["fts"][1], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")  # merged last
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    fts = [family["fts"][0], str(bad), family["fts"][2]]
    proc = mergekit_yaml(recipe(family["base"], fts, steps=10), tmp_path / "out", check=False)
    assert proc.returncode != 0 and "model.norm.weight contains NaN" in proc.stderr
    assert "awd Gram pass" in proc.stderr  # the solve ran before the failure
    assert not (tmp_path / "out" / "awd_report.json").exists()
    assert not (tmp_path / "out" / "config.json").exists()


def test_report_for_every_way_of_running_a_merge(family, tmp_path):
    """python -m mergekit.scripts.run_yaml, run_merge in-process, and --quiet."""
    config = recipe(family["base"], family["fts"], steps=100)
    path = write_recipe(tmp_path, config)
    out = tmp_path / "module"
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), str(out),
                           "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_report(out / "awd_report.json", 3)
    assert "awd report:" in proc.stderr and "awd Gram pass" in proc.stderr

    code = (
        "import sys, yaml\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))\n"
        "run_merge(config, sys.argv[2], MergeOptions(copy_tokenizer=False, quiet=True))\n"
        "import os; print('report' if os.path.exists(sys.argv[2] + '/awd_report.json') else 'none')\n"
    )
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["report"]  # written when run_merge returns, not at exit
    check_report(out / "awd_report.json", 3)
    # quiet: no progress bar of the Gram pass, no summary line
    assert "awd Gram pass" not in proc.stderr and "awd report:" not in proc.stderr


def test_report_refuses_a_recipe_mergekit_plans_no_tensor_for(tmp_path):
    # a bare encoder under an architecture mergekit has no definition of: mergekit
    # infers causal-LM weight names (bert.*) that the checkpoint does not have
    from transformers import BertConfig, BertModel

    paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16))
        path = tmp_path / f"m{i}"
        model.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = ["UnknownBertEncoder"]
        (path / "config.json").write_text(json.dumps(config))
        paths.append(str(path))
    proc = cli("report", write_recipe(tmp_path, recipe(paths[0], paths[1:])), check=False)
    assert proc.returncode != 0
    assert "mergekit planned no tensor at all for this recipe" in proc.stderr, proc.stderr[-2000:]
