"""What the three trainers share, as plain functions: flags, setup, checkpoints, data order, losses, logging.

Each trainer (train_sft.py, train_grpo.py, train_opd.py) writes its own loop, as nanoGPT's train.py does:

    model, tok, optimizer, resumed = training.setup(args, meta)   # fresh | --init | --resume; AdamW
    step, position = training.start(resumed, total)               # where the run is: step, data position
    save = lambda snapshot=False: training.save(args, model, optimizer, meta, step, total, position, snapshot)
    with cli.stop_at_step_end():                                  # Ctrl-C / SIGTERM end the step, then stop
        while step < total and not training.stopping(args, step, first, saved, save):
            micro = [...]                                         # the step's micro-batches: states + signal
            for batch in micro: loss = ...; training.add(sums, loss, figures); loss.backward()   # Eq. 5, 6 or 7
            stats = training.over_ranks(sums, params, ...)        # figures (and gradients) of every rank
            grad_norm = training.clip_gradients(params, ...)      # clip
            lr = training.schedule(optimizer, step, total, args)  # warmup, cosine decay
            optimizer.step(); optimizer.zero_grad(); step += 1
            training.log(args, bar, record, ...)                  # JSONL, progress bar; --eval-every's val_accuracy
            saved = training.checkpoint(args, step, total, save, saved)   # --save-every, --snapshots
    training.finish(args, method, save, saved, step, total)

Contracts:
- `loss(micro_batch) -> (loss, figures)`: the step's loss is the SUM of the micro-batch losses, so a trainer divides
  by a step-wide normalizer (e.g. all target tokens of the step); then gradient accumulation gives exactly the
  gradient of one big batch. `figures` are {name: (sum, count)} (see total()), and the step logs sum / count over
  its micro-batches: a mean over every token or state of the step, whatever the micro-batches' sizes.
- Masks are bool [B, T] over positions of input_ids: mask[b, t] = token t is scored, predicted from
  position t - 1 (so mask[:, 0] must be False). Per-token results come out in the order of input_ids[mask].
- State locality (this study's addition; the paper names it as the missing measurement): `state_nll_base` is
  the mean NLL, under the frozen base policy (adapter off), of the state tokens at which the step applies
  supervision (the gold / rollout prefix; for SFT the dataset's, for GRPO and OPD the learner's);
  `target_nll` is the learner's mean NLL of its supervision targets. High state NLL = off-policy states.
- The adapter being trained is lora.py's "default"; its parameters are kept in float32 (AdamW on bf16
  LoRA weights would round most updates away) while the base may be bfloat16. Other adapters (OPD's
  teacher) may be loaded with lora.load_adapter(model, path, name="teacher") after setup.
- A checkpoint is one dict (lora.save_checkpoint, atomic): the adapter, and meta (method, base model, data dir, a
  hash of the training examples, every argument, the step); train_state holds the step and the run's planned steps
  (a run is finished when they meet), and until then AdamW's state, torch's RNG states (CPU and CUDA: adapter
  dropout; the samplers and the data order have seeded generators of their own) and the data position, so
  `--resume` continues the run and ends with the same adapter as an uninterrupted one. --resume refuses flags or
  data that differ from the run's. --snapshots F,F also keeps the adapter after those fractions of the run
  (snapshot_path: <out>_at<step>.pt), the points of a run's trajectory that reproduce.py --frontier evaluates.
- A non-finite loss or gradient norm raises NonFiniteLoss before the optimizer moves: the last checkpoint
  on disk is the last good one and is left untouched.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import cli
import distributed
from cli import COUNT, NONNEGATIVE, PROBABILITY, RATE, SIZE, number, output_dir
from evaluate import eval_gsm8k, gsm8k_prompt, load_gsm8k, resolve_data_dir
from generate import pad
from lora import (ALL_TARGETS, LoraConfig, add_lora, load_adapter, load_checkpoint, lora_parameters, merged,
                  save_checkpoint, use_adapter)
from model import LoadError, load_model


class NonFiniteLoss(RuntimeError):
    """The loss or gradient went NaN/inf; the run stops and the last good checkpoint stays on disk."""


def run(main):
    """Run a trainer's main(); user-facing failures (a missing model or checkpoint, a NaN) end as one line, exit 1."""
    cli.run(main, (LoadError, NonFiniteLoss))


