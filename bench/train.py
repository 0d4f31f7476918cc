"""Benchmark: LoRA training steps against transformers + peft and the machine's matmul rate; GRPO's time split.

    python -m bench.train                  # CPU: a ~3M-parameter Qwen3 (vocab 1024), float32
    python -m bench.train --cuda           # GPU: the Qwen3-0.6B shape (random weights), bf16 base under autocast
    python -m bench.train --shape tiny     # CPU: tiny/model and its train split, LoRA r64 and r16, float32

--shape tiny: the tiny world's critical path. tiny/model itself (1.8M parameters, hidden 192, 4 layers, vocab 1024)
with train_sft.py's adapter of each --ranks rank (64: the stress preset's, alpha 128; 16: mild's, alpha 32), and
--batch (16) train examples at their real lengths: the batch of median length among train_sft.py's
length-grouped batches (training.length_grouped_batches, --seed). Three steps, each a full optimizer step (loss,
backward, clip 1.0, AdamW): SFT (train_sft.sft_loss), GRPO's learner pass (train_grpo.clipped_loss on
training.token_logprobs of the answers taken as completions) and OPD's continuation loss
(train_opd.continuation_loss, each answer cut at a random token and its next 32 tokens the continuation); and
transformers + peft on the SFT step with the same rank. No state locality (the trainers measure it every
--locality-every steps, outside the loss). The sides take turns for --rounds rounds of --warmup + --steps steps;
each reports the median step, tokens/s (the batch's real tokens, padding excluded, over it) and GFLOP/s: the FLOPs
of the useful work, counted from the shapes (step_flops: per real token 4 x the base's projection parameters +
6 x r x the adapters' (d_in + d_out) + causal attention, and 4 x hidden x vocab per scored token; about 12.7
MFLOP a token at r 64), over the step time. peft is given the same FLOPs, though its lm_head also runs on the
prompt positions. Then the machine's own fp32 torch.matmul rate at the step's shapes (matmul_rates; "step mix":
the forward's products weighted by their FLOPs), the practical limit. Threads: torch's default, as the trainers use (--threads to set); the load average is printed
before and after.

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

import training
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


def train_step(run, loss):
    """One optimizer step as the trainers take it: loss() and backward in train mode, clip, schedule, AdamW."""
    run.model.train()
    loss().backward()
    run.model.eval()
    torch.nn.utils.clip_grad_norm_(run.params, run.args.clip)
    for group in run.optimizer.param_groups:
        group["lr"] = training.lr_at(1, 10_000, run.args.lr, run.args.warmup)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def ours_step(model_dir, cfg, a, locality: bool):
    """Our LoRA SFT step (train_sft.py's loop body: loss, backward, clip, schedule, AdamW) as a closure; with
    locality, the state-locality measurement the trainers take every --locality-every steps."""
    import train_sft
    device = "cuda" if a.cuda else "cpu"
    args = train_sft.parse_args(["--model", model_dir, "--data-dir", os.path.join(model_dir, "data"), "--device", device,
                                 "--dtype", "bfloat16" if a.cuda else "float32", "--lora-r", "16", "--lora-alpha", "32",
                                 "--out", os.path.join(model_dir, "x.pt"), "--locality-every", "1"]
                                + (["--grad-checkpointing"] if a.grad_checkpointing else []))
    run = training.Run(args, {"method": "sft"})
    ids, target = sft_batch(cfg, a.batch, a.seq_len, a.prompt_len, device)
    state = target.clone()
    state[:, -1] = False
    rows = training.Rows(ids, torch.ones_like(target), target, state)
    n = int(target.sum())
    run.step = 0

    def step():
        if locality:
            run.locality([rows])
        train_step(run, lambda: train_sft.sft_loss(run.model, rows, n))
    return step


def peft_step(model_dir, cfg, a, locality: bool = False):  # locality: ours only (same signature)
    """The same step with transformers + peft (labels= path, AdamW, clipping) as a closure."""
    ids, target = sft_batch(cfg, a.batch, a.seq_len, a.prompt_len, "cuda" if a.cuda else "cpu")
    return peft_sft(model_dir, ids, None, target, 16, 32, a.cuda, a.grad_checkpointing)


def peft_sft(model_dir, ids, attn, target, r: int, alpha: int, cuda: bool = False, grad_checkpointing: bool = False):
    """An SFT step with transformers + peft on the batch ids [B, T] (attn: its padding mask, None for none; target:
    the positions in the loss), LoRA r / alpha, dropout 0.05 on all seven projections, AdamW, clipping: a closure."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=TARGETS))
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # peft keeps adapters in float32 over a bf16 base too
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
    model.train()
    labels = ids.masked_fill(~target.bool(), -100)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
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


# ----------------------------------------------------------------------------------------------
# --shape tiny: the tiny world's own step (tiny/model, its train split's lengths)


def tiny_run(rank: int, out_dir: str):
    """training.Run of train_sft.py's preset with that rank (64: stress, 16: mild) on tiny/model, float32, CPU."""
    import train_sft
    preset = {64: "stress", 16: "mild"}.get(rank, "mild")
    args = train_sft.parse_args(["--model", "tiny", "--preset", preset, "--lora-r", str(rank), "--lora-alpha",
                                 str(2 * rank), "--device", "cpu", "--dtype", "float32", "--locality-every", "0",
                                 "--save-every", "0", "--out", os.path.join(out_dir, f"r{rank}.pt")])
    return training.Run(args, {"method": "sft"})


def tiny_examples(run, batch: int, seed: int):
    """(prompt ids, gold answer ids + EOS) of one batch as train_sft.py draws them (training.length_grouped_batches
    of the train split, seed `seed`): of the full batches, the one of median length."""
    gold = training.gold_solutions(run.tok, run.examples, run.args.max_len)
    lengths = [len(p) + len(a) for p, a in gold]
    batches = sorted((b for b in training.length_grouped_batches(lengths, batch, seed) if len(b) == batch),
                     key=lambda b: sum(lengths[i] for i in b))
    return [gold[i] for i in batches[len(batches) // 2]]


def tiny_steps(run, gold, seed: int):
    """The three learner passes on the same examples, each a full optimizer step (train_step), as closures, with
    their rows. sft: Eq. 5 on the gold answers. grpo: Eq. 6 (train_grpo.clipped_loss, token-mean) on token_logprobs
    of the gold answers taken as the completions, old log-probs = the adapter's own plus N(0, 0.1), advantages +-1
    per row. opd: Eq. 7 (train_opd.continuation_loss) with each answer cut at a random token: the part before is
    the rollout prefix (states), the next --continuation-tokens (32) tokens the teacher's continuation."""
    import train_grpo
    import train_opd
    import train_sft
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sft = training.pad_rows([(p, None, a) for p, a in gold], "cpu")
    n_sft = int(sft.target.sum())
    with torch.no_grad():
        old = training.token_logprobs(run.model, sft.ids, sft.attn, sft.target)
    old = old + 0.1 * torch.randn(old.shape, generator=g)
    adv = (torch.randint(0, 2, (len(gold), 1), generator=g).float() * 2 - 1).expand(sft.ids.shape)[sft.target.bool()]
    weights = torch.full_like(old, 1.0 / n_sft)
    cuts = [rng.randint(1, len(a) - 1) for _, a in gold]
    opd = training.pad_rows([(p, a[:c], a[c:c + 32]) for (p, a), c in zip(gold, cuts)], "cpu")
    n_opd = int(opd.target.sum())

    def grpo_loss():
        new = training.token_logprobs(run.model, sft.ids, sft.attn, sft.target)
        return train_grpo.clipped_loss(new, old, adv, weights, 0.2)                      # Eq. 6
    return {"sft": (lambda: train_step(run, lambda: train_sft.sft_loss(run.model, sft, n_sft)), sft),
            "grpo": (lambda: train_step(run, grpo_loss), sft),
            "opd": (lambda: train_step(run, lambda: train_opd.continuation_loss(run.model, opd, n_opd)), opd)}


def step_flops(cfg, rank: int, rows) -> int:
    """FLOPs of one step's useful work on `rows` (padding excluded), counted from the shapes. Per real token:

        4 x Σ_layers Σ_proj d_in x d_out          the frozen base: forward (2) + backward to the activations (2),
                                                  no weight gradients (frozen)
      + 6 x r x Σ_layers Σ_proj (d_in + d_out)    LoRA A [d_in, r], B [r, d_out]: forward (2) + backward to both
                                                  the input and the weights (4)
      + 3 x 4 x L x (heads x head_dim) x t       attention at position t (1-based): QK^T and PV (2 x 2 FLOPs per
                                                  key and dimension), backward twice the forward; causal: t keys
    and per scored token 4 x hidden x vocab: the tied lm_head forward, backward to the hidden state only.
    Left out: norms, RoPE, softmax, SiLU, dropout, AdamW (elementwise) and layer 0's input gradients, which
    autograd skips (the embeddings need none): a few % too many FLOPs, so the rates are slightly generous."""
    H, inter, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    proj = [(H, q), (H, kv), (H, kv), (q, H), (H, inter), (H, inter), (inter, H)]
    per_token = L * (4 * sum(i * o for i, o in proj) + 6 * rank * sum(i + o for i, o in proj))
    lengths = rows.attn.sum(1).tolist()
    attention = sum(3 * 4 * L * q * t * (t + 1) // 2 for t in lengths)
    return per_token * sum(lengths) + attention + 4 * H * V * int(rows.target.sum())


def matmul_rates(cfg, rank: int, tokens: int, scored: int, min_s: float = 0.2) -> dict:
    """GFLOP/s of torch.matmul (fp32) at the step's shapes [m, k] x [k, n] (tokens: the padded batch; scored: its
    answer tokens), each repeated for at least min_s s, the best of three such windows: the machine's limit, not a
    busy moment's share of it. "step mix": the forward's products of one step at these rates, each shape weighted
    by its FLOPs in the step (total FLOPs over the total time they would take); the backward's products are the
    same sizes transposed, and "lora grad A" ([d_in, tokens] x [tokens, r], the adapters' weight gradients) shows
    how the long inner dimension fares."""
    H, inter, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    assert q == H, "q_proj and o_proj share a shape only when heads x head_dim = hidden"
    # name: ([m, k, n], times per step in the forward)
    shapes = {"base q,o": ((tokens, H, q), 2 * L), "base k,v": ((tokens, H, kv), 2 * L),
              "base gate,up": ((tokens, H, inter), 2 * L), "base down": ((tokens, inter, H), L),
              "lora A": ((tokens, H, rank), 6 * L), "lora A (down)": ((tokens, inter, rank), L),
              "lora B (q,o,down)": ((tokens, rank, H), 3 * L), "lora B (k,v)": ((tokens, rank, kv), 2 * L),
              "lora B (gate,up)": ((tokens, rank, inter), 2 * L), "lm_head": ((scored, H, V), 1),
              "lora grad A": ((H, tokens, rank), 0)}
    rates = {}
    for name, ((m, k, n), _) in shapes.items():
        x, w = torch.randn(m, k), torch.randn(k, n)
        best = 0.0
        for _ in range(3):
            torch.matmul(x, w)   # warm-up
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < min_s:
                torch.matmul(x, w)
                reps += 1
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        rates[name] = best
    flops = {name: 2 * m * k * n * count for name, ((m, k, n), count) in shapes.items()}
    rates["step mix"] = sum(flops.values()) / sum(f / rates[name] for name, f in flops.items())
    return rates


def tiny_main(a):
    """--shape tiny: ours (SFT, GRPO's learner pass, OPD's continuation loss) and transformers + peft (SFT) on
    tiny/model at each rank of --ranks, the sides taking turns for --rounds rounds; the matmul rates."""
    from model import resolve_model_dir
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    ranks = [int(r) for r in a.ranks.split(",")]
    skip = set(a.skip.split(","))
    with tempfile.TemporaryDirectory() as d:
        runs = {r: tiny_run(r, d) for r in ranks}
        cfg = json.load(open(os.path.join(resolve_model_dir("tiny"), "config.json")))
        gold = tiny_examples(runs[ranks[0]], a.batch, a.seed)
        sides = {}
        for r in ranks:
            for name, (step, rows) in tiny_steps(runs[r], gold, a.seed).items():
                sides[(r, name)] = (step, rows)
            if "peft" not in skip:
                sft_rows = sides[(r, "sft")][1]
                sides[(r, "sft: transformers + peft")] = (
                    peft_sft(resolve_model_dir("tiny"), sft_rows.ids, sft_rows.attn, sft_rows.target, r, 2 * r),
                    sft_rows)
        rows = sides[(ranks[0], "sft")][1]
        print(f"# tiny/model ({sum(p.numel() for p in runs[ranks[0]].model.parameters() if not p.requires_grad):,} "
              f"base parameters) on cpu ({os.cpu_count()} cores), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, float32; {a.batch} train examples (the median-length batch of "
              f"train_sft.py's seed-{a.seed} order): {int(rows.attn.sum())} tokens, padded {rows.ids.numel()}, "
              f"{int(rows.target.sum())} answer tokens; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
              flush=True)
        times = {k: [] for k in sides}
        # The sides take turns, round after round: a slow spell of a shared machine falls on all of them.
        for _ in range(a.rounds):
            for k, (step, _) in sides.items():
                for _ in range(a.warmup):
                    step()
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t0)
        achieved = {}
        for (r, name), (_, rows) in sides.items():
            dt = statistics.median(times[(r, name)])
            tokens, flops = int(rows.attn.sum()), step_flops(cfg, r, rows)
            achieved[(r, name)] = flops / dt / 1e9
            print(json.dumps({"rank": r, "step": name, "step_s": round(dt, 4), "tokens": tokens,
                              "tokens_per_s": round(tokens / dt), "mflop_per_token": round(flops / tokens / 1e6, 2),
                              "gflop_per_s": round(flops / dt / 1e9, 1)}), flush=True)
        if "matmul" not in skip:
            rows = sides[(ranks[0], "sft")][1]
            for r in ranks:
                rates = matmul_rates(cfg, r, rows.ids.numel(), int(rows.target.sum()))
                print(json.dumps({"rank": r, "matmul_gflop_per_s": {k: round(v, 1) for k, v in rates.items()},
                                  "tokens": rows.ids.numel()}), flush=True)
                print(f"# r {r}: " + ", ".join(f"{name} at {achieved[(rr, name)] / rates['step mix']:.0%}"
                                               for rr, name in achieved if rr == r) + " of the step mix's matmul rate",
                      flush=True)
    load1 = os.getloadavg()
    print(f"# load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"{time.perf_counter() - t_start:.0f} s in all", flush=True)


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
    p.add_argument("--shape", choices=["small", "tiny"], default="small",
                   help="small: a random ~3M Qwen3 (and --cuda's 0.6B shape); tiny: tiny/model and its train split")
    p.add_argument("--ranks", default="64,16", help="--shape tiny: LoRA ranks (64: the stress preset, 16: mild)")
    p.add_argument("--seed", type=int, default=0, help="--shape tiny: the batch order's seed (train_sft.py's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as the trainers)")
    p.add_argument("--cuda", action="store_true", help="the Qwen3-0.6B shape in bf16 on the GPU (else a small model on CPU)")
    p.add_argument("--batch", type=int, help="SFT rows per step (default 8; 16 with --shape tiny)")
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
    p.add_argument("--skip", default="", help="comma list of parts to skip: peft, locality, interleaved, grpo "
                   "(--shape tiny: peft, matmul)")
    a = p.parse_args()
    if a.shape == "tiny":
        if a.cuda:
            p.error("--shape tiny runs on the CPU")
        a.batch = a.batch or 16
        return tiny_main(a)
    if a.threads:
        torch.set_num_threads(a.threads)
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
