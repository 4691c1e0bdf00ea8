"""Kept Gram passes: `report` then the merge of the same inputs read them once; a
changed input file, another selection or another dtype never reuses one."""

import json
import os
import shutil
import subprocess
import sys

import yaml
from safetensors.torch import load_file, save_file

import reference
from conftest import mergekit_yaml, recipe

PASS = "awd Gram pass"


def report(config, tmp_path, name="r"):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-awd")
    proc = subprocess.run([exe, "report", str(path), "--out", str(tmp_path / f"rep-{name}")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kept(tmp_path):
    where = tmp_path / "gram-cache"
    return sorted(os.listdir(where)) if where.exists() else []


def check_merge(out, base, fts, **parameters):
    expected, base_state = reference.merge(base, fts, **parameters)
    merged = reference.load(str(out))
    for name, ref in expected.items():
        err = (merged[name].double() - ref).norm() / (ref - base_state[name]).norm()
        assert err < 1e-5, name


def test_report_then_merge_read_the_inputs_once(family, tmp_path):
    config = recipe(family["base"], family["fts"], steps=50)
    assert PASS in report(config, tmp_path).stderr
    assert len(kept(tmp_path)) == 1
    proc = mergekit_yaml(config, tmp_path / "out")
    assert PASS not in proc.stderr  # the report's pass, reused
    check_merge(tmp_path / "out", family["base"], family["fts"], steps=50)
    rep = json.loads((tmp_path / "out" / "awd_report.json").read_text())
    first = json.loads((tmp_path / "rep-r" / "awd_report.json").read_text())
    assert rep["cosine_after"] == first["cosine_after"] and rep["w"] == first["w"]
    assert rep["scope_parameters"] == first["scope_parameters"]


def test_a_changed_input_file_is_never_reused(family, tmp_path):
    ft = tmp_path / "ft1"
    shutil.copytree(family["fts"][1], ft)
    fts = [family["fts"][0], str(ft), family["fts"][2]]
    config = recipe(family["base"], fts, steps=50)
    report(config, tmp_path)
    state = load_file(str(ft / "model.safetensors"))
    for name, t in state.items():
        if t.ndim == 2:
            state[name] = t + 0.05 * t.std() * (t.roll(1, 0))  # same size, other values
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    proc = mergekit_yaml(config, tmp_path / "out")
    assert PASS in proc.stderr
    check_merge(tmp_path / "out", family["base"], fts, steps=50)
    assert len(kept(tmp_path)) == 2


def test_another_selection_is_never_reused(family, tmp_path):
    """`select: linear` and the regex `\.layers\.` plan the same tensors (by name),
    but the regex also disentangles the 1-D norms inside the layers."""
    report(recipe(family["base"], family["fts"], steps=50), tmp_path)
    proc = mergekit_yaml(recipe(family["base"], family["fts"], steps=50, select=r"\.layers\."),
                         tmp_path / "out")
    assert PASS in proc.stderr
    rep = json.loads((tmp_path / "out" / "awd_report.json").read_text())
    assert rep["scope_tensors"] == sum(1 for n in load_file(
        os.path.join(family["base"], "model.safetensors")) if ".layers." in n)


def test_another_dtype_is_never_reused(family, tmp_path):
    config = recipe(family["base"], family["fts"], steps=50)
    report(config, tmp_path)
    proc = mergekit_yaml(dict(config, dtype="bfloat16"), tmp_path / "out")
    assert PASS in proc.stderr
    assert len(kept(tmp_path)) == 2


def test_keeping_can_be_switched_off(family, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_AWD_CACHE", "off")
    config = recipe(family["base"], family["fts"], steps=50)
    report(config, tmp_path)
    assert PASS in mergekit_yaml(config, tmp_path / "out").stderr