# ----------------------------------------------------------------------------------------------
# Flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and states every flag's default."""


def fractions(text: str) -> list[float]:
    """--snapshots: comma-separated fractions of a run, each in (0, 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.25,0.5, got {text!r}")
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"each fraction must lie strictly between 0 and 1, got {text!r}")
    return values


def targets(text: str) -> list[str]:
    """--lora-targets: comma-separated projection names (PEFT's target_modules), or all."""
    names = ALL_TARGETS if text == "all" else {t.strip() for t in text.split(",") if t.strip()}
    if not names or set(names) - set(ALL_TARGETS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {','.join(ALL_TARGETS)} (or all)")
    return [n for n in ALL_TARGETS if n in names]


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every trainer shares, with the same names. Methods change defaults with p.set_defaults()."""
    cuda = torch.cuda.is_available()
    g = p.add_argument_group("common training flags")
    g.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="base policy: HF model directory, hub id, or tiny")
    g.add_argument("--data-dir", default=None,
                   help="directory with gsm8k/train.jsonl (default: the hub's openai/gsm8k; tiny/data for --model tiny)")
    g.add_argument("--limit", type=COUNT, default=0, help="train on the first N GSM8K train examples only (0 = all)")
    g.add_argument("--init", default=None, help="start from this LoRA checkpoint (.pt) instead of a fresh adapter")
    g.add_argument("--out", default=None, help="checkpoint path (.pt), written atomically every --save-every steps and at the end")
    g.add_argument("--log", default=None, help="metrics JSONL (default: --out with .jsonl)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run whose checkpoint is --out")
    g.add_argument("--lora-r", type=SIZE, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=SIZE, default=32, help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=PROBABILITY, default=0.05, help="dropout on the adapter's input")
    g.add_argument("--lora-targets", type=targets, default=list(ALL_TARGETS), metavar="NAME,NAME,..",
                   help="the projections that get an adapter, by PEFT's target_modules names")
    g.add_argument("--lr", type=RATE, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay on the adapter")
    g.add_argument("--warmup", type=NONNEGATIVE, default=0.03, help="linear warmup: a fraction of the steps if < 1, else a step count")
    g.add_argument("--clip", type=NONNEGATIVE, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--epochs", type=RATE, default=1.0, help="passes over the training data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=COUNT, default=0, help="optimizer steps (0 = from --epochs)")
    g.add_argument("--batch-size", type=SIZE, default=16, help="examples (SFT) or prompts (GRPO, OPD) per micro-batch")
    g.add_argument("--grad-accum", type=SIZE, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seed", type=number(int), default=0, help="seed for LoRA init, data order, dropout and sampling")
    g.add_argument("--device", type=cli.device, default="cuda" if cuda else "cpu", help="cpu | cuda")
    g.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"],
                   help="base weights; on CUDA the forward runs under bf16 autocast either way")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--save-every", type=COUNT, default=100, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--stop-after", type=COUNT, default=0, help="stop (with a checkpoint) after N steps of this invocation; --resume continues")
    g.add_argument("--snapshots", type=fractions, default=[], metavar="F,F,..",
                   help="also keep the adapter after these fractions of the run (e.g. 0.25,0.5): <out>_at<step>.pt")
    g.add_argument("--locality-every", type=COUNT, default=1, help="log state locality every N steps (0 = never; costs one base forward)")
    g.add_argument("--eval-every", type=COUNT, default=0,
                   help="log greedy target accuracy on the validation split (val_accuracy) every N steps (0 = never)")
    g.add_argument("--eval-limit", type=COUNT, default=200, help="--eval-every: the first N validation problems (0 = all)")
    return p


# ----------------------------------------------------------------------------------------------
# Setup and checkpoints


def finished(ckpt: dict) -> bool:
    """Whether the checkpoint's run has done all its planned steps (then it is the run's deliverable)."""
    ts = ckpt.get("train_state") or {}
    return ts.get("step", 0) >= ts.get("total_steps", math.inf)


# Flags that may change between a run and its --resume: where and how often it writes, how far this
# invocation goes, logging, the device. Any other difference would continue into another run.
RESUME_MAY_CHANGE = {"resume", "out", "log", "save_every", "snapshots", "stop_after", "locality_every", "device",
                     "grad_checkpointing", "eval_every", "eval_limit"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resumable(args, method: str) -> dict:
    """--out's checkpoint, once it is shown to be this method's unfinished run with these very flags."""
    if not os.path.exists(args.out):
        raise LoadError(f"--resume: {args.out} does not exist (nothing to resume; drop --resume to start)")
    ckpt = load_checkpoint(args.out)
    if ckpt["meta"].get("method") != method:
        raise LoadError(f"--resume: {args.out} is a {ckpt['meta'].get('method')!r} run, not {method!r}")
    if finished(ckpt):
        raise LoadError(f"--resume: {args.out} is a finished run (step {ckpt['train_state']['step']}); nothing to resume")
    before = ckpt["meta"].get("args", {})
    for key, value in vars(args).items():
        if key not in RESUME_MAY_CHANGE and key in before and before[key] != value:
            raise LoadError(f"--resume: {_flag(key)} is {value!r} here but {before[key]!r} in the run of {args.out}; "
                            "resume with the run's flags, or drop --resume to start a new run")
    return ckpt


def _check_init(args, ckpt: dict):
    """--init: the adapter keeps the checkpoint's rank, scale and targets, so flags that ask for others are an error."""
    for key, name in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_targets", "targets")):
        mine, theirs = (",".join(v) if isinstance(v, list) else v for v in (getattr(args, key), ckpt["lora"][name]))
        if mine != theirs:
            raise LoadError(f"{_flag(key)} is {mine}, but --init {args.init} holds an adapter with "
                            f"{name} {theirs}: pass {_flag(key)} {theirs} to start from it")


def setup(args, meta: dict):
    """Seed, load the base model and tokenizer, attach the adapter (fresh, --init or --resume), build AdamW, and
    when resuming restore AdamW and the RNG and cut the log back to the checkpoint's step. Returns (model, tok,
    optimizer, the checkpoint resumed from or None). meta["method"] names the run (sft, grpo, opd)."""
    args.device = distributed.init(args.device)   # under torchrun: this rank's device
    torch.manual_seed(args.seed)   # the LoRA init, the same on every rank (and every CUDA device)
    args.data_dir = resolve_data_dir(args.model, args.data_dir)
    args.out = output_dir(args.out or f"ckpt/{meta['method']}.pt")
    args.log = output_dir(args.log or os.path.splitext(args.out)[0] + ".jsonl", "--log")
    ckpt = resumable(args, meta["method"]) if args.resume else load_checkpoint(args.init) if args.init else None
    if args.init:
        _check_init(args, ckpt)
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    # The trained adapter is float32 whatever the base dtype (AdamW on bf16 LoRA weights would round most
    # updates away); a loaded one takes the checkpoint's weights, and this run's dropout.
    if ckpt is not None:
        load_adapter(model, ckpt, dtype=torch.float32, dropout=args.lora_dropout)
    else:
        add_lora(model, LoraConfig(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets)),
                 dtype=torch.float32)
    model.gradient_checkpointing = args.grad_checkpointing
    cuda = args.device.startswith("cuda")
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=args.lr, weight_decay=args.weight_decay,
                                  **({"fused": True} if cuda else {}))
    step = 0
    if args.resume:
        ts = ckpt["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        step = ts["step"]
        # each rank's own random state (adapter dropout), when the run had as many ranks; else rank 0 takes the
        # one-process state and the others start their own streams
        ranks = ts.get("rng_ranks") or [ts["rng"]]
        mine = ranks[distributed.rank()] if len(ranks) == distributed.world() else None if distributed.rank() else ts["rng"]
        if mine is None:
            torch.manual_seed(distributed.seed(args.seed, "dropout", step))
        else:
            torch.set_rng_state(mine["torch"])
            if mine["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])
    else:
        torch.manual_seed(distributed.seed(args.seed, "dropout"))   # each rank its own dropout masks
    if distributed.main_rank() and os.path.exists(args.log):   # a new run starts a new log; a resumed one loses
        with open(args.log) as f:                                # the steps it is about to redo
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step] if step else []
        with open(args.log, "w") as f:
            f.writelines(lines)
    distributed.barrier()
    return model, tok, optimizer, ckpt if args.resume else None


def start(resumed: dict | None, total: int) -> tuple:
    """(step, data position) where the run starts: 0 and the first batch, or the resumed checkpoint's."""
    if resumed is None:
        return 0, {"epoch": 0, "index": 0}
    ts = resumed["train_state"]
    if ts["total_steps"] != total:
        raise LoadError(f"--resume: the checkpoint's run planned {ts['total_steps']} steps, these flags plan {total}")
    return ts["step"], dict(ts["data"])


def save(args, model, optimizer, meta: dict, step: int, total: int, position: dict, snapshot: bool = False) -> int:
    """Checkpoint to --out atomically: adapter + meta, and everything --resume needs unless the run is finished
    (then the checkpoint is the deliverable, and resuming has nothing to do). A snapshot is the adapter alone,
    beside --out (snapshot_path): a point of the run's trajectory, not a place to resume from. Rank 0 writes.
    Returns the step saved. Every rank calls it (each rank's random state is gathered)."""
    resumable = not snapshot and step < total
    if resumable:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        ranks = distributed.gather([rng])
    if distributed.main_rank():
        meta = {"data_dir": args.data_dir, "args": vars(args), "step": step, "total_steps": total, **meta}
        state = {"step": step, "total_steps": total}
        if resumable:   # rng: the one-process (rank 0) state; rng_ranks: every rank's, under torchrun
            state.update(optimizer=optimizer.state_dict(), data=dict(position), rng=rng,
                         **({"rng_ranks": ranks} if len(ranks) > 1 else {}))
        save_checkpoint(snapshot_path(args.out, step) if snapshot else args.out, model, meta, train_state=state)
    return step


def stopping(args, step: int, first: int, saved: int | None, save) -> bool:
    """Whether the loop ends before `step`: after --stop-after steps of this invocation (True), or on Ctrl-C /
    SIGTERM on any rank, which checkpoints the steps done (save(), unless `saved` is this step) and exits 128 +
    the signal's number (130 for Ctrl-C, 143 for SIGTERM) with one line saying how to continue."""
    signum = cli.stop_requested()
    if distributed.any_rank(bool(signum)):        # under torchrun every rank stops at the same step
        if saved != step:
            save()
        if distributed.main_rank():
            print(f"interrupted at step {step}; checkpoint {args.out}; continue with --resume", file=sys.stderr)
        raise SystemExit(128 + (signum or 15))
    return bool(args.stop_after) and step - first >= args.stop_after


def finish(args, method: str, save, saved: int | None, step: int, total: int):
    """The last checkpoint: the deliverable when the run is done, a resumable one after --stop-after."""
    if saved != step:
        save()
    distributed.barrier()   # the checkpoint is on disk before any rank reads it (reproduce.py's next stage)
    if distributed.main_rank():
        print(f"{method}: step {step}/{total} -> {args.out} (log {args.log})", file=sys.stderr)


def snapshot_steps(fractions: list[float], total: int) -> list[int]:
    """The steps --snapshots keeps: each fraction of the run, rounded, at least step 1."""
    return sorted({max(1, round(f * total)) for f in fractions})


def snapshot_path(out: str, step: int) -> str:
    """Where the adapter after `step` steps is kept: ckpt/grpo_s0.pt -> ckpt/grpo_s0_at10.pt."""
    return f"{os.path.splitext(out)[0]}_at{step}.pt"




# ----------------------------------------------------------------------------------------------
# Data


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of indices whose lengths are close: shuffle, sort windows of 50 batches by length,
    cut, shuffle the batches. Padding is nearly nil and each epoch (seed) still sees a different order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_examples(args, meta: dict, resumed: dict | None) -> list[dict]:
    """GSM8K train as [{question, answer}], the first --limit examples (all with --limit 0). Their hash goes
    into the checkpoint's meta, and a resumed run must find the same examples (its data position counts in them)."""
    examples = load_gsm8k("train", args.data_dir)[:args.limit or None]
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]
    if resumed and resumed["meta"].get("data_sha256", digest) != digest:
        raise LoadError(f"--resume: the training examples are not those of the run in {args.out} "
                        f"(--data-dir {args.data_dir}, --limit {args.limit})")
    meta["data_sha256"] = digest
    return examples


