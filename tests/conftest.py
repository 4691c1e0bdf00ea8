import os
import subprocess
import sys

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))
# the example models' builder (not part of the package)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "example_configs"))


@pytest.fixture(autouse=True)
def gram_cache_per_test(tmp_path, monkeypatch):
    """Each test keeps its Gram passes in its own folder (merges in one test may reuse
    them, as a user's commands do; tests never see each other's)."""
    monkeypatch.setenv("MERGEKIT_AWD_CACHE", str(tmp_path / "gram-cache"))


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny Llama base and three correlated fine-tunes (float32)."""
    from synthetic import make_family

    return make_family(str(tmp_path_factory.mktemp("family")), n_models=3,
                       shared=0.02, noise=0.01, seed=0)


EXAMPLE_TASKS = ("reverse", "sort", "shift", "add")


@pytest.fixture(scope="session")
def example(tmp_path_factory):
    """The tiny example Llama, four real (short) fine-tunes, and held-out JSONL."""
    import examples

    root = tmp_path_factory.mktemp("example")
    paths = examples.make(str(root / "models"), base_steps=60, ft_steps=40)
    data = examples.write_data(str(root / "data"), n=24)
    recipe = {
        "merge_method": "awd",
        "base_model": paths["base"],
        "models": [{"model": paths[t]} for t in EXAMPLE_TASKS],
        "parameters": {"lambda": 0.5, "alpha": 0.01, "steps": 200},
        "dtype": "float32",
    }
    return root, paths, data, recipe


def recipe(base, fts, weights=None, **parameters):
    models = []
    for i, path in enumerate(fts):
        entry = {"model": path}
        if weights is not None:
            entry["parameters"] = {"weight": weights[i]}
        models.append(entry)
    config = {"merge_method": "awd", "models": models, "parameters": parameters}
    if base is not None:
        config["base_model"] = base
    return config


def write_yaml(path, config):
    """A recipe written where a command reads it; its path as a string."""
    path.write_text(yaml.safe_dump(config))
    return str(path)


def data_args(data, split="val", tasks=EXAMPLE_TASKS):
    """`tune`'s --data (validation) or --test options for the example tasks."""
    flag = "--data" if split == "val" else "--test"
    return [a for t in tasks for a in (flag, f"{t}={data[f'{t}.{split}']}")]


def mergekit_yaml(config, out_dir, *options, check=True):
    """Run the real `mergekit-yaml` CLI in a subprocess, as a user would."""
    config_path = os.path.join(os.path.dirname(str(out_dir)), os.path.basename(str(out_dir)) + ".yml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    proc = subprocess.run(
        [exe, config_path, str(out_dir), "--no-copy-tokenizer", *options],
        capture_output=True, text=True, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{proc.stderr[-4000:]}")
    return proc
