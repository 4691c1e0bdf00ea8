"""mergekit's options and recipe forms, input formats, determinism, and failures that lose nothing."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import reference
from conftest import mergekit_yaml, recipe
from synthetic import make_family

PARAMS = dict(alpha=0.01, lr=0.005, steps=200)


def assert_matches(out_dir, expected, base, tol=1e-5):
    merged = reference.load(str(out_dir))
    assert set(merged) == set(expected)
    for name, ref in expected.items():
        err = (merged[name].double() - ref).norm() / (ref - base[name]).norm().clamp_min(1e-30)
        assert err < tol, f"{name}: {err:.2e}"


def digest(folder):
    h = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                h[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return h


@pytest.mark.parametrize("form,options", [
    ("bin", ["--lazy-unpickle"]),
    ("sharded", ["--out-shard-size", "5K"]),
    ("fp16", []),
    ("safetensors", ["--low-cpu-memory", "--read-to-gpu", "--device", "cpu"]),
])
def test_input_formats_and_options(tmp_path, form, options):
    fam = make_family(str(tmp_path / "fam"), n_models=3, shared=0.02, noise=0.01, seed=5,
                      safe_serialization=form != "bin",
                      max_shard_size="20KB" if form == "sharded" else None,
                      dtype=torch.float16 if form == "fp16" else torch.float32)
    if form == "bin":
        assert os.path.exists(os.path.join(fam["base"], "pytorch_model.bin"))
    if form == "sharded":
        assert len([f for f in os.listdir(fam["base"]) if f.endswith(".safetensors")]) > 3
    out = tmp_path / "out"
    mergekit_yaml(recipe(fam["base"], fam["fts"], **PARAMS), out, *options)
    expected, base = reference.merge(fam["base"], fam["fts"], **PARAMS)
    if form == "fp16":
        merged = reference.load(str(out))
        assert {t.dtype for t in merged.values()} == {torch.float16}
        for name, ref in expected.items():
            assert ((merged[name].double() - ref).abs() <= 2 ** -10 * ref.abs() + 1e-6).all(), name
    else:
        assert_matches(out, expected, base)
    if form == "sharded":
        shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
        assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()


def test_same_recipe_twice_is_byte_identical_and_inputs_untouched(family, tmp_path):
    before = {p: digest(p) for p in [family["base"], *family["fts"]]}
    for scope, optimizer in (("global", "sgd"), ("tensor", "adam")):
        config = recipe(family["base"], family["fts"], scope=scope, optimizer=optimizer, steps=100)
        mergekit_yaml(config, tmp_path / f"a_{scope}")
        mergekit_yaml(config, tmp_path / f"b_{scope}")
        a = (tmp_path / f"a_{scope}" / "model.safetensors").read_bytes()
        b = (tmp_path / f"b_{scope}" / "model.safetensors").read_bytes()
        assert a == b
    assert {p: digest(p) for p in before} == before


def test_output_folder_that_is_an_input_is_refused(family, tmp_path):
    victim = shutil.copytree(family["fts"][0], tmp_path / "victim")
    before = digest(victim)
    fts = [str(victim), *family["fts"][1:]]
    proc = mergekit_yaml(recipe(family["base"], fts, steps=10), victim, check=False)
    assert proc.returncode != 0
    assert f"the output folder {victim} is the input model" in proc.stderr
    assert digest(victim) == before


def test_tensor_missing_from_one_model(family, tmp_path):
    broken = shutil.copytree(family["fts"][1], tmp_path / "broken")
    path = os.path.join(broken, "model.safetensors")
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    fts = [family["fts"][0], str(broken)]
    proc = mergekit_yaml(recipe(family["base"], fts, steps=10), tmp_path / "out", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.layers.1.mlp.up_proj.weight" in last and str(broken) in last
    assert not (tmp_path / "out" / "config.json").exists()


def test_interrupted_merge_leaves_no_model_and_rerun_succeeds(family, tmp_path):
    config = recipe(family["base"], family["fts"], steps=30_000_000)  # tens of seconds of solve
    path = tmp_path / "slow.yml"
    path.write_text(yaml.safe_dump(config))
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    out = tmp_path / "out"
    # the child starts with SIGINT at its default, as from a terminal: an ignored
    # SIGINT in the test process (pytest can leave one) would be inherited and make
    # Python ignore Ctrl-C in the merge
    proc = subprocess.Popen([exe, str(path), str(out), "--no-copy-tokenizer"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt once the Gram pass is over, i.e. inside the (minutes-long) solve:
    # the pass's progress bar reaching 100% says so, no timing involved
    seen = b""
    while b"awd Gram pass: 100%" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, f"the merge ended before its solve:\n{seen[-3000:].decode()}"
        seen += chunk
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Aborted!" in err.decode()  # click's answer to SIGINT
    assert not (out / "config.json").exists()
    mergekit_yaml(recipe(family["base"], family["fts"], **PARAMS), out)
    expected, base = reference.merge(family["base"], family["fts"], **PARAMS)
    assert_matches(out, expected, base)


def test_weight_given_per_tensor_is_allowed(family, tmp_path):
    config = recipe(family["base"], family["fts"], **PARAMS)
    config["models"][0]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}
    mergekit_yaml(config, tmp_path / "out")
    expected, base = reference.merge(
        family["base"], family["fts"], **PARAMS,
        weights=lambda name: [0.5 if "mlp" in name else 1.0, 1.0, 1.0])
    assert_matches(tmp_path / "out", expected, base)


def slices_recipe(family, layer_range, **parameters):
    sources = [{"model": m, "layer_range": layer_range} for m in [family["base"], *family["fts"]]]
    return {"merge_method": "awd", "base_model": family["base"],
            "slices": [{"sources": sources}], "parameters": parameters}


def test_slices_recipes(family, tmp_path):
    # the whole depth as one slice is the models: recipe
    mergekit_yaml(slices_recipe(family, [0, 2], **PARAMS), tmp_path / "slices")
    mergekit_yaml(recipe(family["base"], family["fts"], **PARAMS), tmp_path / "models")
    assert ((tmp_path / "slices" / "model.safetensors").read_bytes()
            == (tmp_path / "models" / "model.safetensors").read_bytes())
    # layers from another position: both scopes merge what the slice maps there
    # (the global Gram pass runs mergekit's own planned inputs, not tensors by name)
    moved = moved_layers(family, tmp_path / "moved_inputs", source_layer=1)
    for scope in ("global", "tensor"):
        out = tmp_path / f"moved_{scope}"
        mergekit_yaml(slices_recipe(family, [1, 2], scope=scope, **PARAMS), out)
        merged = reference.load(str(out))
        assert "model.layers.1.mlp.up_proj.weight" not in merged
        expected, base = reference.merge(moved["base"], moved["fts"], scope=scope, **PARAMS)
        assert_matches(out, expected, base)


def moved_layers(family, folder, source_layer):
    """Each input with layer ``source_layer`` renamed to layer 0 and the other layers dropped."""
    from safetensors.torch import save_file

    paths = {"fts": []}
    for i, path in enumerate([family["base"], *family["fts"]]):
        state = {}
        for name, tensor in reference.load(path).items():
            if ".layers." not in name:
                state[name] = tensor
            elif f".layers.{source_layer}." in name:
                state[name.replace(f".layers.{source_layer}.", ".layers.0.")] = tensor
        target = folder / f"m{i}"
        target.mkdir(parents=True)
        save_file(state, str(target / "model.safetensors"))
        if i == 0:
            paths["base"] = str(target)
        else:
            paths["fts"].append(str(target))
    return paths


def plan(config, out_path):
    """mergekit's own plan of a recipe (what run_merge executes)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    import mergekit_awd  # noqa: F401

    config = MergeConfiguration.model_validate(config)
    options = MergeOptions()
    LoaderCache().setup(options)
    arch = get_architecture_info(config, options)
    return MergePlanner(config, arch, options, _model_out_config(config, arch)).plan_to_disk(out_path)


