"""Benchmark: evaluate.py's throughput per task, and what shared-context scoring saves.

    python -m bench.eval                                   # CPU: a small random Qwen3, fp32
    python -m bench.eval --cuda --shape 0.6b --gsm8k 128 --truthfulqa 200 --mmlu 500 --batch-size 64

The model has random weights (no checkpoint needed) but the real Qwen3 tokenizer and the real data, so prompt
and choice lengths are the real ones. Random weights never write "Question:" or EOS, so every GSM8K
rollout runs the full --max-new-tokens: its figure is the worst case (a trained model stops earlier).
For TruthfulQA (MC1 and MC2 choices together) and MMLU the benchmark also scores every choice from scratch
(context + choice, one request per choice), checks both ways give the same log-likelihoods and reports
the token count and time saved by encoding each context once. Each timing is the best of --repeats runs
after a warm-up; examples/s counts evaluated questions over wall time.
"""
import argparse
import json
import os
import tempfile

import torch

import evaluate as E
from bench.harness import QWEN_TOKENIZER, QWEN_VOCAB, ROOT, random_model, shape, timed
from model import load_model


def best_of(fn, device, repeats):
    """(fn(), its best wall time over `repeats` runs)."""
    runs = [timed(fn, device) for _ in range(repeats)]
    return runs[-1][0], min(seconds for _, seconds in runs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = os.path.join(ROOT, "..", "shared", "data")
    p.add_argument("--data-dir", default=shared if os.path.isdir(shared) else None,
                   help="the standard data layout (default: ../shared/data when present, else the HF hub)")
    p.add_argument("--shape", choices=["small", "0.6b"], default="small", help="small (4 layers, hidden 256, "
                   "Qwen vocab) or the Qwen3-0.6B shape (configs/qwen3-0.6b-base.json)")
    p.add_argument("--cuda", action="store_true", help="run on the GPU in bf16 (default: CPU, fp32)")
    p.add_argument("--gsm8k", type=int, default=8, help="GSM8K questions")
    p.add_argument("--truthfulqa", type=int, default=16, help="TruthfulQA questions")
    p.add_argument("--mmlu", type=int, default=32, help="MMLU questions (stratified subset)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length")
    p.add_argument("--batch-size", type=int, default=16, help="evaluate.py's --batch-size")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is reported)")
    args = p.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if args.cuda else ("cpu", torch.float32)
    with tempfile.TemporaryDirectory() as d:
        random_model(d, shape(args.shape, vocab_size=QWEN_VOCAB), QWEN_TOKENIZER, eos_token_id=151643)
        model, tok = load_model(d, device=device, dtype=dtype)
    bs = args.batch_size
    info = dict(shape=args.shape, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                device=torch.cuda.get_device_name() if args.cuda else f"cpu x{torch.get_num_threads()} threads",
                dtype=str(dtype).removeprefix("torch."), batch_size=bs)
    print(json.dumps(info), flush=True)

    gsm8k = E.load_gsm8k("test", args.data_dir)[:args.gsm8k]
    tqa = E.load_truthfulqa(args.data_dir)[:args.truthfulqa]
    mmlu = E.stratified_subset(E.load_mmlu("test", args.data_dir), args.mmlu, seed=0)
    runs = {
        "gsm8k": (len(gsm8k), lambda: E.eval_gsm8k(model, tok, gsm8k, (), args.max_new_tokens, bs, progress=False)),
        "truthfulqa": (len(tqa), lambda: E.eval_truthfulqa(model, tok, tqa, bs, progress=False)),
        "mmlu": (len(mmlu), lambda: E.eval_mmlu(model, tok, mmlu, (), 0, bs, progress=False)),
    }
    for task, (n, fn) in runs.items():
        fn()  # warm-up: kernels, allocator, CUDA graph capture, stop-string trigger table
        _, seconds = best_of(fn, device, args.repeats)
        print(json.dumps({"task": task, "n": n, "seconds": round(seconds, 2), "examples_per_s": round(n / seconds, 2)}),
              flush=True)

    # Shared context (one request per question) against every choice from scratch (one request per choice).
    mc = {
        "truthfulqa": [(E.truthfulqa_prompt(ex["question"]),
                        [" " + a for a in dict.fromkeys(ex["mc1"]["choices"] + ex["mc2"]["choices"])]) for ex in tqa],
        "mmlu": [(E.mmlu_prompt(ex), [" A", " B", " C", " D"]) for ex in mmlu],
    }
    for task, requests in mc.items():
        alone = [(ctx, [c]) for ctx, choices in requests for c in choices]
        n_ctx = [len(tok.encode(ctx)) for ctx, _ in requests]
        n_cont = [sum(len(tok.encode(ctx + c)) - n for c in choices) for (ctx, choices), n in zip(requests, n_ctx)]
        tokens_shared = sum(n_ctx) + sum(n_cont)
        tokens_alone = sum(n * len(choices) for n, (_, choices) in zip(n_ctx, requests)) + sum(n_cont)
        E.loglikelihoods(model, tok, requests[:2], bs)
        shared, t_shared = best_of(lambda: E.loglikelihoods(model, tok, requests, bs), device, args.repeats)
        single, t_alone = best_of(lambda: E.loglikelihoods(model, tok, alone, bs), device, args.repeats)
        flat = [x for lls in shared for x in lls]
        # relative: random weights give log-likelihoods in the hundreds per token, where bf16 logits step by 2-4
        diff = max(abs(a - b[0]) / max(abs(b[0]), 1.0) for a, b in zip(flat, single))
        print(json.dumps({"task": task, "choices": len(alone), "tokens_shared": tokens_shared,
                          "tokens_each_alone": tokens_alone, "token_ratio": round(tokens_alone / tokens_shared, 2),
                          "seconds_shared": round(t_shared, 2), "seconds_each_alone": round(t_alone, 2),
                          "speedup": round(t_alone / t_shared, 2), "max_rel_diff": float(f"{diff:.1e}")}), flush=True)


if __name__ == "__main__":
    main()
