"""The offline example: real (tiny) fine-tunes, the shipped recipe, a usable merged model."""

import os
import subprocess
import sys

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_models_merge_with_the_shipped_recipe(tmp_path):
    import yaml

    from mergekit_awd import examples

    models = tmp_path / "tiny-llama"
    paths = examples.make(str(models), base_steps=30, ft_steps=10)
    assert sorted(paths) == sorted(["base", *examples.TASKS])
    # fine-tuning really changed the weights
    from safetensors.torch import load_file
    base = load_file(os.path.join(paths["base"], "model.safetensors"))
    ft = load_file(os.path.join(paths["add"], "model.safetensors"))
    assert (ft["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0

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
    scores = examples.accuracy(str(out), n=3)
    assert set(scores) == set(examples.TASKS)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
