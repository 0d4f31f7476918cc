"""Benchmark: stress SFT on the tiny model, this checkout's step against an earlier checkout's, in one process.

    git worktree add ../wold e989b11                 # issue 40's baseline ("today's code path"), read-only
    OMP_NUM_THREADS=1 python -m bench.sft_ratio --old ../wold   # 2 x 20 steps in turn, then the ratio

Both checkouts are imported into one process, each with its own module objects (`checkout`), and build the stress
preset's run on tiny/model (seed 0: the same LoRA init, r 64 / alpha 128, dropout 0.05, float32, AdamW at the
preset's schedule). Then they take turns, one optimizer step each, on the same batches (train_sft.py's first
--steps batches of the seed-0 order, 16 examples each), the first side alternating and dropout reseeded the same
for both before each step: same allocator, threads and moment of a shared machine. Each side's step is its
trainer's loop body (pad_rows, the loss, backward, the step's figures over ranks, clip, schedule, AdamW), with state
locality as each checkout's trainer measures it by default (e989b11: at every step, in the training forward; now
every --locality-every 10 steps); neither writes its log line. Prints each side's median step (the first left out:
it warms up), their ratio, and the largest relative difference of their losses (fp32: issue 40 asks for 1e-5
over ten steps).
"""
import argparse
import importlib
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inside(module, path: str) -> bool:
    return (getattr(module, "__file__", None) or "").startswith(path + os.sep)


def checkout(path: str) -> dict:
    """{name: module} of train_sft.py and what it imports from the checkout at `path`, imported apart from this
    checkout's modules (which stay as they were in sys.modules)."""
    path = os.path.abspath(path)
    ours = {k: m for k, m in sys.modules.items() if _inside(m, ROOT)}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, path)
    try:
        importlib.import_module("train_sft")
        return {k: m for k, m in sys.modules.items() if _inside(m, path)}
    finally:
        sys.path.remove(path)
        for k in [k for k, m in sys.modules.items() if _inside(m, path)]:
            del sys.modules[k]
        sys.modules.update(ours)


