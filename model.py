"""Qwen3 decoder written out by hand, loading Hugging Face safetensors checkpoints.

    from model import load_model
    model, tok = load_model("Qwen/Qwen3-0.6B-Base", device="cuda", dtype=torch.bfloat16)
    logits = model(torch.tensor([tok.encode("Question: 1+1?\nAnswer:")]))   # [batch, time, vocab]

Architecture (exactly transformers' Qwen3ForCausalLM): token embedding; per layer
RMSNorm -> grouped-query attention with per-head RMSNorm on q and k *before* rotary embedding ->
residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; lm_head (tied to the embedding when
the checkpoint has no lm_head.weight). Module names match the checkpoint's tensor names (minus the
leading "model."), so loading is a dictionary copy and LoRA/PEFT names line up.

Left out on purpose: sliding-window attention and rope scaling (Qwen3-0.6B uses neither; a config
that asks for them is refused), dropout (inference and LoRA fine-tuning only need it in the adapter).

The KV cache (`KVCache`) is one preallocated tensor pair per layer plus a [batch, slots] mask of
which slots hold real tokens, so left padding, batched prefill and batched decoding are all plain
tensor indexing: no per-sequence Python anywhere. generate.py drives it, through Qwen3.forward or, for a
CUDA graph, through Qwen3.graph_step (one decode step over the whole cache, so its shapes never change).
"""
import functools
import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# The tiny world (tiny/world.py writes its data, tiny/pretrain.py its base model): `--model tiny` in every script.
TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
BUNDLED = {"tiny": os.path.join(TINY_DIR, "model")}


