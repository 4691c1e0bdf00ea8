"""Synthetic model families (a base and perturbed "fine-tunes") for tests and benchmarks.

Each fine-tune is base + shared * s + noise_k, with one ``s`` common to all of
them: the shared component is the redundancy AWD is meant to remove, and its
size relative to the noise sets the task vectors' mutual cosine.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch


def tiny_llama_config(**overrides):
    """A Llama config small enough for a test (a few thousand parameters)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_family(
    out_dir: str,
    *,
    config=None,
    n_models: int = 3,
    shared: float = 0.01,
    noise: float = 0.01,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: Optional[str] = None,
    safe_serialization: bool = True,
) -> Dict[str, object]:
    """Write ``base`` and ``ft0..ft{n-1}`` under ``out_dir``; return their paths.

    Perturbations scale with each tensor's RMS, so every tensor has task
    vectors of comparable relative size (as real fine-tunes roughly do).
    """
    from transformers import LlamaForCausalLM

    config = config or tiny_llama_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save = dict(max_shard_size=max_shard_size, safe_serialization=safe_serialization)
    paths = {"base": _save(model, os.path.join(out_dir, "base"), **save)}
    gen = torch.Generator().manual_seed(seed + 1)
    shared_dir = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float32) for k, v in state.items()
    }
    fts: List[str] = []
    for i in range(n_models):
        new_state = {}
        for k, v in state.items():
            rms = v.float().pow(2).mean().sqrt().clamp_min(1e-3)
            eps = torch.randn(v.shape, generator=gen, dtype=torch.float32)
            new_state[k] = (v.float() + rms * (shared * shared_dir[k] + noise * eps)).to(dtype)
        model.load_state_dict(new_state)
        fts.append(_save(model, os.path.join(out_dir, f"ft{i}"), **save))
    model.load_state_dict(state)
    paths["fts"] = fts
    return paths


def _save(model, path: str, max_shard_size: Optional[str], safe_serialization: bool) -> str:
    if not safe_serialization:  # transformers 5 writes only safetensors itself
        os.makedirs(path, exist_ok=True)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return os.path.abspath(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return os.path.abspath(path)
