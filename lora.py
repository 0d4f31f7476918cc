"""LoRA written here: adapters on chosen projections, merged sampling, the base as reference, checkpoints.

    from lora import LoraConfig, add_lora, use_adapter, merged, save_checkpoint, load_adapter
    add_lora(model, LoraConfig(r=64, alpha=128))            # student adapter "default", base frozen
    load_adapter(model, "ckpt/sft_stress.pt", name="teacher")  # a second adapter on the same base
    with use_adapter(model, "teacher"): ...                 # the teacher policy
    with use_adapter(model, None): ...                      # the frozen base (reference policy for KL)
    with merged(model): generate(...)                       # sampling with the adapter folded into W

A LoRA linear computes W x + (alpha / r) * B A dropout(x), A random and B zero so a fresh adapter changes
nothing. One base model can carry several named adapters (OPD's teacher and student) and switch between
them, so no second copy of the 0.6B weights is ever needed.

Merging writes W + (alpha / r) B A into a separate tensor that the layer uses while merged, and unmerging
drops it: the base weight is never modified, so unmerge restores it bit for bit (subtracting B A back out
would not, in floating point).

Checkpoints are plain `.pt` dictionaries (adapter tensors, LoRA config, metadata, optional trainer state)
readable with torch.load(weights_only=True). export_peft/export_merged take results to peft/transformers/vLLM.
"""
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import BUNDLED, LoadError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple = ALL_TARGETS


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus named low-rank adapters, one of which (or none) is active."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scale, self.dropout = {}, {}
        self.active = None
        self.merged_weight = None

    def add(self, name: str, cfg: LoraConfig):
        w = self.base.weight
        A = torch.empty(cfg.r, w.shape[1], device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as peft: A random, B zero -> a fresh adapter is a no-op
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(w.shape[0], cfg.r, device=w.device, dtype=w.dtype))
        self.scale[name], self.dropout[name] = cfg.alpha / cfg.r, cfg.dropout
        # Only the student ("default") learns; other adapters (a teacher) stay frozen.
        self.lora_A[name].requires_grad_(name == "default")
        self.lora_B[name].requires_grad_(name == "default")

    def delta(self, name: str):
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scale[name]

    @property
    def weight(self):
        """The one matrix this layer applies, if it is one (merged, or no adapter active), else None."""
        if self.merged_weight is not None:
            return self.merged_weight
        return self.base.weight if self.active is None else None

    def merge(self):
        if self.active is not None:
            self.merged_weight = (self.base.weight.float() + self.delta(self.active)).to(self.base.weight.dtype)

    def forward(self, x):
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight)
        out = self.base(x)
        name = self.active
        if name is None:
            return out
        p = self.dropout[name] if self.training else 0.0
        h = F.dropout(x, p) if p else x
        return out + (h @ self.lora_A[name].t() @ self.lora_B[name].t()) * self.scale[name]


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model, cfg: LoraConfig, name: str = "default"):
    """Add adapter `name` to every target projection (wrapping them on first use), freeze everything
    else, and make `name` the active adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in cfg.targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoraLinear(child))
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"no projection named any of {cfg.targets} in the model")
    for n, layer in layers.items():
        if n.rsplit(".", 1)[-1] in cfg.targets:
            layer.add(name, cfg)
    set_adapter(model, name)
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: cfg}
    return model


def lora_parameters(model, name: str = "default"):
    return [p for layer in lora_layers(model).values() if name in layer.lora_A
            for p in (layer.lora_A[name], layer.lora_B[name])]


def set_adapter(model, name):
    """Make adapter `name` active in every LoRA layer (None: the frozen base)."""
    for layer in lora_layers(model).values():
        if layer.merged_weight is not None:
            raise RuntimeError("switch adapters outside `merged(model)`")
        layer.active = name if (name is None or name in layer.lora_A) else None


def active_adapter(model):
    return next((layer.active for layer in lora_layers(model).values() if layer.active is not None), None)


@contextmanager
def use_adapter(model, name):
    """Temporarily run as adapter `name` (None: the frozen base policy, the reference for KL)."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


@contextmanager
def merged(model):
    """Fold the active adapter into the weights for the duration (fast sampling, no LoRA matmuls)."""
    layers = lora_layers(model).values()
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    try:
        yield model
    finally:
        for layer in layers:
            layer.merged_weight = None


# ----------------------------------------------------------------------------------------------
# Checkpoints


