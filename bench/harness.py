"""What the benchmarks share: random Qwen3 models of a given shape, and a timer that waits for the GPU.

Real weights are not needed to time anything: the shapes (and, with the Qwen tokenizer, the text lengths)
are what cost. Every benchmark builds its model here, one way: transformers' own Qwen3ForCausalLM with
its own initialization (N(0, 0.02) matrices, unit norms), written with save_pretrained, so our loader reads
exactly what a user's checkpoint directory holds. transformers is a benchmark-only dependency.
"""
import json
import os
import shutil
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_TOKENIZER = os.path.join(ROOT, "tests", "data", "qwen3_tokenizer")
QWEN_VOCAB = 151936

# The benchmarks' small model (3.4M parameters with its 1,024-token vocabulary); "0.6b" is Qwen3-0.6B-Base's shape.
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, tie_word_embeddings=True)
ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta")


def shape(name: str, vocab_size: int | None = None) -> dict:
    """The architecture of "small" or "0.6b" (configs/qwen3-0.6b-base.json), optionally with another vocabulary."""
    if name == "small":
        cfg = dict(SMALL)
    else:
        with open(os.path.join(ROOT, "configs", "qwen3-0.6b-base.json")) as f:
            full = json.load(f)
        cfg = {k: full[k] for k in ARCHITECTURE}
    return {**cfg, **({"vocab_size": vocab_size} if vocab_size else {})}


def random_model(out: str, cfg: dict, tokenizer_dir: str | None = None, eos_token_id: int | None = None,
                 seed: int = 0) -> str:
    """Write a model directory with random weights of architecture `cfg` (and the tokenizer files of
    tokenizer_dir, if given) to `out`; returns out."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    ids = {} if eos_token_id is None else dict(eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                                               pad_token_id=eos_token_id)
    Qwen3ForCausalLM(Qwen3Config(**cfg, **ids)).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir else ():
        shutil.copy(os.path.join(tokenizer_dir, f), out)
    return out


def timed(fn, device: str):
    """(fn(), wall seconds), the GPU's queued work included."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0
