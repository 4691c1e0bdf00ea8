"""The offline example: real (tiny) fine-tunes, the shipped recipe, a usable merged model."""

import os
import subprocess
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_models_merge_with_the_shipped_recipe(tmp_path):
    import yaml

    import examples

    models = tmp_path / "tiny-llama"
    threads = torch.get_num_threads()
    paths = examples.make(str(models), base_steps=30, ft_steps=10)
    # it trains on one thread, deterministically, and leaves the caller's settings
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert sorted(paths) == sorted(["base", *examples.TASKS])
    # fine-tuning really changed the weights
    from safetensors.torch import load_file
    base = load_file(os.path.join(paths["base"], "model.safetensors"))
    ft = load_file(os.path.join(paths["add"], "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert (ft[name] - base[name]).norm() > 1e-3 * base[name].norm()

    with open(os.path.join(ROOT, "example_configs", "tiny-awd.yml")) as f:
        text = f.read().replace("./example_models/tiny-llama", str(models))
    config = yaml.safe_load(text)
    out = tmp_path / "merged"
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    with open(tmp_path / "r.yml", "w") as f:
        yaml.safe_dump(config, f)
    proc = subprocess.run([exe, str(tmp_path / "r.yml"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).exists(), name

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("<s>R|abc>", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0].tolist() == [1] + examples.encode("R|abc>")
    assert torch.isfinite(model(ids).logits).all()
    # the merged weights are the shipped recipe's AWD merge of these fine-tunes
    import reference

    p = config["parameters"]
    expected, base_state = reference.merge(paths["base"], [paths[t] for t in examples.TASKS],
                                           lam=p["lambda"], alpha=p["alpha"], lr=p["lr"],
                                           steps=p["steps"])
    merged = reference.load(str(out))
    for key, ref in expected.items():
        err, allowed = reference.merge_error_allowed(merged[key], ref, base_state[key])
        assert err <= allowed, (key, err, allowed)
    scores = examples.accuracy(str(out), n=3)
    assert set(scores) == set(examples.TASKS)
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in scores.values())  # n = 3 prompts


SHIPPED = os.path.join(ROOT, "example_models", "tiny-llama")


def test_the_shipped_example_models_are_the_ones_the_readme_numbers_came_from():
    """The quick start merges the committed weights: their SHA-256 are the manifest's,
    and the fingerprint the quick start printed in the committed log (the README's
    numbers) is the manifest's too."""
    import examples

    expected = examples.manifest()
    assert sorted({name.split("/")[0] for name in expected}) == sorted(["base", *examples.TASKS])
    assert all(f"{m}/model.safetensors" in expected for m in ["base", *examples.TASKS])
    assert examples.differences(SHIPPED, expected) == []
    fingerprint = examples.check(SHIPPED)
    log = open(os.path.join(ROOT, "docs", "quickstart.log"), encoding="utf-8").read()
    assert (f"example models: example_models/tiny-llama (shipped, SHA-256 {fingerprint} "
            "as in the README)") in log.splitlines()


def test_a_changed_or_missing_example_model_is_refused_by_name(tmp_path):
    import shutil

    import examples

    copy = tmp_path / "tiny-llama"
    shutil.copytree(SHIPPED, copy)
    assert examples.differences(str(copy), examples.manifest()) == []
    weights = copy / "sort" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    os.remove(copy / "add" / "tokenizer.json")
    with pytest.raises(SystemExit) as info:
        examples.check(str(copy))
    message = str(info.value)
    assert "missing: add/tokenizer.json" in message
    assert "changed: sort/model.safetensors" in message
    assert "changed: base" not in message and "git checkout" in message