def adapter_state(model, name: str = "default") -> dict:
    """{'layers.0.self_attn.q_proj.lora_A': tensor, ...} for adapter `name` (CPU copies)."""
    state = {}
    for n, layer in lora_layers(model).items():
        if name in layer.lora_A:
            state[f"{n}.lora_A"] = layer.lora_A[name].detach().cpu().clone()
            state[f"{n}.lora_B"] = layer.lora_B[name].detach().cpu().clone()
    return state


def save_checkpoint(path: str, model, meta: dict, name: str = "default", train_state: dict | None = None):
    """Write adapter `name`, its LoRA config and `meta` (base_model, method, args, step, ...) atomically."""
    cfg = model.lora_configs[name]
    ckpt = {"adapter": adapter_state(model, name), "lora": {**asdict(cfg), "targets": list(cfg.targets)},
            "meta": {"base_model": getattr(model, "name_or_path", None), "base_config": asdict(model.config), **meta}}
    if train_state is not None:
        ckpt["train_state"] = train_state
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise LoadError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path} is not a LoRA checkpoint of this project ({type(e).__name__}: {e})")


def load_adapter(model, path_or_ckpt, name: str = "default", check_base: bool = True) -> dict:
    """Add adapter `name` to the model with the checkpoint's config and weights; returns the checkpoint."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    base, arch = ckpt["meta"].get("base_model"), ckpt["meta"].get("base_config")
    here = getattr(model, "name_or_path", base)
    # The same base may live in another directory (a copy, the HF cache): compare the last path component
    # and the architecture, which together catch every real mix-up without pinning absolute paths.
    if check_base and ((base and _base_name(base) != _base_name(here)) or (arch and arch != asdict(model.config))):
        raise LoadError(f"checkpoint was trained on {base!r}, not on {here!r} (check_base=False overrides)")
    lc = ckpt["lora"]
    cfg = LoraConfig(r=lc["r"], alpha=lc["alpha"], dropout=lc["dropout"], targets=tuple(lc["targets"]))
    previous = active_adapter(model)
    add_lora(model, cfg, name)
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}" for n, layer in layers.items() if name in layer.lora_A for ab in "AB"}
    if set(ckpt["adapter"]) != expected:
        odd = sorted(set(ckpt["adapter"]) ^ expected)[0]
        raise LoadError(f"adapter tensors do not match the model (first mismatch: {odd})")
    with torch.no_grad():
        for key, t in ckpt["adapter"].items():
            layer_name, ab = key.rsplit(".", 1)
            param = (layers[layer_name].lora_A if ab == "lora_A" else layers[layer_name].lora_B)[name]
            if param.shape != t.shape:
                raise LoadError(f"adapter tensor {key} has shape {tuple(t.shape)}, the model needs {tuple(param.shape)}")
            param.copy_(t)
    if name != "default" and previous is not None:
        set_adapter(model, previous)  # loading a teacher does not change who the student is
    return ckpt


# ----------------------------------------------------------------------------------------------
# Export


def _base_name(path) -> str:
    return os.path.basename(os.path.normpath(BUNDLED.get(str(path), str(path))))


def export_peft(model, out_dir: str, name: str = "default"):
    """adapter_config.json + adapter_model.safetensors in PEFT's layout, loadable with PeftModel.from_pretrained."""
    from safetensors.torch import save_file
    cfg = model.lora_configs[name]
    os.makedirs(out_dir, exist_ok=True)
    tensors = {f"base_model.model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v.contiguous()
               for k, v in adapter_state(model, name).items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": getattr(model, "name_or_path", None),
              "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
              "inference_mode": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_merged(model, model_dir: str, out_dir: str, name: str = "default"):
    """A full HF model directory (config, tokenizer files copied from model_dir) with the adapter merged in."""
    import shutil
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(model_dir):
        if f.endswith(".json") and not f.startswith("model.safetensors") or f.endswith(".txt"):
            shutil.copy(os.path.join(model_dir, f), out_dir)
    with use_adapter(model, name), merged(model):
        state = {}
        for n, p in model.state_dict().items():
            if ".lora_" in n or n.endswith(".merged_weight"):
                continue
            state["model." + n.replace(".base.", ".") if n != "lm_head.weight" else n] = p
        for n, layer in lora_layers(model).items():
            state[f"model.{n}.weight"] = layer.merged_weight
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