def old_side(mods: dict, total: int):
    """e989b11's stress-SFT step (train_sft.main's loop body at that commit) as step(batch) -> loss."""
    training, train_sft, lora, model_mod = (mods[k] for k in ("training", "train_sft", "lora", "model"))
    args = train_sft.parse_args(["--model", "tiny", "--preset", "stress", "--dtype", "float32"])
    torch.manual_seed(args.seed)
    model, tok = model_mod.load_model(os.path.join(ROOT, "tiny", "model"), dtype=torch.float32)   # this checkout's
    # tiny world (e989b11's own tiny/model is an earlier world's), so both sides train the same weights on the same data
    lora.add_lora(model, lora.LoraConfig(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets)),
                  dtype=torch.float32)
    params = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    state = {"step": 0}

    def step(rows):
        micro = [training.pad_rows(rows, "cpu")]
        n_targets = sum(int(b[2].sum()) for b in micro)
        locality = training.wants_locality(args, state["step"])
        model.train()
        sums = {}
        for batch in micro:
            with training.autocast(model):
                loss, figures = train_sft.sft_loss(model, batch, n_targets, locality)
            training.add(sums, loss, figures)
            loss.backward()
        model.eval()
        stats = training.over_ranks(sums, params, optimizer, state["step"], None, args)
        training.clip_gradients(params, args.clip, optimizer, state["step"], None, args)
        training.schedule(optimizer, state["step"], total, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return stats["loss"]
    return step


def new_side(total: int, flags: list[str] = ()):
    """This checkout's stress-SFT step (train_sft.main's loop body) as step(batch) -> loss; `flags`: more of
    train_sft.py's flags for this side only (e.g. --lora-dropout 0, which changes the losses)."""
    import train_sft
    import training
    args = train_sft.parse_args(["--model", "tiny", "--preset", "stress", "--dtype", "float32", "--save-every", "0",
                                 "--out", os.path.join(ROOT, "runs", "bench_sft_ratio.pt"), *flags])
    run = training.Run(args, {"method": "sft"})
    run.step = 0

    def step(rows):
        micro = [training.pad_rows(rows, "cpu")]
        n_targets = sum(int(r.target.sum()) for r in micro)
        figures = run.locality(micro)
        run.model.train()
        loss_sum = 0.0
        for r in micro:
            loss = train_sft.sft_loss(run.model, r, n_targets)
            loss.backward()
            loss_sum += loss.item()
        run.model.eval()
        stats = run.all_reduce(loss_sum, figures)
        torch.nn.utils.clip_grad_norm_(run.params, args.clip or math.inf)
        lr = training.lr_at(run.step, total, args.lr, args.warmup)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return stats["loss"]
    return step, run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="a checkout of the baseline commit (git worktree add ../wold e989b11)")
    p.add_argument("--steps", type=int, default=20, help="steps each side takes, in turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--this-flags", default="", help="train_sft.py flags for this checkout's side only, e.g. "
                   "--this-flags='--lora-dropout 0' (its losses then differ from e989b11's)")
    p.add_argument("--profile", type=int, default=0, help="then N more of this side's steps under torch.profiler "
                   "(state locality off), its table of operators, and one dropout mask's draw at 1 and 2 threads")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    old_mods = checkout(a.old)
    import distributed
    import training
    total = 2336   # the stress preset's steps (the learning-rate schedule's): 5 epochs of 7,473 examples by 16
    new_step, run = new_side(total, a.this_flags.split())
    old_step = old_side(old_mods, total)
    gold = training.gold_solutions(run.tok, run.examples, run.args.max_len)
    order = training.length_grouped_batches([len(p) + len(a) for p, a in gold], 16,
                                            distributed.seed(0, "data", 0, rank_=0))

    def batch(i):   # the i-th batch of the order as train_sft.py's rows: (prompt, states None, gold answer)
        return [(gold[j][0], None, gold[j][1]) for j in order[i]]
    sides = {"e989b11": old_step, "this": new_step}
    times, losses = {k: [] for k in sides}, {k: [] for k in sides}
    for i in range(a.steps):
        rows = batch(i)
        names = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in names:
            torch.manual_seed(1000 + i)   # the same dropout masks for both sides
            t0 = time.perf_counter()
            losses[name].append(sides[name](rows))
            times[name].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    rel = [abs(a_ - b) / abs(b) for a_, b in zip(losses["this"], losses["e989b11"])]
    med = {k: statistics.median(v[1:]) for k, v in times.items()}   # the first step warms up
    print(f"# {a.steps} steps each, in turn; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f}")
    for k in sides:
        print(f"{k:>8}: median step {med[k]:.4f} s (first {times[k][0]:.3f} s); losses "
              + " ".join(f"{x:.6f}" for x in losses[k][:10]))
    print(f"ratio e989b11 / this: {med['e989b11'] / med['this']:.2f}x; largest relative loss difference over the "
          f"first ten steps {max(rel[:10]):.2e}, over all {max(rel):.2e}")
    if a.profile:
        profile(new_step, run, [batch(a.steps + i) for i in range(a.profile)])


def profile(step, run, batches: list):
    """This side's steps under torch.profiler, state locality off, then how long one dropout mask of the median
    batch's largest input ([1376, 512], bernoulli_ as F.dropout draws it) takes at 1 and 2 threads."""
    from torch.profiler import ProfilerActivity, profile as profiler
    run.args.locality_every = 0
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for rows in batches:
            step(rows)
        dt = (time.perf_counter() - t0) / len(batches)
    print(f"# profiled: {len(batches)} steps, {dt:.4f} s a step under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    threads, mask = torch.get_num_threads(), torch.empty(1376, 512)
    for n in (1, 2):
        torch.set_num_threads(n)
        mask.bernoulli_(0.95)
        t0 = time.perf_counter()
        for _ in range(50):
            mask.bernoulli_(0.95)
        print(f"dropout mask [1376, 512], {n} thread(s): {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