class LoadError(Exception):
    """A user-facing problem with an input (a file, a flag); scripts print it as one line instead of a traceback."""


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        rope = d.get("rope_parameters") or {}
        if d.get("model_type") != "qwen3":
            raise LoadError(f"model_type is {d.get('model_type')!r}, this implementation only runs 'qwen3'")
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise LoadError("rope scaling is not implemented (Qwen3-0.6B does not use it)")
        if d.get("use_sliding_window"):
            raise LoadError("sliding-window attention is not implemented (Qwen3-0.6B does not use it)")
        kwargs = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        # Released Qwen3 configs carry a top-level rope_theta; transformers 5.x writes
        # rope_parameters={rope_theta, rope_type} instead (and defaults to 10000 when both are absent).
        kwargs["rope_theta"] = d.get("rope_theta") or rope.get("rope_theta", 10000.0)
        try:
            kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:   # a size the architecture needs is missing
            raise LoadError(f"config.json is incomplete ({e})")


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: float32 statistics, cast back to the input dtype, *then* the weight
    (transformers' order; multiplying before the cast rounds differently in bf16). Written out rather than
    F.rms_norm, whose CPU version is a composite of more ops: this form halves the norms' share of a decode step."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = upcast(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is bfloat16 or float16 (for a norm, a softmax, a sum); float32 and float64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@functools.lru_cache(maxsize=8)
def rope_inv_freq(head_dim: int, theta: float, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1, in float32 (float64 for a float64 model; computed once per
    device, not per step; a normal tensor even when first asked for under inference_mode, so training can use it)."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """Rotary tables for integer positions [B, T] -> cos and sin, each [B, 1, T, head_dim] (float32 math); the
    second half of each table repeats the first, as rotate_half pairs dimension i with i + head_dim/2."""
    work = torch.promote_types(dtype, torch.float32)
    angles = positions.to(work)[..., None] * rope_inv_freq(head_dim, theta, positions.device, work)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype)[:, None], torch.cat([sin, sin], dim=-1).to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, heads, T, head_dim], with rope_cos_sin()'s tables: x cos + rotate_half(x) sin, where
    rotate_half([x1, x2]) = [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: k[layer] is [batch, kv_heads, slots, head_dim].

    `valid[b, s]` says slot s of sequence b holds a real (non-padding) token. `length` is the number
    of slots written so far, the slots attention reads (Qwen3.graph_step, for a CUDA graph, reads them all).
    """
    k: list
    v: list
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: Qwen3Config, batch: int, slots: int, device, dtype) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        return cls(k, v, torch.zeros(batch, slots, dtype=torch.bool, device=device))

    def select(self, index, slots: int | None = None) -> "KVCache":
        """A new cache holding rows `index` of this one (for example one context row per choice), with
        room for `slots` slots in total: its `length` written slots, then empty ones (zeros)."""
        n, empty = self.length, (slots or self.valid.shape[1]) - self.length
        k, v = ([F.pad(t[index, :, :n], (0, 0, 0, empty)) for t in layers] for layers in (self.k, self.v))
        return KVCache(k, v, F.pad(self.valid[index, :n], (0, empty)), n)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        """x [B, T, hidden] -> [B, T, hidden]. kv: this layer's cached (keys, values), each [B, kv_heads, S,
        head_dim]; the new keys and values are written at `slots` and every query attends to all S of them."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        # Qwen3 normalizes every q and k head (its own weight for q and for k) *before* the rotation.
        q = apply_rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin)
        if kv is not None:
            kv[0].index_copy_(2, slots, k)
            kv[1].index_copy_(2, slots, v)
            k, v = kv
        # mask None: no padding, so T == 1 sees every key and T > 1 is a fresh causal sequence (Qwen3.forward)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


def padded_causal_mask(valid, query_slots):
    """[B, 1, T, S] bool: the query at slot query_slots[t] sees key slot s when s <= that slot (causal) and s holds
    a real token (valid [B, S]). A padding query would see no key at all, and its softmax would be NaN: it sees
    itself instead (its output is never used)."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    mask = (keys[None, :] <= query_slots[:, None])[None] & valid[:, None, :]
    return (mask | (keys[None, :] == query_slots[:, None])[None])[:, None]


class Qwen3(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, positions=None,
                logits_to_keep: int = 0, return_hidden: bool = False):
        """Logits [B, T, vocab] for input_ids [B, T].

        attention_mask [B, T] (1 = token, 0 = padding; left padding is the convention) defaults to all
        ones. With a cache the T new tokens go into slots [cache.length, cache.length + T) and attend to
        every valid earlier slot. positions default to the number of real tokens before each one, so
        padding shifts nothing. logits_to_keep=k computes the lm_head on the last k positions only
        (prefill needs just one). return_hidden=True returns the final-norm hidden states instead of logits.
        """
        B, T = input_ids.shape
        device = input_ids.device
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if cache is None:
            valid, slots = real, torch.arange(T, device=device)
        else:
            slots = torch.arange(cache.length, cache.length + T, device=device)
            cache.valid.index_copy_(1, slots, real)
            valid = cache.valid[:, :cache.length + T]
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)
        S = valid.shape[1]
        # No padding anywhere (prompts of one length, an unpadded training batch) leaves nothing to mask: one new
        # token sees every slot, and a fresh sequence (T == S) is plainly causal, which SDPA applies by itself
        # (Attention: is_causal). transformers drops an all-true mask the same way; SDPA's unmasked kernels are
        # faster and, on the CPU, give the same numbers bit for bit.
        mask = None if (T == 1 or T == S) and bool(valid.all()) else padded_causal_mask(valid, slots)
        x = self.decoder(input_ids, positions, mask, cache, slots, S)
        if cache is not None:
            cache.length += T
        x = self.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        return x if return_hidden else self.lm_head(x)

    def graph_step(self, tokens, positions, cache: KVCache, slot):
        """Next-token logits [B, vocab] for one new token per row (tokens, positions [B, 1]) written at cache slot
        `slot` (a one-element tensor): the decode step that generate.DecodeGraph captures as a CUDA graph.

        A graph replays fixed shapes and must not sync, so this step attends to every slot of the cache, masked by
        cache.valid (never forward's mask-free path, whose padding check reads a value back to the host), and
        leaves cache.length to the caller.
        """
        cache.valid.index_copy_(1, slot, torch.ones_like(tokens, dtype=torch.bool))
        mask = padded_causal_mask(cache.valid, slot)
        x = self.decoder(tokens, positions, mask, cache, slot, cache.valid.shape[1])
        return self.lm_head(self.norm(x))[:, -1]

    def decoder(self, input_ids, positions, mask, cache, slots, n_slots: int):
        """Embedding and every layer (the final norm is the caller's). With a cache each layer writes its new keys
        and values at `slots` and attends to cache slots [0, n_slots)."""
        cfg = self.config
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                kv = None if cache is None else (cache.k[i][:, :, :n_slots], cache.v[i][:, :, :n_slots])
                x = layer(x, cos, sin, mask, kv, slots)
        return x


