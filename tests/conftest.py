"""Shared test fixtures: tiny random Qwen3 checkpoints written by transformers itself (the reference)."""
import os

import pytest
import torch

HERE = os.path.dirname(__file__)
TOKENIZER_DIR = os.path.join(HERE, "data", "qwen3_tokenizer")

# Small configs that still exercise every architectural switch: tied/untied head, MHA/GQA/one KV head,
# head_dim != hidden/heads, different rope theta, and both spellings of rope_theta in config.json.
CONFIGS = {
    "gqa_tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=1_000_000.0),
    "mha_untied": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=12, tie_word_embeddings=False, rope_theta=10_000.0),
    "one_kv_wide_heads": dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, rope_theta=500.0),
}


def make_hf_model(path, vocab_size=1000, seed=0, **overrides):
    """Write a random transformers Qwen3ForCausalLM with save_pretrained; return the HF model (fp32, eval)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1, **overrides)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # default init leaves norms at exactly 1: randomize them so their order matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return model


def reference_logprobs(model, ids, attention_mask=None, temperature: float = 1.0):
    """log p(ids[:, t+1] | ids[:, :t+1]) -> [B, T-1], straight from the model's full logits: the plain reference
    that the sampler's recorded log-probs, score() and the trainers' token log-probs are checked against."""
    logits = model(ids, attention_mask)[:, :-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def write_byte_tokenizer(path, vocab_size=1000):
    """A tiny byte-level BPE tokenizer.json (ids < vocab_size), eos = pad = id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer: 3 + 4 = 7\n#### 7"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A GQA, tied-embedding tiny Qwen3 with a byte-level tokenizer: a complete model directory."""
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    make_hf_model(path, **CONFIGS["gqa_tied"])
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (model_dir, transformers model) for every config in CONFIGS."""
    out = {}
    for i, (name, over) in enumerate(CONFIGS.items()):
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (path, make_hf_model(path, seed=i, **over))
        write_byte_tokenizer(path)
    return out
