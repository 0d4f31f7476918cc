"""Benchmark: a LoRA SFT step against transformers + peft on the same weights and batch; GRPO's time split.

    python -m bench.train            # CPU: a ~3M-parameter Qwen3 (vocab 1024), float32
    python -m bench.train --cuda     # GPU: the Qwen3-0.6B shape (random weights), bf16 base under autocast

SFT step = forward, backward and AdamW on a LoRA adapter (r 16, alpha 32, dropout 0.05, all seven projections)
over --batch rows of --seq-len tokens, the first --prompt-len of each masked out of the loss, as train_sft.py
does. Both sides keep the adapter in float32 over a bf16 (GPU) or float32 (CPU) base and run under the same
autocast; transformers computes the lm_head over every position (its standard `labels=` path), we only over the
answer positions. Each side runs in its own process (clean peak memory) and reports the median of --steps
timed steps after --warmup; the sides take turns for --rounds rounds and each keeps its best. tokens/s = batch x
seq-len / step time; peak memory is above the loaded model (GPU: torch's allocator peak; CPU: the process's peak
resident size). "ours + locality" adds the state-locality measurement (two no-grad forwards: the frozen base on
the states, the learner on the targets) that the trainers take every --locality-every steps (10 by default). Then both sides once more in a single process, one step each in turn for --steps x
--rounds steps (same allocator, threads and moment of a shared machine): median seconds per step of each.

GRPO split: train_grpo.py itself for a few steps (a random 0/1 reward so every group carries signal), the
seconds per step spent sampling rollouts (merged adapter, KV cache) and learning (the clipped PG step, in
train_grpo.py's default 4 micro-batches).
transformers and peft are benchmark-only dependencies.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import tempfile
import time

import torch

from bench.harness import QWEN_TOKENIZER, random_model, shape

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def question(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
    return (f"A farmer has {a} sheep and buys {b} more at the market on Monday. On Tuesday he sells a third of "
            f"them and gives {c} to his neighbour, who already had twice as many. How many sheep does the farmer "
            f"have left at the end of the week, if none were born and none were lost?")


def make_world(cfg: dict, path: str, qwen_tokenizer: bool):
    """A model directory with random weights and a tokenizer (Qwen's, or a BPE of the synthetic questions),
    plus a GSM8K-layout data dir of those questions; returns the data dir."""
    random_model(path, cfg, QWEN_TOKENIZER if qwen_tokenizer else None, eos_token_id=151643 if qwen_tokenizer else 1)
    rng = random.Random(0)
    questions = [question(rng) for _ in range(256)]
    if not qwen_tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(questions, trainers.BpeTrainer(vocab_size=cfg["vocab_size"], special_tokens=[
            "<pad>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(os.path.join(path, "tokenizer.json"))
    data = os.path.join(path, "data")
    os.makedirs(os.path.join(data, "gsm8k"))
    with open(os.path.join(data, "gsm8k", "train.jsonl"), "w") as f:
        for q in questions:
            f.write(json.dumps({"question": q, "answer": "He has 7 sheep.\n#### 7"}) + "\n")
    return data


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sft_batch(cfg, batch, seq_len, prompt_len, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, cfg["vocab_size"], (batch, seq_len), generator=g).to(device)
    target = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    target[:, prompt_len:] = True
    return ids, target


def timed_steps(step, device, warmup, steps):
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_step(model_dir, cfg, a, locality: bool):
    """Our LoRA SFT step (train_sft.py's loop body: loss, backward, clip, schedule, AdamW) as a closure; with
    locality, the state-locality measurement the trainers take every --locality-every steps."""
    import train_sft
    import training
    device = "cuda" if a.cuda else "cpu"
    args = train_sft.parse_args(["--model", model_dir, "--data-dir", os.path.join(model_dir, "data"), "--device", device,
                                 "--dtype", "bfloat16" if a.cuda else "float32", "--lora-r", "16", "--lora-alpha", "32",
                                 "--out", os.path.join(model_dir, "x.pt"), "--locality-every", "1"]
                                + (["--grad-checkpointing"] if a.grad_checkpointing else []))
    run = training.Run(args, {"method": "sft"})
    model, optimizer = run.model, run.optimizer
    ids, target = sft_batch(cfg, a.batch, a.seq_len, a.prompt_len, device)
    state = target.clone()
    state[:, -1] = False
    rows = training.Rows(ids, torch.ones_like(target), target, state)
    n = int(target.sum())
    run.step = 0

    def step():
        if locality:
            run.locality([rows])
        model.train()
        train_sft.sft_loss(model, rows, n).backward()
        model.eval()
        torch.nn.utils.clip_grad_norm_(run.params, args.clip)
        for group in optimizer.param_groups:
            group["lr"] = training.lr_at(1, 10_000, args.lr, args.warmup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def peft_step(model_dir, cfg, a, locality: bool = False):  # locality: ours only (same signature)
    """The same step with transformers + peft (labels= path, AdamW, clipping) as a closure."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM
    device = "cuda" if a.cuda else "cpu"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if a.cuda else torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # peft keeps adapters in float32 over a bf16 base too
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if a.cuda else {}))
    model.train()
    ids, target = sft_batch(cfg, a.batch, a.seq_len, a.prompt_len, device)
    labels = ids.masked_fill(~target, -100)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=a.cuda):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sft_side(build, model_dir, cfg, a, locality: bool = False):
    """Median seconds per step and peak memory (MB) above the loaded model of one side, alone in its process."""
    step = globals()[build](model_dir, cfg, a, locality)
    loaded = torch.cuda.memory_allocated() if a.cuda else peak_rss_mb() * 2**20
    dt = timed_steps(step, "cuda" if a.cuda else "cpu", a.warmup, a.steps)
    peak = torch.cuda.max_memory_allocated() if a.cuda else peak_rss_mb() * 2**20
    return dt, (peak - loaded) / 2**20