# ----------------------------------------------------------------------------------------------
# Tokenizer and loading


class Tokenizer:
    """The checkpoint's `tokenizer.json` (via the `tokenizers` library) plus its EOS/pad ids."""

    def __init__(self, path: str, eos_ids: list[int], pad_id: int):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise LoadError(f"{path} could not be read as a tokenizer ({type(e).__name__})")
        self.eos_ids, self.pad_id = eos_ids, pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, seqs) -> list[str]:
        return self.tok.decode_batch([list(s) for s in seqs], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def resolve_model_dir(name_or_path: str) -> str:
    """A bundled name ("tiny"), a local model directory, or a hub id downloaded (config, safetensors,
    tokenizer) to the HF cache."""
    if name_or_path in BUNDLED:
        if not os.path.exists(os.path.join(BUNDLED[name_or_path], "config.json")):
            raise LoadError(f"the bundled {name_or_path!r} model is missing from {BUNDLED[name_or_path]} "
                            "(python -m tiny.world && python -m tiny.pretrain writes it)")
        return BUNDLED[name_or_path]
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise LoadError(f"model path {name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:  # offline, unknown id, no huggingface_hub, ...
        raise LoadError(f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}); "
                        "pass a local model directory (config.json, model.safetensors, tokenizer.json) instead")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({getattr(e, 'msg', e)})")
    if not isinstance(d, dict):
        raise LoadError(f"{path} is not a JSON object")
    return d


def load_state_dict(model_dir: str) -> dict:
    """Every tensor of the checkpoint, named as this model's modules are (without the leading "model.")."""
    index = _read_json(os.path.join(model_dir, "model.safetensors.index.json"))   # a sharded checkpoint's files
    state = {}
    for name in sorted(set(index.get("weight_map", {}).values())) or ["model.safetensors"]:
        path = os.path.join(model_dir, name)
        try:
            tensors = load_file(path)
        except Exception as e:   # a missing or truncated download, a file that is not safetensors
            raise LoadError(f"{path} is not a readable safetensors file ({type(e).__name__}); download it again")
        state.update({k.removeprefix("model."): t for k, t in tensors.items()})
    return state


def load_tokenizer(model_dir: str) -> Tokenizer:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise LoadError(f"{model_dir} has no tokenizer.json")
    gen, tok_cfg, cfg = (_read_json(os.path.join(model_dir, f)) for f in
                         ("generation_config.json", "tokenizer_config.json", "config.json"))
    tok = Tokenizer(path, [], 0)
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    if eos is None and tok_cfg.get("eos_token"):
        eos = tok.tok.token_to_id(tok_cfg["eos_token"])
    tok.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.get("pad_token_id")
    if pad is None and tok_cfg.get("pad_token"):
        pad = tok.tok.token_to_id(tok_cfg["pad_token"])
    tok.pad_id = pad if pad is not None else (tok.eos_ids[0] if tok.eos_ids else 0)
    return tok


def load_model(name_or_path: str, device="cpu", dtype=torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) from a Hugging Face Qwen3 directory or hub id. The model is in eval mode."""
    model_dir = resolve_model_dir(name_or_path)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise LoadError(f"{model_dir} has no config.json")
    cfg = Qwen3Config.from_dict(_read_json(cfg_path))
    state = load_state_dict(model_dir)
    cfg.tie_word_embeddings = cfg.tie_word_embeddings and "lm_head.weight" not in state   # its own head if it has one
    with torch.device("meta"):
        model = Qwen3(cfg)
    if cfg.tie_word_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:   # strict: torch names every missing, unexpected and mis-shaped tensor
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    except RuntimeError as e:   # torch's message: a header, then a line per problem (all missing keys on one)
        problems = str(e).split("\n\t")[1:]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LoadError(f"{model_dir} does not fit its config.json: {problems[0]}{more}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.name_or_path = name_or_path
    model.eval()
    if not with_tokenizer:
        return model, None
    tok = load_tokenizer(model_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise LoadError(f"tokenizer has {tok.vocab_size} tokens but the embedding only {cfg.vocab_size} rows")
    return model, tok
