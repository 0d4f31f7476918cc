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
readable with torch.load(weights_only=True). export.py takes them to peft/transformers/vLLM (`python lora.py export`).
"""
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import replace_atomically
from model import BUNDLED, LoadError, upcast

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
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()   # adapter name -> A [r, in], B [out, r]
        self.scale, self.dropout = {}, {}
        self.active, self.merged_weight = None, None   # the adapter in use; W + (alpha / r) B A while merged

    def add(self, name: str, cfg: LoraConfig, dtype=None, A=None, B=None):
        """Adapter `name`: the given A [r, in] and B [out, r] (a checkpoint's: nothing is drawn), or A random and
        B zero as peft does, so that a fresh adapter is a no-op. dtype: the base weight's unless given."""
        w = self.base.weight
        dtype = dtype or w.dtype
        if A is None:
            A = nn.init.kaiming_uniform_(torch.empty(cfg.r, w.shape[1], dtype=dtype), a=math.sqrt(5))
            B = torch.zeros(w.shape[0], cfg.r, dtype=dtype)
        # Only the student ("default") learns; other adapters (a teacher) stay frozen.
        self.lora_A[name] = nn.Parameter(A.to(w.device, dtype, copy=True), requires_grad=name == "default")
        self.lora_B[name] = nn.Parameter(B.to(w.device, dtype, copy=True), requires_grad=name == "default")
        self.scale[name], self.dropout[name] = cfg.alpha / cfg.r, cfg.dropout

    def merge(self):
        """W + (alpha / r) B A of the active adapter, in float32, into merged_weight (the base weight stays)."""
        if self.active is not None:
            delta = (upcast(self.lora_B[self.active]) @ upcast(self.lora_A[self.active])) * self.scale[self.active]
            self.merged_weight = (upcast(self.base.weight) + delta).to(self.base.weight.dtype)

    def forward(self, x):
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight)
        out, name = self.base(x), self.active
        if name is None:
            return out
        h = F.dropout(x, self.dropout[name]) if self.training and self.dropout[name] else x
        return out + (h @ self.lora_A[name].t() @ self.lora_B[name].t()) * self.scale[name]


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def target_layers(model, targets) -> dict:
    """{name: layer} of the projections named in `targets`: plain nn.Linear, or LoraLinear once wrapped."""
    return {n: m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, LoraLinear))}


def add_lora(model, cfg: LoraConfig, name: str = "default", dtype=None, weights: dict | None = None):
    """Add adapter `name` to every target projection (wrapping it on first use), freeze the base, and make
    `name` the active adapter. weights: {"<layer>.lora_A": tensor, ...} to start from (else a fresh init);
    dtype: the adapter's (default: the base's; a trained adapter is float32, see training.py)."""
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.requires_grad_(False)
    layers = target_layers(model, cfg.targets)
    if not layers:
        raise ValueError(f"no projection named any of {cfg.targets} in the model")
    for n, layer in layers.items():
        if not isinstance(layer, LoraLinear):
            parent, _, child = n.rpartition(".")
            # nn.Module starts in train mode: without this, an eval-mode model gets adapter dropout
            layer = LoraLinear(layer).train(model.training)
            setattr(model.get_submodule(parent), child, layer)
        layer.add(name, cfg, dtype, *((weights[f"{n}.lora_A"], weights[f"{n}.lora_B"]) if weights else ()))
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
    return {f"{n}.{ab}": getattr(layer, ab)[name].detach().cpu().clone()
            for n, layer in lora_layers(model).items() if name in layer.lora_A for ab in ("lora_A", "lora_B")}


def save_checkpoint(path: str, model, meta: dict, name: str = "default", train_state: dict | None = None):
    """Write adapter `name`, its LoRA config and `meta` (base_model, method, args, step, ...) atomically."""
    cfg = model.lora_configs[name]
    ckpt = {"adapter": adapter_state(model, name), "lora": {**asdict(cfg), "targets": list(cfg.targets)},
            "meta": {"base_model": getattr(model, "name_or_path", None), "base_config": asdict(model.config), **meta}}
    if train_state is not None:
        ckpt["train_state"] = train_state
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project, read onto the CPU with torch.load(weights_only=True): tensors and plain
    containers only, never arbitrary pickled objects (so a file from elsewhere cannot run code)."""
    if not os.path.exists(path):
        raise LoadError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch's own message suggests unpickling the file: never pass that on
        raise LoadError(f"{path} is not a LoRA checkpoint of this project (torch.load cannot read it: "
                        f"{type(e).__name__})")
    if not (isinstance(ckpt, dict) and {"adapter", "lora", "meta"} <= set(ckpt)):
        raise LoadError(f"{path} is not a LoRA checkpoint of this project (no adapter, lora and meta entries)")
    return ckpt


def _base_name(path) -> str:
    return os.path.basename(os.path.normpath(BUNDLED.get(str(path), str(path))))


def load_adapter(model, path_or_ckpt, name: str = "default", check_base: bool = True, dtype=None,
                 dropout: float | None = None) -> dict:
    """Add adapter `name` to the model with the checkpoint's config and weights (no random init is drawn);
    returns the checkpoint. dropout: the adapter's dropout from now on (default: the checkpoint's)."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    base, arch = ckpt["meta"].get("base_model"), ckpt["meta"].get("base_config")
    here = getattr(model, "name_or_path", base)
    # The same base may live in another directory (a copy, the HF cache): compare the last path component
    # and the architecture, which together catch every real mix-up without pinning absolute paths.
    if check_base and ((base and _base_name(base) != _base_name(here)) or (arch and arch != asdict(model.config))):
        raise LoadError(f"checkpoint was trained on {base!r}, not on {here!r} (check_base=False overrides)")
    lc = ckpt["lora"]
    cfg = LoraConfig(r=lc["r"], alpha=lc["alpha"], dropout=lc["dropout"] if dropout is None else dropout,
                     targets=tuple(lc["targets"]))
    expected = {}   # tensor name -> the shape this model needs
    for n, m in target_layers(model, cfg.targets).items():
        linear = m.base if isinstance(m, LoraLinear) else m
        expected[f"{n}.lora_A"], expected[f"{n}.lora_B"] = (cfg.r, linear.in_features), (linear.out_features, cfg.r)
    got = {k: tuple(t.shape) for k, t in ckpt["adapter"].items()}
    if got != expected:
        odd = sorted(k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))[0]
        raise LoadError(f"adapter tensor {odd}: the checkpoint has {got.get(odd, 'none')}, the model needs "
                        f"{expected.get(odd, 'none')}")
    previous = active_adapter(model)
    add_lora(model, cfg, name, dtype, weights=ckpt["adapter"])
    if name != "default" and previous is not None:
        set_adapter(model, previous)  # loading a teacher does not change who the student is
    return ckpt


if __name__ == "__main__":   # python lora.py export CKPT --peft DIR --merged DIR: the command lives in export.py
    from cli import run
    from export import main
    run(main)