def sft_interleaved(model_dir, cfg, a):
    """Both sides in one process, one step each in turn (same allocator, threads and machine moment):
    median seconds per step of ours and of peft."""
    steps = {"ours": ours_step(model_dir, cfg, a, False), "peft": peft_step(model_dir, cfg, a)}
    for _ in range(a.warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(a.steps * a.rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if a.cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def grpo_split(model_dir, cfg, a):
    import train_grpo
    data = os.path.join(model_dir, "data")
    rng = random.Random(0)
    argv = ["--model", model_dir, "--data-dir", data, "--out", os.path.join(model_dir, "grpo.pt"),
            "--batch-size", str(a.grpo_prompts // 4), "--grad-accum", "4", "--group-size", str(a.group_size),
            "--max-new-tokens", str(a.new_tokens), "--max-steps", str(a.grpo_steps), "--save-every", "0",
            "--device", "cuda" if a.cuda else "cpu", "--dtype", "bfloat16" if a.cuda else "float32"]
    args = train_grpo.main(argv, reward_fn=lambda r, ex: float(rng.random() < 0.5))
    with open(args.log) as f:
        rows = [json.loads(line) for line in f][1:]  # the first step warms up kernels and CUDA graphs
    return (statistics.median(r["sample_s"] for r in rows), statistics.median(r["learn_s"] for r in rows),
            statistics.median(r["completion_len"] for r in rows))


def child(fn_name, args, queue):
    queue.put(globals()[fn_name](*args))


def in_child(fn_name, *args):
    """globals()[fn_name](*args) in a fresh process (clean peak memory), its result returned."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(fn_name, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cuda", action="store_true", help="the Qwen3-0.6B shape in bf16 on the GPU (else a small model on CPU)")
    p.add_argument("--batch", type=int, help="SFT rows per step (default 8 on GPU, 8 on CPU)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 512 on GPU, 256 on CPU)")
    p.add_argument("--prompt-len", type=int, help="masked prompt tokens per row (default a quarter of --seq-len)")
    p.add_argument("--grad-checkpointing", action="store_true", help="both sides recompute activations")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--rounds", type=int, default=3, help="SFT: rounds in which every side runs once (best kept)")
    p.add_argument("--group-size", type=int, default=8, help="GRPO: samples per prompt")
    p.add_argument("--grpo-prompts", type=int, help="GRPO: prompts per step, learned in 4 micro-batches (default 16 on GPU, 4 on CPU)")
    p.add_argument("--new-tokens", type=int, help="GRPO: completion tokens (default 256 on GPU, 64 on CPU)")
    p.add_argument("--grpo-steps", type=int, default=4, help="GRPO: steps run (the first is not counted)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: peft, locality, interleaved, grpo")
    a = p.parse_args()
    a.batch = a.batch or 8
    a.seq_len = a.seq_len or (512 if a.cuda else 256)
    a.prompt_len = a.prompt_len if a.prompt_len is not None else a.seq_len // 4
    a.grpo_prompts = a.grpo_prompts or (16 if a.cuda else 4)
    a.new_tokens = a.new_tokens or (256 if a.cuda else 64)
    cfg, name = (shape("0.6b"), "qwen3-0.6b-shape") if a.cuda else (shape("small"), "small")
    skip = set(a.skip.split(","))
    device = torch.cuda.get_device_name() if a.cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"# {name} on {device}, torch {torch.__version__}; SFT batch {a.batch} x {a.seq_len} "
          f"(prompt {a.prompt_len} masked), LoRA r16 on all projections", flush=True)
    with tempfile.TemporaryDirectory() as d:
        make_world(cfg, d, qwen_tokenizer=a.cuda)
        sides = [("ours", "ours_step", False)]
        if "locality" not in skip:
            sides.append(("ours + locality", "ours_step", True))
        if "peft" not in skip:
            sides.append(("transformers + peft", "peft_step", False))
        # The sides take turns, round after round, and each keeps its best round: a slow spell of a shared
        # machine then does not fall on one side only.
        best = {}
        for _ in range(a.rounds):
            for label, fn, locality in sides:
                dt, mem = in_child("sft_side", fn, d, cfg, a, locality)
                if label not in best or dt < best[label][0]:
                    best[label] = (dt, mem)
        rows = [(label, *best[label]) for label, _, _ in sides]
        tokens = a.batch * a.seq_len
        base = rows[-1][1] if rows[-1][0].startswith("transformers") else None
        for label, dt, mem in rows:
            ratio = f"  {base / dt:.2f}x peft" if base else ""
            print(json.dumps({"sft": label, "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt),
                              "peak_mem_mb": round(mem)}) + ratio, flush=True)
        if "peft" not in skip and "interleaved" not in skip:
            med = in_child("sft_interleaved", d, cfg, a)
            print(json.dumps({"sft": "one process, steps in turn", "ours_step_s": round(med["ours"], 4),
                              "peft_step_s": round(med["peft"], 4)}) + f"  {med['peft'] / med['ours']:.2f}x peft",
                  flush=True)
        if "grpo" not in skip:
            sample_s, learn_s, length = in_child("grpo_split", d, cfg, a)
            total = sample_s + learn_s
            print(json.dumps({"grpo": f"{a.grpo_prompts} prompts x {a.group_size} samples, {a.new_tokens} max new tokens",
                              "sample_s": round(sample_s, 3), "learn_s": round(learn_s, 3),
                              "sample_frac": round(sample_s / total, 3), "completion_len": round(length, 1)}), flush=True)


if __name__ == "__main__":
    main()