def data_order(lengths: list[int], batch_size: int, seed: int):
    """The data order of every trainer: epoch -> batches of example indices whose lengths in tokens (a gold
    solution's, or a prompt's) are close (length_grouped_batches), shuffled anew each epoch, the same on every rank."""
    return functools.cache(lambda epoch: length_grouped_batches(lengths, batch_size,
                                                                distributed.seed(seed, "data", epoch, rank_=0)))


def validation_problems(args) -> list[dict]:
    """--eval-every's problems: the first --eval-limit of gsm8k/validation.jsonl. Data without a validation split (the
    hub's GSM8K) lends its last --eval-limit train problems instead, and the log says so: the paper trains on all
    7,473, so none is held out, and their accuracy is one on problems the run may have trained on."""
    if not args.eval_every:
        return []
    if args.data_dir and os.path.exists(os.path.join(args.data_dir, "gsm8k", "validation.jsonl")):
        return load_gsm8k("validation", args.data_dir)[:args.eval_limit or None]
    if distributed.main_rank():
        print("--eval-every: the data has no gsm8k/validation.jsonl; val_accuracy is measured on the last "
              f"{args.eval_limit or 'all'} train problems", file=sys.stderr)
    return load_gsm8k("train", args.data_dir)[-args.eval_limit if args.eval_limit else 0:]


