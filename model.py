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
tensor indexing: no per-sequence Python anywhere. generate.py drives it.
"""
import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# The tiny world (tiny/world.py writes its data, tiny/pretrain.py its base model): `--model tiny` in every script.
TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
BUNDLED = {"tiny": os.path.join(TINY_DIR, "model")}


class LoadError(Exception):
    """A user-facing loading problem; scripts print it as one line instead of a traceback."""


def cli(main, errors=(LoadError,)):
    """Run a script's main(); a user-facing failure ends as one "error: ..." line (exit code 1), not a traceback."""
    try:
        main()
    except errors as e:
        raise SystemExit(f"error: {e}")


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
        if d.get("model_type") != "qwen3":
            raise LoadError(f"model_type is {d.get('model_type')!r}, this implementation only runs 'qwen3'")
        if d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise LoadError("rope scaling is not implemented (Qwen3-0.6B does not use it)")
        if d.get("use_sliding_window"):
            raise LoadError("sliding-window attention is not implemented (Qwen3-0.6B does not use it)")
        d = dict(d)
        # Released Qwen3 configs carry a top-level rope_theta; transformers 5.x writes
        # rope_parameters={rope_theta, rope_type} instead (and defaults to 10000 when both are absent).
        d["rope_theta"] = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads") if n not in d]
        if missing:
            raise LoadError(f"config.json lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dimension: float32 statistics, cast back to the input dtype, *then* the weight
    (transformers' order; multiplying before the cast rounds differently in bf16). Written out rather than
    F.rms_norm, whose CPU version is a composite of more ops: this form halves the norms' share of a decode step."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@functools.lru_cache(maxsize=8)
def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1, in float32 (computed once per device, not per step;
    a normal tensor even when first asked for under inference_mode, so training can use it too)."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """Rotary tables for integer positions [B, T] -> cos and signed sin, each [B, 1, T, head_dim] (float32 math).

    Rotate-half RoPE is x * cos + rotate_half(x) * sin with rotate_half([x1, x2]) = [-x2, x1]. [x2, x1] is x
    rolled by half its width, so the minus sign goes into the table once per forward: sin = [-sin, sin].
    """
    angles = positions.float()[..., None] * rope_inv_freq(head_dim, theta, positions.device)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype)[:, None], torch.cat([-sin, sin], dim=-1).to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, heads, T, head_dim], with rope_cos_sin()'s tables."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: k[layer] is [batch, kv_heads, slots, head_dim].

    `valid[b, s]` says slot s of sequence b holds a real (non-padding) token. `length` is the number
    of slots written so far; attention reads slots [0, attend_len) where attend_len defaults to the
    written length (a CUDA graph sets it to the full size so shapes never change).
    """
    k: list
    v: list
    valid: torch.Tensor
    length: int = 0
    attend_len: int | None = None

    @classmethod
    def empty(cls, cfg: Qwen3Config, batch: int, slots: int, device, dtype) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        return cls(k, v, torch.zeros(batch, slots, dtype=torch.bool, device=device))

    def attended(self, new: int) -> int:
        """How many slots attention reads while `new` tokens are being written: slots [0, attended)."""
        return self.attend_len or self.length + new

    def select(self, index, slots: int | None = None) -> "KVCache":
        """A new cache holding rows `index` of this one (for example one context row per choice), with
        room for `slots` slots in total."""
        slots = slots or self.valid.shape[1]
        n = self.length

        def take(t):
            out = t.new_zeros((len(index),) + t.shape[1:2] + (slots,) + t.shape[3:])
            out[:, :, :n] = t[index, :, :n]
            return out

        valid = self.valid.new_zeros(len(index), slots)
        valid[:, :n] = self.valid[index, :n]
        return KVCache([take(t) for t in self.k], [take(t) for t in self.v], valid, n)


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
        self.stacked, self.qkv_weight, self.qk_norm_stacked = False, None, None   # see stacked_qkv()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, slots):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.project_qkv(x).view(B, T, H + 2 * KV, D)
        # q_norm and k_norm in one call (each head with its own weight), then one rotation of all q and k heads.
        qk = apply_rope(rms_norm(qkv[:, :, :H + KV], self.qk_norm_weight(), self.q_norm.eps).transpose(1, 2), cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + KV:].transpose(1, 2)
        if cache is not None:
            cache.k[layer].index_copy_(2, slots, k)
            cache.v[layer].index_copy_(2, slots, v)
            end = cache.attended(T)
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        # mask None: no padding, so T == 1 sees every key and T > 1 is a fresh causal sequence (Qwen3.forward)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=KV != H)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def project_qkv(self, x):
        """q, k and v side by side: [B, T, (heads + 2 kv_heads) * head_dim]; one matmul inside stacked_qkv()."""
        if self.stacked:
            return F.linear(x, self.qkv_weight)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def qk_norm_weight(self):
        """q_norm's weight for every q head, then k_norm's for every kv head: [heads + kv_heads, head_dim]."""
        if self.stacked:
            return self.qk_norm_stacked
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        return torch.cat([self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(KV, D)])


@contextmanager
def stacked_qkv(model):
    """Inside this block every attention layer projects q, k and v with one matmul, their weights stacked.

    The sampler's decode step is a few dozen small matmuls, and this makes three of them one (and takes the
    per-head q/k norm weight, Attention.qk_norm_weight, once instead of on every step). The stacks are detached
    copies taken on entry: the weights must not change inside (no training step, merge or adapter switch), and
    no gradient reaches them through it. The q/k/v buffer is kept for the next entry (allocating it afresh
    costs more than the copy on a CPU). A layer whose projections are not single matrices (a LoRA adapter
    active and not merged) keeps three matmuls.
    """
    attns = [layer.self_attn for layer in model.layers]
    previous = [a.stacked for a in attns]
    for a in attns:
        weights = [p.weight for p in (a.q_proj, a.k_proj, a.v_proj)]
        a.stacked = False
        if all(w is not None for w in weights):
            buf = a.qkv_weight
            if buf is None or buf.dtype != weights[0].dtype or buf.device != weights[0].device:
                with torch.inference_mode(False):   # a normal tensor, so that it can be refilled in any mode
                    buf = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1],
                                      dtype=weights[0].dtype, device=weights[0].device)
            a.qkv_weight = torch.cat([w.detach() for w in weights], out=buf)
            a.qk_norm_stacked = a.qk_norm_weight().detach()
            a.stacked = True
    try:
        yield model
    finally:
        for a, was in zip(attns, previous):
            a.stacked = was


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

    def forward(self, x, cos, sin, mask, cache, layer, slots):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                slots=None, logits_to_keep: int = 0, return_hidden: bool = False):
        """Logits [B, T, vocab] for input_ids [B, T].

        attention_mask [B, T] (1 = token, 0 = padding; left padding is the convention) defaults to all
        ones. With a cache the T new tokens go into slots [cache.length, cache.length + T) (or the
        `slots` tensor given, which a CUDA graph needs) and attend to every valid earlier slot.
        positions default to the number of real tokens before each one, so padding shifts nothing.
        logits_to_keep=k computes the lm_head on the last k positions only (prefill needs just one).
        return_hidden=True returns the final-norm hidden states instead of logits.
        """
        B, T = input_ids.shape
        device = input_ids.device
        graph_step = slots is not None   # slots given: a CUDA graph step, being captured or replayed
        one_new_token = T == 1 and attention_mask is None and cache is not None and not graph_step
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        attention_mask = attention_mask.bool()
        if cache is None:
            valid, query_slot = attention_mask, torch.arange(T, device=device)
        else:
            if not graph_step:
                slots = torch.arange(cache.length, cache.length + T, device=device)
            cache.valid.index_copy_(1, slots, attention_mask)
            valid = cache.valid[:, :cache.attended(T)]
            query_slot = slots
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0).index_select(1, query_slot)
        S = valid.shape[1]
        # No padding anywhere (prompts of one length, an unpadded training batch) leaves nothing to mask: one new
        # token sees every slot, and a fresh sequence (T == S) is plainly causal, which SDPA applies by itself
        # (Attention: is_causal). transformers drops an all-true mask the same way; SDPA's unmasked kernels are
        # faster and, on the CPU, give the same numbers bit for bit. A graph step must not sync: it takes a mask.
        if (T == 1 or T == S) and not graph_step and bool(valid.all()):
            mask = None
        elif one_new_token:   # decoding: every valid cached slot precedes the new token, so causality is implied
            mask = valid[:, None, None, :]                                                     # [B, 1, 1, S]
        else:
            keys = torch.arange(S, device=device)
            mask = (keys[None, :] <= query_slot[:, None])[None] & valid[:, None, :]           # causal & real: [B, T, S]
            # A padding query sees no key at all; let it see itself so softmax stays finite (its output is unused).
            mask = (mask | (keys[None, :] == query_slot[:, None])[None])[:, None]             # [B, 1, T, S]

        cfg = self.config
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, i, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, slots)
        if cache is not None and not graph_step:
            cache.length += T
        x = self.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        return x if return_hidden else self.lm_head(x)


# ----------------------------------------------------------------------------------------------
# Tokenizer and loading


class Tokenizer:
    """The checkpoint's `tokenizer.json` (via the `tokenizers` library) plus its EOS/pad ids."""

    def __init__(self, path: str, eos_ids: list[int], pad_id: int):
        from tokenizers import Tokenizer as HFTokenizer
        self.tok = HFTokenizer.from_file(path)
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
    with open(path) as f:
        return json.load(f)


def load_state_dict(model_dir: str) -> dict:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise LoadError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for name in files:
        for k, t in load_file(os.path.join(model_dir, name)).items():
            state[k.removeprefix("model.")] = t
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
    if "lm_head.weight" in state and cfg.tie_word_embeddings:
        cfg.tie_word_embeddings = False  # the file has its own head: use it
    with torch.device("meta"):
        model = Qwen3(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise LoadError(f"checkpoint is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise LoadError(f"checkpoint has unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise LoadError(f"tensor {k} has shape {tuple(state[k].shape)}, the config implies {tuple(shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
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
