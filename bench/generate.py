"""Benchmark: our KV-cache sampler against transformers' `generate`, same random weights, same greedy tokens.

    python -m bench.generate                 # CPU: ~3M-param Qwen3 at batch 16 and 64, the 0.6B shape at batch 8
    python -m bench.generate --cuda          # GPU: the 0.6B shape in bf16 at batch 64 (and the small model)

Both sides generate exactly --new-tokens tokens (EOS disabled) from the same random prompts of --prompt-len
tokens (--ragged: of --prompt-len/2 to --prompt-len tokens, left-padded as the study's batches are), greedy,
and the benchmark checks the tokens are identical before reporting tokens/s (new tokens over wall time,
prefill included, best of --repeats rounds after one warm-up). In every round both sides run back to back, in
alternating order, and `ratio_paired` is the median over rounds of (transformers' time / ours): a shared
machine's slow spells last longer than one round, so this ratio moves far less between runs than the ratio of
the two best times (`ratio`). transformers is a benchmark-only dependency.
"""
import argparse
import json
import statistics
import tempfile

import torch

from bench.harness import random_model, shape, timed
from generate import generate
from model import load_model


class NullTokenizer:
    """The sampler only needs EOS ids and decoding; random weights make text meaningless, so decode nothing."""
    eos_ids, pad_id = [], 0

    def decode(self, ids):
        return ""


def bench(name, cfg, batch, prompt_len, new_tokens, device, dtype, repeats, ragged=False):
    from transformers import Qwen3ForCausalLM
    with tempfile.TemporaryDirectory() as d:
        random_model(d, cfg)
        ours, _ = load_model(d, device=device, dtype=dtype, with_tokenizer=False)
        hf = Qwen3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg["vocab_size"], (batch, prompt_len), generator=g)
    lengths = (torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g) if ragged
               else torch.full((batch,), prompt_len))
    real = torch.arange(prompt_len) >= prompt_len - lengths[:, None]     # left padding
    our_prompts = [row[keep].tolist() for row, keep in zip(prompts, real)]

    def run_ours():
        return [r.tokens for r in generate(ours, NullTokenizer(), our_prompts, max_new_tokens=new_tokens,
                                           batch_size=batch)]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts.to(device), attention_mask=real.long().to(device),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[:, prompt_len:].tolist()

    run_ours(), run_hf()  # warm-up (CUDA graph capture, kernel selection, allocator)
    runs, times, tokens = {"ours": run_ours, "hf": run_hf}, {"ours": [], "hf": []}, {}
    for r in range(repeats):   # one round: both sides back to back, the first one alternating
        for side in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            tokens[side], seconds = timed(runs[side], device)
            times[side].append(seconds)
    our_tokens, hf_tokens = tokens["ours"], tokens["hf"]
    our_tps, hf_tps = batch * new_tokens / min(times["ours"]), batch * new_tokens / min(times["hf"])
    paired = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))
    same = sum(a == b for a, b in zip(our_tokens, hf_tokens))
    # In bf16, random weights give near-tied logits, and two correct implementations whose kernels round
    # differently part ways at the first near-tie; report how long the greedy paths agree.
    agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(our_tokens, hf_tokens)]
    params = sum(p.numel() for p in ours.parameters())
    row = dict(model=name, params_m=round(params / 1e6, 1), device=device, dtype=str(dtype).removeprefix("torch."),
               batch=batch, prompt_len=f"{prompt_len // 2}-{prompt_len}" if ragged else prompt_len,
               new_tokens=new_tokens, ours_tok_s=round(our_tps, 1),
               transformers_tok_s=round(hf_tps, 1), ratio=round(our_tps / hf_tps, 2), ratio_paired=round(paired, 2),
               identical_rows=f"{same}/{batch}", mean_agreeing_prefix=round(sum(agree) / batch, 1))
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cuda", action="store_true", help="run the GPU cases (bf16) instead of the CPU ones")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (best time per side, median paired ratio)")
    p.add_argument("--only", choices=["small", "0.6b"], help="run one model size only")
    p.add_argument("--ragged", action="store_true", help="prompts of --prompt-len/2 to --prompt-len tokens, left-padded")
    args = p.parse_args()
    small, big = shape("small"), shape("0.6b")
    if args.cuda:
        cases = [("small", small, 64, torch.bfloat16), ("qwen3-0.6b-shape", big, 64, torch.bfloat16)]
        device = "cuda"
    else:
        cases = [("small", small, 16, torch.float32), ("small", small, 64, torch.float32),
                 ("qwen3-0.6b-shape", big, 8, torch.float32)]
        device = "cpu"
    for name, cfg, batch, dtype in cases:
        if args.only and (args.only == "small") != (name == "small"):
            continue
        new = args.new_tokens if name == "small" or device == "cuda" else min(args.new_tokens, 32)
        bench(name, cfg, batch, args.prompt_len, new, device, dtype, args.repeats, args.ragged)


if __name__ == "__main__":
    main()
