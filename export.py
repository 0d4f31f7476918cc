"""Export a trainer's LoRA checkpoint for the tools of the field: not part of the method, so not in lora.py.

    python lora.py export ckpt/opd.pt --peft exports/opd_adapter --merged exports/opd_merged

--peft writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors: peft's
PeftModel.from_pretrained, vLLM's LoRA serving); --merged writes a whole Hugging Face model directory with the
adapter folded into the weights (transformers, lm_eval --model hf). Both give this project's logits.
"""
import json
import os
import shutil

from safetensors.torch import save

from cli import FlagParser, output_dir, replace_atomically, write_text
from lora import adapter_state, load_adapter, load_checkpoint, lora_layers, merged, use_adapter
from model import LoadError, load_model, resolve_model_dir


def export_peft(model, out_dir: str, name: str = "default"):
    """adapter_config.json + adapter_model.safetensors in PEFT's layout, loadable with PeftModel.from_pretrained."""
    cfg = model.lora_configs[name]
    output_dir(os.path.join(out_dir, "adapter_model.safetensors"), "--peft")
    tensors = {f"base_model.model.model.{k}.weight": v.contiguous() for k, v in adapter_state(model, name).items()}
    replace_atomically(os.path.join(out_dir, "adapter_model.safetensors"), lambda f: f.write(save(tensors)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": getattr(model, "name_or_path", None), "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
    write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2))


def export_merged(model, model_dir: str, out_dir: str, name: str = "default"):
    """A full HF model directory (config, tokenizer files copied from model_dir) with the adapter merged in."""
    output_dir(os.path.join(out_dir, "model.safetensors"), "--merged")
    for f in os.listdir(model_dir):
        if f.endswith(".json") and not f.startswith("model.safetensors") or f.endswith(".txt"):
            shutil.copy(os.path.join(model_dir, f), out_dir)
    with use_adapter(model, name), merged(model):
        # a layer without adapter `name` keeps its base weight
        folded = {f"{n}.base.weight": layer.merged_weight for n, layer in lora_layers(model).items()
                  if layer.merged_weight is not None}
        state = {"model." + n.replace(".base.", ".") if n != "lm_head.weight" else n: folded.get(n, p)
                 for n, p in model.state_dict().items() if ".lora_" not in n}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    replace_atomically(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(save(tensors, {"format": "pt"})))


def main(argv=None):
    """python lora.py export CKPT --peft DIR --merged DIR"""
    p = FlagParser(description="Export a trainer's LoRA checkpoint: a PEFT adapter directory (peft, vLLM) and/or a "
                               "merged Hugging Face model directory (transformers, lm_eval --model hf).")
    export = p.add_subparsers(dest="command", required=True).add_parser("export", help="write --peft and/or --merged")
    export.add_argument("checkpoint", help="the trainer's checkpoint (.pt)")
    export.add_argument("--peft", metavar="DIR", help="adapter_config.json + adapter_model.safetensors")
    export.add_argument("--merged", metavar="DIR",
                        help="config, tokenizer and model.safetensors, the adapter folded in")
    export.add_argument("--model", help="the base model (default: the one the checkpoint names)")
    args = p.parse_args(argv)
    if not (args.peft or args.merged):
        export.error("say where: --peft DIR, --merged DIR, or both")
    ckpt = load_checkpoint(args.checkpoint)
    base = args.model or ckpt["meta"].get("base_model")
    if not base:
        raise LoadError(f"{args.checkpoint} does not name its base model; pass --model")
    model, _ = load_model(base, with_tokenizer=False)
    load_adapter(model, ckpt)
    if args.peft:
        export_peft(model, args.peft)
        print(f"peft: {args.peft}")
    if args.merged:
        export_merged(model, resolve_model_dir(base), args.merged)
        print(f"merged: {args.merged}")