def validate(args, model, tok, problems: list[dict], step: int, total: int) -> dict:
    """{"val_accuracy": greedy target accuracy on the validation problems} after every --eval-every steps and the last
    (the adapter merged, as evaluate.py scores; each rank its share); {} between them."""
    if not problems or (step % args.eval_every and step != total):
        return {}
    with merged(model):
        _, records = eval_gsm8k(model, tok, distributed.share(problems), progress=False)
    correct, n = distributed.total([sum(r["correct"] for r in records), len(records)])
    return {"val_accuracy": correct / n}


def prompts(tok, examples: list[dict]) -> list[list[int]]:
    """The GSM8K train prompts (evaluate.py's format) as token ids."""
    return tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in examples])


def gold_solutions(tok, examples, max_len: int) -> list[tuple]:
    """(prompt ids, gold answer ids + EOS) per example, tokenized apart so that the boundary between the prompt
    and the dataset's states is exact; at most max_len tokens in all (the answer is cut at its end)."""
    prompts = tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in examples])
    answers = tok.encode_batch([" " + ex["answer"] for ex in examples])
    eos = tok.eos_ids[:1]   # one EOS, so the model learns to stop
    return [(p[:max_len - 1], (a + eos)[:max(1, max_len - len(p))]) for p, a in zip(prompts, answers)]


