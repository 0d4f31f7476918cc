"""What a teacher of another size adds to on-policy distillation: memory from the shapes, and a step's time.

    python -m bench.teacher                         # memory of a Qwen3-0.6B student and a Qwen3-1.7B teacher (shapes)
    python -m bench.teacher --time --device cuda    # + train_opd.py's steps with random weights of both shapes
    python -m bench.teacher --time                  # the same steps on two small random models (CPU: runs the code)

Memory is counted from configs/qwen3-0.6b-base.json and configs/qwen3-1.7b-base.json, nothing built: parameters,
bf16 weights (the teacher loads in the student's --dtype: bf16 on CUDA), the KV cache per sampled token (the teacher
samples the continuations and, with --states teacher, the states), and one float32 [--logit-chunk x vocabulary]
matrix, the unit of the exact KL's chunks. The teacher has no gradients and no optimizer state.

--time runs `train_opd.py --model S --teacher T` for --steps steps of each signal (continuation, kl, sampled-kl) on
random models written by transformers (bench/harness.py), the tiny world's train questions, the Qwen tokenizer at
the real shapes, and reads the median step, sample and learn seconds from the run's log; on CUDA also the peak
allocated memory. Beside it, the same student with an adapter teacher of its own base (the paper's setting): the
difference is what the model teacher costs. transformers is a benchmark-only dependency.
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile

import torch

from bench.harness import ARCHITECTURE, QWEN_TOKENIZER, ROOT, random_model, shape

CONFIGS = {"student": "qwen3-0.6b-base.json", "teacher": "qwen3-1.7b-base.json"}
SMALL_TEACHER = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=64, vocab_size=1024, tie_word_embeddings=True)


def parameters(c: dict) -> int:
    """Parameters of a Qwen3 config: embedding (and an untied head), attention with its q/k norms, SwiGLU, norms."""
    h, heads, kv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    layer = h * d * (2 * heads + 2 * kv) + 3 * h * c["intermediate_size"] + 2 * h + 2 * d
    return c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + c["num_hidden_layers"] * layer + h


def memory(chunk: int):
    gib = 2 ** 30
    print("| model | parameters | bf16 weights | KV cache per token (bf16) |\n| --- | --- | --- | --- |")
    for who, name in CONFIGS.items():
        with open(os.path.join(ROOT, "configs", name)) as f:
            c = json.load(f)
        kv = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
        n = parameters(c)
        print(f"| {who} ({name}) | {n / 1e9:.3f}B | {2 * n / gib:.2f} GiB | {kv / 1024:.0f} KiB |")
    print(f"one float32 [{chunk} x {c['vocab_size']}] logit matrix (--logit-chunk {chunk}): "
          f"{chunk * c['vocab_size'] * 4 / gib:.2f} GiB")


def timing(args):
    import train_opd
    work = tempfile.mkdtemp(prefix="bench_teacher_")
    cuda = args.device == "cuda"
    if cuda:   # the real shapes, the Qwen tokenizer
        cfgs = {}
        for who, name in CONFIGS.items():
            with open(os.path.join(ROOT, "configs", name)) as f:
                c = json.load(f)
            cfgs[who] = {k: c[k] for k in ARCHITECTURE}
        tokenizer, eos = QWEN_TOKENIZER, 151643
    else:
        cfgs, tokenizer, eos = {"student": shape("small"), "teacher": SMALL_TEACHER}, None, None
    dirs = {who: random_model(os.path.join(work, who), cfg, tokenizer, eos, seed=i)
            for i, (who, cfg) in enumerate(cfgs.items())}
    if not cuda:   # the small models share a byte-level tokenizer of the tests
        from tests.conftest import write_byte_tokenizer
        for d in dirs.values():
            write_byte_tokenizer(d)
    os.makedirs(os.path.join(work, "data", "gsm8k"))
    shutil.copy(os.path.join(ROOT, "tiny", "data", "gsm8k", "train.jsonl"),
                os.path.join(work, "data", "gsm8k", "train.jsonl"))
    adapter = os.path.join(work, "adapter_teacher.pt")   # the paper's setting: an adapter of the student's base
    from lora import LoraConfig, add_lora, save_checkpoint
    from model import load_model
    m, _ = load_model(dirs["student"], with_tokenizer=False)
    add_lora(m, LoraConfig(r=16, alpha=32))
    save_checkpoint(adapter, m, {"method": "sft", "base_model": dirs["student"]})
    del m
    print(f"\n{args.steps} steps each, median seconds ({args.device}; batch {args.batch_size} prompts, "
          f"{args.max_new_tokens} new tokens):")
    print("| teacher | signal | step s | sample s | learn s | peak GiB |\n| --- | --- | --- | --- | --- | --- |")
    for teacher, label in ((dirs["teacher"], "model (larger)"), (adapter, "adapter of the student's base")):
        for signal in ("continuation", "kl", "sampled-kl"):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = os.path.join(work, f"{signal}.pt")
            train_opd.main(["--model", dirs["student"], "--teacher", teacher, "--data-dir", os.path.join(work, "data"),
                            "--signal", signal, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                            "--max-new-tokens", str(args.max_new_tokens), "--out", out, "--save-every", "0",
                            "--locality-every", "0", "--device", args.device])
            with open(os.path.splitext(out)[0] + ".jsonl") as f:
                log = [json.loads(line) for line in f][1:] or [{}]   # the first step warms up
            med = {k: statistics.median(r.get(k, float("nan")) for r in log) for k in ("step_s", "sample_s", "learn_s")}
            peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}" if cuda else "-"
            cells = " | ".join(f"{med[k]:.2f}" for k in ("step_s", "sample_s", "learn_s"))
            print(f"| {label} | {signal} | {cells} | {peak} |")
    shutil.rmtree(work)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time", action="store_true", help="also time train_opd.py's steps with random weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the real shapes; cpu: small ones")
    p.add_argument("--steps", type=int, default=4, help="steps per signal (the first is not counted)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (train_opd.py's default)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout length limit")
    p.add_argument("--logit-chunk", type=int, default=1024, help="train_opd.py's --logit-chunk")
    args = p.parse_args(argv)
    memory(args.logit_chunk)
    if args.time:
        timing(args)


if __name__ == "__main__":
    main()