def test_global_gram_pass_runs_once_under_concurrent_kernels(family, tmp_path, monkeypatch):
    """mergekit's --multi-gpu executor: one Executor per device, on threads, over one task
    universe (as MultiGPUExecutor._device_worker does, here on CPU threads)."""
    from mergekit.graph import Executor, TaskUniverse
    from mergekit.io.tasks import SaveTensor

    from mergekit_awd import scope

    calls = []
    real = scope.collect_tasks

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.2)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(scope, "collect_tasks", counting)
    targets = plan(recipe(family["base"], family["fts"], steps=50), str(tmp_path / "unused"))
    universe = TaskUniverse(targets)
    handles = [universe.get_handle(t.tensor_task) for t in targets if isinstance(t, SaveTensor)]
    results = {}

    def device_worker(part):
        executor = Executor(part, math_device="cpu", storage_device="cpu")
        for handle, value in executor._run(quiet=True):
            results[handle.task().output_weight.name] = value

    threads = [threading.Thread(target=device_worker, args=(handles[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == len(handles)
    expected, base = reference.merge(family["base"], family["fts"], steps=50)
    assert set(results) == set(expected)
    for name, ref in expected.items():
        err = (results[name].double() - ref).norm() / (ref - base[name]).norm()
        assert err < 1e-5, name


def test_lora_input_equals_the_premerged_model(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family["base"])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "premerged"))
    with_lora = [family["fts"][0], f"{family['base']}+{tmp_path / 'lora'}", family["fts"][1]]
    premerged = [family["fts"][0], str(tmp_path / "premerged"), family["fts"][1]]
    mergekit_yaml(recipe(family["base"], with_lora, **PARAMS), tmp_path / "a",
                  "--lora-merge-cache", str(tmp_path / "cache"))
    mergekit_yaml(recipe(family["base"], premerged, **PARAMS), tmp_path / "b")
    a, b = reference.load(str(tmp_path / "a")), reference.load(str(tmp_path / "b"))
    base = reference.load(family["base"])
    for name in a:
        err = (a[name].double() - b[name].double()).norm() / (b[name].double() - base[name].double()).norm()
        assert err < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_merge_agrees_with_cpu(family, tmp_path):
    for scope in ("global", "tensor"):
        config = recipe(family["base"], family["fts"], scope=scope, **PARAMS)
        mergekit_yaml(config, tmp_path / f"cpu_{scope}")
        mergekit_yaml(config, tmp_path / f"gpu_{scope}", "--cuda")
        expected, base = reference.merge(family["base"], family["fts"], scope=scope, **PARAMS)
        assert_matches(tmp_path / f"gpu_{scope}", expected, base)


def test_slices_with_other_models_per_slice(family, tmp_path):
    """One delta needs one set of fine-tunes: refused under scope global, merged per
    tensor under scope tensor."""
    base, (a, b, c) = family["base"], family["fts"]
    slices = [{"sources": [{"model": m, "layer_range": [0, 1]} for m in (base, a, b)]},
              {"sources": [{"model": m, "layer_range": [1, 2]} for m in (base, b, c)]}]
    config = {"merge_method": "awd", "base_model": base, "slices": slices,
              "parameters": dict(PARAMS)}
    proc = mergekit_yaml(config, tmp_path / "global", check=False)
    assert proc.returncode != 0
    assert "solves one delta over the fine-tunes" in proc.stderr and "Use scope: tensor" in proc.stderr
    assert not (tmp_path / "global" / "config.json").exists()
    config["parameters"]["scope"] = "tensor"
    mergekit_yaml(config, tmp_path / "tensor")
    merged = reference.load(str(tmp_path / "tensor"))
    name = "model.layers.1.mlp.up_proj.weight"
    expected, base_state = reference.merge(base, [b, c], scope="tensor", **PARAMS)
    err, allowed = reference.merge_error_allowed(merged[name], expected[name], base_state[name])
    assert err <= allowed