def through_eos(tokens, eos_ids) -> list:
    """The tokens up to and including the first EOS: nothing after it is a state or a target. (The sampler ends
    a rollout there already; this holds for any trajectory, whatever wrote it.)"""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:i + 1])
    return list(tokens)


def pad_rows(rows, device) -> tuple:
    """A right-padded micro-batch of rows (prompt, states, targets), each three token lists laid end to end.

    Returns ids and attn [B, T] and two masks over them (training.py's convention): `target`, the target
    tokens, which the loss scores; `state`, the state tokens of the states where supervision applies, whose
    base NLL is state locality. A row whose states are None has its targets' own prefixes as states, i.e.
    the targets but the last (SFT's gold answer, GRPO's completion); OPD's continuation rows name theirs:
    the rollout prefix y_<t before the teacher's tokens.
    """
    ids, attn = pad([[*x, *(s or ()), *c] for x, s, c in rows], side="right")
    target, state = torch.zeros_like(attn), torch.zeros_like(attn)
    for b, (x, s, c) in enumerate(rows):
        n, start = len(x) + len(s or ()) + len(c), len(x) + len(s or ())
        target[b, start:n] = True
        state[b, len(x):n - 1 if s is None else start] = True   # states None: the targets' own prefixes
    return ids.to(device), attn.to(device), target.to(device), state.to(device)


