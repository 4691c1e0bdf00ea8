"""tune's `exact` is what greedy generation gives, for the tokenizers and chat formats
users merge: SentencePiece ("▁" words, Llama 2 / Mistral), Llama 3, Qwen2 and Gemma
chat templates (written out, built offline).

Each family gets a model that has learned one answer the way a model trained on that
format would: its greedy generation is the template's rendering of the answer up to
the template's own end of turn (a chat model stops there), or, for prompt/completion
data, the tokens that follow the prompt in prompt + completion, then the end of
sequence. The reference is generation itself: the model's greedy continuation,
decoded, must equal the completion text and stop on the end token. `exact` must say
the same, for that answer (1) and for another one (0).
"""

import json

import pytest
import torch

WORDS = ("What is the capital of France ? Paris is nice . Reverse these words : apple "
         "river stone cloud . Sort 3 1 2 . The answer is 42 . Hello there , how are you ? "
         "Fine thanks !")

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
QWEN2 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")

FAMILIES = {
    # name: (pre-tokenizer, specials, bos, eos, end of turn, chat template)
    "sentencepiece": ("metaspace", ["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", None),
    "llama3": ("bytelevel", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", LLAMA3),
    "qwen2": ("bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
              "<|endoftext|>", "<|im_end|>", QWEN2),
    "gemma": ("metaspace", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<end_of_turn>", GEMMA),
}


def _tokenizer(family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    kind, specials, bos, eos, _, template = FAMILIES[family]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece's "▁" convention
        tok = Tokenizer(models.BPE(unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator([WORDS] * 20, trainer)
    if bos and family == "sentencepiece":  # Llama 2 / Mistral: <s> before every text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token=specials[0] if kind == "metaspace" else None)
    fast.add_special_tokens({"additional_special_tokens": [
        s for s in specials if s not in (bos, eos, specials[0])]})
    if template:
        fast.chat_template = template
    return fast


def _model(vocab: int, chain: dict):
    """A Llama whose next token depends on the current one only: chain[t], else 0.
    The embedding is one-hot, the layer adds nothing (its weights are zero), the head
    reads the successor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = vocab + vocab % 2
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if "norm" not in name:
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        head = torch.zeros(vocab, hidden)
        for t, nxt in chain.items():
            head[nxt, t] = 1.0
        model.lm_head.weight.copy_(head)
    return model


def _expected_generation(family, tok, prompt, completion):
    """The ids a model trained on this format generates after the prompt, and the
    prompt's ids: written out per format, not with the scorer's code."""
    _, _, _, eos, end, template = FAMILIES[family]
    end_id = tok.convert_tokens_to_ids(end)
    if template is None:  # prompt/completion: the tail of the joint tokenization
        full = tok(prompt + completion)["input_ids"]
        prompt_ids = tok(prompt)["input_ids"]
        return prompt_ids, full[len(prompt_ids):] + [end_id]
    turns = [{"role": "user", "content": prompt}]
    prompt_ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    full = tok.apply_chat_template(turns + [{"role": "assistant", "content": completion}],
                                   tokenize=True, return_dict=True)["input_ids"]
    answer = full[len(prompt_ids):]
    return prompt_ids, answer[:answer.index(end_id) + 1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_is_greedy_generation(family, tmp_path):
    from mergekit_awd import evaluate

    tok = _tokenizer(family)
    prompt, right, wrong = "What is the capital of France ?", " Paris is nice .", " Fine thanks !"
    if FAMILIES[family][5] is not None:  # chat content has no leading space
        right, wrong = right.strip(), wrong.strip()
    prompt_ids, answer = _expected_generation(family, tok, prompt, right)
    assert len(set(answer)) == len(answer)  # a chain of distinct tokens
    chain = dict(zip([prompt_ids[-1]] + answer[:-1], answer))
    model = _model(len(tok), chain)
    end_id = tok.convert_tokens_to_ids(FAMILIES[family][4])

    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for completion in (right, wrong):
            if FAMILIES[family][5] is None:
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            else:
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion}]}) + "\n")
    (task,) = evaluate.load_tasks([f"t={path}"], tok, family)
    got = evaluate.score(model, [task])["t"]["exact_each"]

    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=len(answer) + 3,
                         do_sample=False, eos_token_id=end_id, pad_token_id=0)[0]
    generated = out[len(prompt_ids):].tolist()
    stopped = generated[-1] == end_id
    text = tok.decode(generated[:-1], skip_special_tokens=True)
    truth = [float(stopped and text.strip() == c.strip()) for c in (right, wrong)]
    assert truth == [1.0, 0.0]  # the model answers `right` and stops: not vacuous
    assert got == truth, (family, task.examples, generated)


def test_a_prompt_whose_tokens_change_is_scored_with_the_completion_alone(tmp_path, caplog):
    from mergekit_awd import evaluate

    tok = _tokenizer("llama3")
    # "is " + "42": byte-level BPE tokenizes " 42" with its space, so the prompt's own
    # trailing-space token is gone from the joint tokenization
    plain = tok("The answer is ", add_special_tokens=False)["input_ids"]
    joint = tok("The answer is 42", add_special_tokens=False)["input_ids"]
    assert joint[:len(plain)] != plain
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "The answer is ", "completion": "42"}) + "\n"
                    + json.dumps({"prompt": "The answer is", "completion": " 42"}) + "\n")
    with caplog.at_level("WARNING"):
        (task,) = evaluate.load_tasks([f"t={path}"], tok, "m")
    assert "in 1 of 2 examples the prompt's tokens change" in caplog.text
    eos = tok.eos_token_id
    assert task.examples[0][1] == tok("42", add_special_tokens=False)["input_ids"] + [eos]
    assert task.examples[1][1] == tok(" 42", add_special_tokens=False)["input_ids"] + [eos]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_greedy_answer_ends_at_the_end_of_turn_and_the_generation_config(family, tmp_path):
    """tune's greedy answers (entropy, --objective entropy) stop where a chat answer
    ends: the end of sequence, the template's end of turn, and the model's
    generation_config.eos_token_id; text after the turn is never read."""
    import json as json_

    from mergekit_awd import evaluate

    tok = _tokenizer(family)
    _, _, _, eos, end, template = FAMILIES[family]
    eos_id, end_id = tok.convert_tokens_to_ids(eos), tok.convert_tokens_to_ids(end)
    folder = tmp_path / "model"
    folder.mkdir()
    assert evaluate.answer_ends(tok, str(folder)) == list(dict.fromkeys([eos_id, end_id]))
    (folder / "generation_config.json").write_text(json_.dumps({"eos_token_id": [7, eos_id]}))
    assert evaluate.answer_ends(tok, str(folder)) == list(dict.fromkeys([eos_id, end_id, 7]))
    (folder / "generation_config.json").write_text(json_.dumps({"eos_token_id": 9}))
    assert evaluate.answer_ends(tok, str(folder)) == list(dict.fromkeys([eos_id, end_id, 9]))
    # the model says three words, the end of turn, then goes on: the answer stops there
    words = [t for t in range(len(tok)) if t not in (eos_id, end_id, 7, 9)][-5:]
    chain = {words[0]: words[1], words[1]: words[2], words[2]: end_id, end_id: words[3],
             words[3]: words[4]}
    model = _model(len(tok), chain)
    (answer,) = evaluate.greedy_answers(model, [[words[0]]], evaluate.answer_ends(
        tok, str(folder)), max_new_tokens=8)
    assert answer == [words[1], words[2], end_id]
