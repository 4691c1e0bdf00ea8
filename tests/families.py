"""Tiny random models of the families community merges use, built offline from configs.

Each family is a transformers config small enough for a test (a few thousand to
a few tens of thousands of parameters). ``make`` writes a base and K
"fine-tunes": base + rms(tensor) * (shared * S + noise * E_k) per tensor, with
one S common to all fine-tunes (the redundancy AWD removes) and E_k their own,
so every tensor has task vectors of comparable relative size. With
``added_tokens`` each fine-tune also gets a tokenizer with extra tokens and a
larger vocabulary (as fine-tunes that add chat tokens do).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

_ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, num_hidden_layers=2, vocab_size=64,
             max_position_embeddings=64)

# family -> (config class name, model class name, config values)
FAMILIES: Dict[str, tuple] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_ATTN, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_ATTN, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_ATTN, tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(_ATTN, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_ATTN, head_dim=8, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_ATTN, head_dim=8)),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_ATTN, head_dim=8,
                                                                   sliding_window=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_ATTN, pad_token_id=0,
                                                   tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_head=4, n_layer=2,
                                                   vocab_size=64, n_positions=64)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_ATTN, tie_word_embeddings=False)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_ATTN)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        _ATTN, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _ATTN, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
        vocab_size=64, max_position_embeddings=70)),
    # an architecture mergekit 0.1.5 has no definition for (it infers one from the files)
    "opt (no mergekit definition)": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2,
        vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32)),
}


def build_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers

    config_name, model_name, values = FAMILIES[family]
    config = getattr(transformers, config_name)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    # random init leaves some tensors constant (norms = 1, biases = 0): give every
    # tensor values of its own so that a wrong tensor cannot pass by accident
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype)


def make(out_dir: str, family: str, *, dtype: torch.dtype = torch.float32, n_models: int = 3,
         shared: float = 0.02, noise: float = 0.01, seed: int = 0,
         added_tokens: bool = False, max_shard_size: Optional[str] = None,
         safe_serialization: bool = True) -> Dict[str, object]:
    """Write ``base`` and ``ft0..`` under ``out_dir``; return their paths."""
    model = build_model(family, dtype, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"base": _save(model, os.path.join(out_dir, "base"), max_shard_size,
                           safe_serialization, tokens=0 if added_tokens else None)}
    gen = torch.Generator().manual_seed(seed + 1)
    common = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    fts: List[str] = []
    for i in range(n_models):
        new_state = {}
        for k, v in state.items():
            if not v.is_floating_point():
                new_state[k] = v
                continue
            rms = v.float().pow(2).mean().sqrt().clamp_min(1e-3)
            eps = torch.randn(v.shape, generator=gen)
            new_state[k] = (v.float() + rms * (shared * common[k] + noise * eps)).to(dtype)
        model.load_state_dict(new_state)
        extra = (i % 2) + 1 if added_tokens else None
        if extra:
            model.resize_token_embeddings(model.config.vocab_size + extra)
        fts.append(_save(model, os.path.join(out_dir, f"ft{i}"), max_shard_size,
                         safe_serialization, tokens=extra))
        if extra:
            model.resize_token_embeddings(model.config.vocab_size - extra)
    paths["fts"] = fts
    return paths


def _save(model, path, max_shard_size, safe_serialization, tokens=None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if not safe_serialization:  # the same checkpoint as pytorch_model.bin (transformers 5
        import glob            # writes only safetensors itself)

        from safetensors.torch import load_file

        state = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            state.update(load_file(f))
            os.remove(f)
        for f in glob.glob(os.path.join(path, "*.index.json")):
            os.remove(f)
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    if model.config.model_type == "gpt_neox":
        _add_pythia_buffers(path, model.config)
    if tokens is not None:
        tokenizer(tokens).save_pretrained(path)
    return os.path.abspath(path)


def _add_pythia_buffers(path, config):
    """The buffers hub GPT-NeoX checkpoints (Pythia) store and mergekit's definition
    requires; transformers 5 no longer writes them."""
    import glob

    from safetensors.torch import load_file, save_file

    n = config.max_position_embeddings
    head = config.hidden_size // config.num_attention_heads
    rotary = int(head * getattr(config, "rotary_pct", 0.25)) or head
    import json

    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else None
    for f in glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(
            os.path.join(path, "*.bin")):
        state = load_file(f) if f.endswith(".safetensors") else torch.load(f)
        layers = {k.split(".attention.")[0] for k in state if ".attention." in k}
        layers -= {p for p in layers if index and any(  # each layer's buffers once
            k.startswith(p + ".attention.bias") for k in index["weight_map"])}
        for prefix in layers:
            state[f"{prefix}.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
            # in the model's dtype, as model.half() leaves them: -inf in float16
            dtype = next(v.dtype for v in state.values() if v.is_floating_point())
            state[f"{prefix}.attention.masked_bias"] = torch.tensor(-1e9).to(dtype)
            state[f"{prefix}.attention.rotary_emb.inv_freq"] = (1.0 / (
                10000 ** (torch.arange(0, rotary, 2).float() / rotary))).to(dtype)
        if index is not None:
            for k in state:
                index["weight_map"].setdefault(k, os.path.basename(f))
        if f.endswith(".safetensors"):
            save_file(state, f, metadata={"format": "pt"})
        else:
            torch.save(state, f)
    if index is not None:
        with open(index_path, "w") as out:
            json.dump(index, out, indent=2)


def tokenizer(extra: int = 0):
    """A word-level tokenizer of 64 tokens, plus ``extra`` added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    return tok