def plan_steps(args, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes of `batches_per_epoch` micro-batches."""
    if args.max_steps:
        return args.max_steps
    return max(1, math.ceil(args.epochs * batches_per_epoch / args.grad_accum))


def next_batch(epoch_batches, position: dict) -> list:
    """The next batch of example indices (each rank takes its distributed.share). epoch_batches(epoch) -> list of
    batches must be deterministic in `epoch` (seed it with args.seed + epoch; decorate it with functools.cache, it
    is asked at every micro-batch); the position {epoch, index} is the same on every rank and is checkpointed
    (advanced here): a run resumes with any number of ranks."""
    batches = epoch_batches(position["epoch"])
    batch = batches[position["index"]]
    position["index"] += 1
    if position["index"] == len(batches):
        position.update(epoch=position["epoch"] + 1, index=0)
    return batch




# ----------------------------------------------------------------------------------------------
# The step: losses and figures


def autocast(model):
    """bf16 autocast on CUDA (and with bf16 weights on CPU); plain float32 otherwise."""
    w = model.embed_tokens.weight
    return torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.device.type == "cuda" or w.dtype != torch.float32)


def schedule(optimizer, step: int, total: int, args) -> float:
    """Set the optimizer's learning rate for `step` (lr_at) and return it."""
    lr = lr_at(step, total, args.lr, args.warmup)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """Linear warmup to `lr`, then cosine decay to 0 at `total` (step is 0-based)."""
    w = int(warmup * total) if warmup < 1 else int(warmup)
    if step < w:
        return lr * (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def token_logprobs(model, input_ids, attention_mask, mask, temperature: float = 1.0, chunk: int = 4096):
    """log p(input_ids[b, t] | input_ids[b, :t]) for every (b, t) with mask[b, t], in input_ids[mask] order.

    The lm_head runs only on the positions that predict a masked token, `chunk` positions at a time, each
    chunk's logits recomputed in backward instead of kept: on Qwen's 151,936-token vocabulary, float32
    logits for a GRPO micro-batch would otherwise take tens of GB. Differentiable; logits / temperature, as
    the sampler records them (T = 0, greedy, scores the logits themselves).
    """
    h = scored_hidden(model, input_ids, attention_mask, mask)
    targets = input_ids[mask]
    if h.shape[0] <= chunk or not torch.is_grad_enabled():
        return torch.cat([_logprobs(model.lm_head, h[i:i + chunk], targets[i:i + chunk], temperature)
                          for i in range(0, max(h.shape[0], 1), chunk)])
    return torch.cat([torch.utils.checkpoint.checkpoint(_logprobs, model.lm_head, h[i:i + chunk], targets[i:i + chunk],
                                                        temperature, use_reentrant=False)
                      for i in range(0, h.shape[0], chunk)])


def scored_hidden(model, input_ids, attention_mask, mask):
    """Final hidden states [N, H] of the positions before each token of input_ids[mask] (the states it is scored at)."""
    assert not mask[:, 0].any(), "the first token has no prefix to be predicted from"
    return model(input_ids, attention_mask, return_hidden=True)[:, :-1][mask[:, 1:]]


def _divergences(h_student, h_teacher, lm_head):
    """Per state: KL(π_T||π_S), KL(π_S||π_T) and the cross-entropy H(π_T, π_S), exact over the vocabulary."""
    logp_s = lm_head(h_student).float().log_softmax(-1)
    logp_t = lm_head(h_teacher).float().log_softmax(-1)
    forward = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    cross = -(logp_t.exp() * logp_s).sum(-1)
    return torch.stack([forward, reverse, cross], dim=-1)


def divergences(h_student, h_teacher, lm_head, chunk: int = 1024):
    """_divergences over row chunks, each recomputed in backward: memory O(chunk x vocabulary), not O(N x vocab)."""
    parts = [torch.utils.checkpoint.checkpoint(_divergences, h_student[i:i + chunk], h_teacher[i:i + chunk], lm_head,
                                               use_reentrant=False) for i in range(0, len(h_student), chunk)]
    return torch.cat(parts) if parts else h_student.new_zeros(0, 3)


def _logprobs(lm_head, h, targets, temperature: float):
    logits = lm_head(h).float()
    if temperature not in (0, 1):
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def state_locality(model, input_ids, attention_mask, state_mask, target_logprobs=None, base_logprobs=None) -> dict:
    """How far from the base policy the step's states are, and how well the learner fits its targets.

    state_nll_base: NLL of input_ids[state_mask] under the frozen base (adapter off), i.e. how surprising
    the supervised states' own tokens are to the policy training started from.
    target_nll: -target_logprobs (the learner's log-probs of its supervision targets, taken from the
    training forward). base_logprobs: precomputed base log-probs of the state tokens (saves a forward when
    the trainer already has them, e.g. GRPO's KL reference at temperature 1). Both as figures (sum, count).
    """
    out = {}
    if base_logprobs is None and state_mask.any():
        with use_adapter(model, None), autocast(model):
            base_logprobs = token_logprobs(model, input_ids, attention_mask, state_mask)
    if base_logprobs is not None and base_logprobs.numel():
        out["state_nll_base"] = total(-base_logprobs)
    if target_logprobs is not None and target_logprobs.numel():
        out["target_nll"] = total(-target_logprobs)
    return out


def on_targets(values, target: torch.Tensor) -> torch.Tensor:
    """Per-row values laid on a [B, T] float grid at the row's target positions, zero elsewhere. values[b] is one
    number (the same for all of row b's targets: GRPO's advantage) or a sequence with at least one value per
    target of row b (the sampler's log-probs of its tokens), of which the first are taken."""
    counts = target.sum(1).tolist()
    flat = [float(v) for vs, n in zip(values, counts)
            for v in (list(vs)[:n] if hasattr(vs, "__len__") else [vs] * n)]
    grid = torch.zeros(target.shape, device=target.device)
    grid[target] = torch.tensor(flat, device=target.device)
    return grid


def clipped_objective(new, old, adv, clip_eps: float):
    """Per token -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), ρ = exp(new - old), and where the clip stops the gradient."""
    ratio = torch.exp(new - old)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return per_token, ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))


