"""Pretrain the tiny world's base model from scratch: a small Qwen3 (model.py) on tiny/world.py's corpus.

    python -m tiny.world && python -m tiny.pretrain         # a base of this recipe: about 25 min on 2 idle CPU cores
    python -m tiny.pretrain --threads 1 --eval-every 0 --eval-n 100    # the bundled base's exact command (1 thread)
    python -m tiny.pretrain --device cuda                   # the same recipe on a GPU (about a minute)
    python -m tiny.pretrain --steps 300 --out /tmp/tiny     # a quick look (the schedule fits any length)

The recipe (the defaults): a 4-layer Qwen3, hidden 192, 4 query / 2 KV heads of 48, SwiGLU 512, tied
embeddings, vocabulary 1024 (1.8M parameters); 1417 steps of 32 sequences of 256 tokens (11.6M tokens,
one pass over the corpus), packed from shuffled documents with <|endoftext|> between them (and
attending across it, as most pretraining does); AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
lr 2e-3, 100 warmup steps, cosine decay to a tenth of the peak, gradient clipping at 1.0; float32 on
CPU (6k to 8k tokens/s on 2 cores, by machine), bf16 autocast on CUDA. `--minutes` replaces the step budget by a
wall-clock one (the schedule then follows elapsed time, so such a run is not bit-reproducible).

The output is a Hugging Face model directory (config.json with a top-level rope_theta, model.safetensors
with transformers' tensor names, lm_head left out because it is tied, tokenizer files,
generation_config.json) that model.load_model and transformers' Qwen3ForCausalLM both load, plus
pretrain.json (the arguments, the loss curve, the wall time and a quick evaluation with evaluate.py's
protocols on `--eval-n` items per task).

Left out: dropout (the model is tiny and sees every document a few times), document masking, mixed
precision on CPU, distributed training.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from evaluate import (eval_gsm8k, eval_mmlu, eval_truthfulqa, load_gsm8k, load_mmlu, load_truthfulqa,
                      stratified_subset)
from model import Qwen3, Qwen3Config, load_tokenizer

TINY = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TINY)   # pretrain.json records paths relative to the repository


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join(TINY, "data"), help="tiny/world.py's output")
    p.add_argument("--out", default=os.path.join(TINY, "model"), help="model directory to write")
    p.add_argument("--hidden", type=int, default=192, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=48, help="dimension of each head")
    p.add_argument("--intermediate", type=int, default=512, help="SwiGLU width")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="rotary base")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--steps", type=int, default=1417, help="optimizer steps (the schedule's length)")
    p.add_argument("--minutes", type=float, default=0, help="train for this wall time instead of --steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--eval-n", type=int, default=200, help="items per task in the quick evaluation (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-split", default="validation", help="GSM8K split of the quick evaluation")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data: every document followed by EOS, shuffled each epoch, cut into rows of seq_len + 1 tokens


class PackedDocuments:
    def __init__(self, docs: list[list[int]], eos: int, seq_len: int, seed: int):
        self.docs = [torch.tensor(d + [eos], dtype=torch.long) for d in docs]
        self.seq_len, self.epoch, self.rows, self.next_row = seq_len, 0, None, 0
        self.gen = torch.Generator().manual_seed(seed)

    def _new_epoch(self):
        order = torch.randperm(len(self.docs), generator=self.gen).tolist()
        stream = torch.cat([self.docs[i] for i in order])
        n = len(stream) // (self.seq_len + 1)
        self.rows, self.next_row = stream[:n * (self.seq_len + 1)].view(n, self.seq_len + 1), 0
        self.epoch += 1

    def batch(self, size: int) -> torch.Tensor:
        if self.rows is None or self.next_row + size > len(self.rows):
            self._new_epoch()
        rows = self.rows[self.next_row:self.next_row + size]
        self.next_row += size
        return rows


# ----------------------------------------------------------------------------------------------
# Quick evaluation: evaluate.py's protocols on a few items


def quick_eval(model, tok, data_dir: str, n: int, split: str = "test") -> dict:
    """The study's three scores on the first n GSM8K/TruthfulQA items and n stratified MMLU rows. With split
    "validation", the retention tasks' validation items where the world has them (worlds 3 on), else the test items."""
    model.eval()
    gsm8k, _ = eval_gsm8k(model, tok, load_gsm8k(split, data_dir)[:n], progress=False)
    held = split == "validation" and os.path.exists(os.path.join(data_dir, "truthfulqa", "validation.json"))
    items = load_truthfulqa(data_dir, "validation.json" if held else "mc_task.json")[:n]
    truthfulqa, _ = eval_truthfulqa(model, tok, items, progress=False)
    mmlu, _ = eval_mmlu(model, tok, stratified_subset(load_mmlu("validation" if held else "test", data_dir), n, seed=0),
                        progress=False)
    return {"gsm8k": gsm8k["score"], "truthfulqa_mc1": truthfulqa["mc1"], "truthfulqa_mc2": truthfulqa["mc2"],
            "mmlu": mmlu["score"]}