def policy_gradient_loss(model, batch, temperature: float, clip_eps: float, beta: float, locality: bool,
                         first: bool = True):
    """The clipped policy-gradient loss (+ β k3) of one micro-batch, already weighted for the step's aggregate:

        ρ_t = π_θ(y_t | s_t) / π_old(y_t | s_t),   L = Σ_t w_t [ -min(ρ_t A_t, clip(ρ_t, 1 - ε, 1 + ε) A_t) + β k3_t ]

    (GRPO's Eq. 6, where A_t is the completion's group-relative advantage; OPD's sampled-KL signal, where A_t is
    the per-token teacher advantage). batch = [ids, attn, target, state, old, advantage, weight]: pad_rows' four,
    then three on_targets grids: the sampler's log-probs π_old, A_t and w_t. Both log-probs at logits /
    temperature. k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1, π_ref = the base policy (adapter off)."""
    ids, attn, target, state, old_grid, adv_grid, w_grid = batch
    new = token_logprobs(model, ids, attn, target, temperature=temperature)
    old, adv, w = old_grid[target], adv_grid[target], w_grid[target]
    per_token, clip = clipped_objective(new, old, adv, clip_eps)
    figures = {"clip_frac": total(clip)}
    if first:   # before any update on these rollouts: how far the sampler (merged weights) and the learner disagree
        ratio = torch.exp(new - old).detach()
        figures.update({"sampling/importance_sampling_ratio/mean": total(ratio), "kl_sample_train": total(old - new),
                        "sampling/importance_sampling_ratio/min": (ratio.min().item(), 1),
                        "sampling/importance_sampling_ratio/max": (ratio.max().item(), 1)})
    ref = None
    if beta > 0 or locality:
        with torch.no_grad(), use_adapter(model, None):
            ref = token_logprobs(model, ids, attn, target, temperature=temperature)
        d = ref - new
        k3 = torch.exp(d) - d - 1  # unbiased, always >= 0 estimator of KL(π_θ || π_ref) on π_θ's samples
        figures["kl"] = total(k3)
        if beta > 0:
            per_token = per_token + beta * k3
    loss = (per_token * w).sum()
    if locality:
        base = ref[state[target]] if temperature == 1.0 else None  # the state tokens' base log-probs, if at T = 1
        figures.update(state_locality(model, ids, attn, state, target_logprobs=new, base_logprobs=base))
    return loss, figures


def total(values: torch.Tensor) -> tuple:
    """A figure as (sum, count) over a tensor's elements: the step's log shows sum / count over its micro-batches."""
    return values.detach().float().sum().item(), values.numel()


def wants_locality(args, step: int) -> bool:
    """Whether this step logs state locality (--locality-every)."""
    return bool(args.locality_every) and step % args.locality_every == 0


def add(sums: dict, loss, figures: dict) -> bool:
    """Add a micro-batch's loss and figures to the step's sums ({name: [sum, count]}); False (and nothing added but
    the flag) when the loss is not finite: the trainer then skips backward and over_ranks stops the run."""
    value = loss.item()
    if not math.isfinite(value):
        sums["non_finite"] = value
        return False
    sums.setdefault("loss", [0.0, None])[0] += value
    for k, (value, count) in figures.items():
        extreme = EXTREMES.get(k[-4:])
        entry = sums.setdefault(k, [value, 1] if extreme else [0.0, 0])
        entry[:] = [extreme(entry[0], value), 1] if extreme else [entry[0] + value, entry[1] + count]
    return True


EXTREMES = {"/min": min, "/max": max}   # figures named .../min or .../max are the step's extreme, not its mean


def over_ranks(sums: dict, params: list, optimizer, step: int, saved: int | None, args) -> dict:
    """The step's figures, each its sum over the micro-batches (and ranks) / its count, the loss a plain sum; the
    gradients summed over ranks (distributed.sum_gradients). A non-finite loss on any rank raises NonFiniteLoss
    before anything moves."""
    bad = sums.pop("non_finite", None)
    if distributed.any_rank(bad is not None):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {bad if bad is not None else 'non-finite on another rank'} at step "
                            f"{step + 1}: {_kept(args, saved)}")
    loss = sums.pop("loss", [0.0, None])[0]
    if distributed.world() > 1:
        keys = sorted({k for part in distributed.gather([sorted(sums)]) for k in part})   # figures of any rank
        extremes = {k: distributed.gather([sums[k][0] if k in sums else None]) for k in keys if k[-4:] in EXTREMES}
        loss, *flat = distributed.total([loss] + [sums.get(k, [0.0, 0])[0] for k in keys] +
                                        [sums.get(k, [0.0, 0])[1] for k in keys])
        sums = {k: [flat[i], flat[len(keys) + i]] for i, k in enumerate(keys)}
        sums.update({k: [EXTREMES[k[-4:]](v for v in values if v is not None), 1] for k, values in extremes.items()})
        distributed.sum_gradients(params)
    return {"loss": loss, **{k: s / n for k, (s, n) in sums.items() if n}}


def clip_gradients(params: list, clip: float, optimizer, step: int, saved: int | None, args) -> float:
    """Clip the gradient norm to `clip` (0: off) and return it as it was; a non-finite norm raises NonFiniteLoss
    before the optimizer moves."""
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip else float("inf")).item() if grads else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"gradient norm is {norm} at step {step + 1}: {_kept(args, saved)}")
    return norm


def _kept(args, saved: int | None) -> str:
    if saved is None:
        return f"stopping; no checkpoint was written yet (--save-every {args.save_every})"
    return f"stopping; the last good checkpoint {args.out} (step {saved}) is kept"


# ----------------------------------------------------------------------------------------------
# Logging


def progress(args, method: str, step: int, total: int):
    """The run's progress bar (rank 0 only)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=step, desc=method, dynamic_ncols=True,
                disable=None if distributed.main_rank() else True)


def log(args, bar, record: dict, started: float, tokens=None):
    """Append the step's record to the JSONL log (rank 0) with its wall time (and tokens_per_s, from the tokens
    the step processed on all ranks), and update the progress bar."""
    dt = time.perf_counter() - started
    record = {**record, "step_s": dt, **({"tokens_per_s": tokens / max(dt, 1e-9)} if tokens is not None else {})}
    record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
    if distributed.main_rank():
        with open(args.log, "a") as f:
            f.write(json.dumps(record) + "\n")
    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward", "state_nll_base") if k in record}, refresh=False)
    bar.update(1)


def checkpoint(args, step: int, total: int, save, saved: int | None) -> int | None:
    """After `step`: save() a checkpoint every --save-every steps, and a snapshot at --snapshots; returns the step of
    the last checkpoint on disk."""
    if step in snapshot_steps(args.snapshots, total):
        save(snapshot=True)
    return save() if args.save_every and step % args.save_every == 0 and step < total else saved