# ----------------------------------------------------------------------------------------------
# Saving in transformers' layout


def save_model(model, cfg: Qwen3Config, tok_dir: str, eos: int, out: str):
    os.makedirs(out, exist_ok=True)
    state = {("" if k == "lm_head.weight" else "model.") + k: v.detach().float().cpu().contiguous()
             for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_theta, "rope_scaling": None, "tie_word_embeddings": cfg.tie_word_embeddings,
              "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": cfg.num_hidden_layers, "initializer_range": 0.02,
              "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32", "use_cache": True}
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False,
                  "max_new_tokens": 256}
    for name, obj in [("config.json", config), ("generation_config.json", generation)]:
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tok_dir = os.path.join(args.data_dir, "tokenizer")
    tok = load_tokenizer(tok_dir)
    eos = tok.eos_ids[0]

    with open(os.path.join(args.data_dir, "corpus.jsonl")) as f:
        docs = [json.loads(line)["text"] for line in f]
    data = PackedDocuments(tok.encode_batch(docs), eos, args.seq_len, args.seed)
    n_tokens = sum(len(d) for d in data.docs)

    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rope_theta=args.rope_theta,
                      tie_word_embeddings=True, max_position_embeddings=2048)
    model = Qwen3(cfg)
    for p in model.parameters():  # transformers' Qwen3 init: N(0, 0.02) matrices, unit norms
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {n_params / 1e6:.2f}M parameters; corpus {len(docs)} documents, {n_tokens / 1e6:.1f}M tokens; "
          f"{args.batch_size * args.seq_len} tokens per step")

    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")

    def lr_at(progress: float, step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    log, start, step, eval_s = [], time.time(), 0, 0.0  # eval_s: in-loop evaluation, not training time
    bar = tqdm(total=args.steps if not args.minutes else None, desc="pretrain", mininterval=2)
    while True:
        elapsed = time.time() - start - eval_s
        progress = elapsed / (60 * args.minutes) if args.minutes else step / args.steps
        if progress >= 1:
            break
        lr = lr_at(progress, step)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        rows = data.batch(args.batch_size).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr, "epoch": data.epoch,
                        "tokens_per_s": round(step * rows.numel() / (time.time() - start - eval_s))})
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", lr=f"{lr:.1e}", tok_s=log[-1]["tokens_per_s"])
        bar.update(1)
        if args.eval_every and step % args.eval_every == 0 and args.eval_n:
            t0 = time.time()
            log.append({"step": step, **quick_eval(model, tok, args.data_dir, args.eval_n, args.eval_split)})
            tqdm.write(json.dumps(log[-1]))
            eval_s += time.time() - t0
    bar.close()
    train_s = time.time() - start - eval_s

    save_model(model, cfg, tok_dir, eos, args.out)
    paths = {k: os.path.relpath(getattr(args, k), ROOT) for k in ("data_dir", "out")}  # no machine's absolute paths
    result = {"args": {**vars(args), **paths}, "parameters": n_params, "steps": step, "train_seconds": round(train_s),
              "tokens_seen": step * args.batch_size * args.seq_len,
              "corpus_epochs": round(step * args.batch_size * (args.seq_len + 1) / n_tokens, 2),
              "device": str(device), "torch_threads": torch.get_num_threads(), "log": log}
    if args.eval_n:
        t0 = time.time()
        result["eval"] = quick_eval(model, tok, args.data_dir, args.eval_n, args.eval_split)
        result["eval_seconds"] = round(time.time() - t0)
        print(json.dumps(result["eval"]))
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} after {step} steps in {train_s / 60:.1f} min")


if __name__ == "__main__":
    main()
