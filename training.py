"""What the three trainers share: the run's bookkeeping (class Run), their flags, token log-probs and the data's rows.

Each trainer (train_sft.py, train_grpo.py, train_opd.py) writes its method and its loop, as nanoGPT's train.py does;
what it leaves to this file is what no method changes:

    run = training.Run(args, meta)                   # base, adapter (fresh | --init | --resume), AdamW, the data
    with run.start(lengths):                         # the run's steps, the data order; where --resume left it
        while run.going():                           # --stop-after, Ctrl-C / SIGTERM: checkpoint, then stop
            rows = ... run.next_batch() ...                          # states and signal: the method's
            loss = ...; loss.backward()                              # its equation: Eq. 5, 6 or 7
            stats = run.all_reduce(loss_sum, figures)    # over ranks: gradients, logged figures; a NaN stops here
            grad_norm = clip_grad_norm_(...)                         # clip
            lr = lr_at(...); optimizer.step(); run.step += 1         # schedule, step
            run.log(record); run.save()                              # JSONL + bar (+ --eval-every); checkpoint

Contracts:
- A step's loss is the SUM of its micro-batch losses, each divided by a step-wide normalizer (e.g. all target
  tokens of the step, over all ranks): gradient accumulation then gives the gradient of one big batch.
- Masks are bool [B, T] over positions of input_ids: mask[b, t] = token t is scored, predicted from position
  t - 1 (so mask[:, 0] is False). Per-token results come out in the order of input_ids[mask].
- A logged figure is a list of tensors whose elements the step averages over (every token, state or sample of the
  step, on every rank): {name: [tensor, ..]}. Its keys depend on the step and the flags, never on the data, so
  every rank reduces the same keys in one all-reduce.
- State locality (the measurement the paper names as missing) is measured in one place, Run.locality, every
  --locality-every steps: `state_nll_base`, the mean NLL under the frozen base policy (adapter off) of the state
  tokens where the step supervises (high: off-policy states), and `target_nll`, the learner's mean NLL of its
  supervision targets, both before the step's update and without dropout.
- The adapter being trained is lora.py's "default"; it is kept in float32 over a bfloat16 base (AdamW on bf16 LoRA
  weights would round most updates away), and in float64 over a float64 base (the recorded-behaviour test).
- A checkpoint (lora.save_checkpoint, atomic) holds the adapter and meta (method, base model, data dir, a hash of the
  training examples, every argument, the step); until the run is finished also AdamW's state and the data
  position. Dropout is reseeded at every step from (seed, step, rank), the samplers and the data order have seeded
  generators of their own, so `--resume` ends with the uninterrupted run's adapter to the bit (on as many ranks).
  --snapshots F,F also keeps the adapter after those fractions of the run (<out>_at<step>.pt).
- A non-finite loss or gradient norm raises NonFiniteLoss before the optimizer moves: the last checkpoint on disk
  is the last good one.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

import cli
import distributed
from cli import COUNT, NONNEGATIVE, PROBABILITY, RATE, SIZE, number, output_dir
from evaluate import eval_gsm8k, file_sha256, gsm8k_prompt, load_gsm8k, resolve_data_dir
from generate import pad
from lora import (ALL_TARGETS, LoraConfig, add_lora, load_adapter, load_checkpoint, lora_parameters, merged,
                  save_checkpoint, use_adapter)
from model import BUNDLED, LoadError, load_model, load_tokenizer, resolve_model_dir, upcast


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


def parser(doc: str) -> cli.FlagParser:
    """A trainer's flags: its own (added by the trainer), then these, which every trainer shares by name. A method
    changes their defaults with p.set_defaults()."""
    p = cli.FlagParser(description=doc, formatter_class=HelpFormatter)
    cuda = torch.cuda.is_available()
    g = p.add_argument_group("common training flags")
    g.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="base policy: HF model directory, hub id, or tiny")
    g.add_argument("--data-dir", default=None,
                   help="directory with gsm8k/train.jsonl (default: the hub's openai/gsm8k; tiny/data for tiny)")
    g.add_argument("--limit", type=COUNT, default=0, help="train on the first N GSM8K train examples only (0 = all)")
    g.add_argument("--init", default=None, help="start from this LoRA checkpoint (.pt) instead of a fresh adapter")
    g.add_argument("--out", default=None,
                   help="checkpoint path (.pt), written atomically every --save-every steps and at the end")
    g.add_argument("--log", default=None, help="metrics JSONL (default: --out with .jsonl)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run whose checkpoint is --out")
    g.add_argument("--lora-r", type=SIZE, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=SIZE, default=32, help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=PROBABILITY, default=0.05, help="dropout on the adapter's input")
    g.add_argument("--lora-targets", type=targets, default=list(ALL_TARGETS), metavar="NAME,NAME,..",
                   help="the projections that get an adapter, by PEFT's target_modules names")
    g.add_argument("--lr", type=RATE, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay on the adapter")
    g.add_argument("--warmup", type=NONNEGATIVE, default=0.03,
                   help="linear warmup: a fraction of the steps if < 1, else a step count")
    g.add_argument("--clip", type=NONNEGATIVE, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--epochs", type=RATE, default=1.0, help="passes over the training data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=COUNT, default=0, help="optimizer steps (0 = from --epochs)")
    g.add_argument("--batch-size", type=SIZE, default=16, help="examples (SFT) or prompts (GRPO, OPD) per micro-batch")
    g.add_argument("--grad-accum", type=SIZE, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seed", type=number(int), default=0, help="seed for LoRA init, data order, dropout and sampling")
    g.add_argument("--device", type=cli.device, default="cuda" if cuda else "cpu", help="cpu | cuda")
    g.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float64"],
                   help="base weights; on CUDA the forward runs under bf16 autocast either way")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--save-every", type=COUNT, default=100, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--stop-after", type=COUNT, default=0,
                   help="stop (with a checkpoint) after N steps of this invocation; --resume continues")
    g.add_argument("--snapshots", type=fractions, default=[], metavar="F,F,..",
                   help="also keep the adapter after these fractions of the run (e.g. 0.25,0.5): <out>_at<step>.pt")
    g.add_argument("--locality-every", type=COUNT, default=10,
                   help="log state locality every N steps (0 = never; each costs two no-grad forwards)")
    g.add_argument("--eval-every", type=COUNT, default=0,
                   help="log greedy target accuracy on the validation split (val_accuracy) every N steps (0 = never)")
    g.add_argument("--eval-limit", type=COUNT, default=200,
                   help="--eval-every: the first N validation problems (0 = all)")
    return p


# Flags that may change between a run and its --resume: where and how often it writes, how far this
# invocation goes, logging, the device. Any other difference would continue into another run.
RESUME_MAY_CHANGE = {"resume", "out", "log", "save_every", "snapshots", "stop_after", "locality_every", "device",
                     "grad_checkpointing", "eval_every", "eval_limit"}


def finished(ckpt: dict) -> bool:
    """Whether the checkpoint's run has done all its planned steps (then it is the run's deliverable)."""
    ts = ckpt.get("train_state") or {}
    return ts.get("step", 0) >= ts.get("total_steps", math.inf)


def snapshot_steps(fractions: list[float], total: int) -> list[int]:
    """The steps --snapshots keeps: each fraction of the run, rounded, at least step 1."""
    return sorted({max(1, round(f * total)) for f in fractions})


def snapshot_path(out: str, step: int) -> str:
    """Where the adapter after `step` steps is kept: ckpt/grpo_s0.pt -> ckpt/grpo_s0_at10.pt."""
    return f"{os.path.splitext(out)[0]}_at{step}.pt"


# ----------------------------------------------------------------------------------------------
# OPD's teacher: an adapter of the student's base, or a model of its own that shares the student's tokenizer


class Policy(NamedTuple):
    """A policy to sample from or score with: a module, its tokenizer, and the adapter that makes the module this
    policy (None: its weights as they are)."""
    model: torch.nn.Module
    tok: object
    adapter: str | None


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name one model (a bundled name or local directory by its real path, else a hub id)."""
    return len({os.path.realpath(BUNDLED.get(m, m)) if m in BUNDLED or os.path.isdir(m) else m for m in (a, b)}) == 1


def shared_tokenizer(student: str, teacher: str, examples: list[dict]):
    """The teacher's tokenizer, once shown to be the student's: the same token at every id of the student's vocabulary,
    and the same ids for a fixed sample of the train text. Its EOS ids are both models' (a teacher's continuation
    stops at either; the student's rollouts stop at the student's). Anything else is a one-line LoadError."""
    s, t = (load_tokenizer(resolve_model_dir(m)) for m in (student, teacher))
    vocab = t.tok.get_vocab(with_added_tokens=True)
    texts = [ex["question"] + " " + ex["answer"] for ex in examples[:64]]
    wrong = next((f"{token!r} is id {i} in the student's and {vocab.get(token)} in the teacher's"
                  for token, i in s.tok.get_vocab(with_added_tokens=True).items() if vocab.get(token) != i), None)
    if not wrong and s.encode_batch(texts) != t.encode_batch(texts):
        wrong = "they encode the train text differently"
    if wrong:
        raise LoadError(f"--teacher {teacher} does not share the tokenizer of --model {student} ({wrong}); "
                        "distillation across tokenizers is not supported")
    t.eos_ids = sorted(set(s.eos_ids) | set(t.eos_ids))
    return t


def teacher_record(teacher: str, adapter: bool) -> dict:
    """What the checkpoint records of the teacher (a --resume with another one is refused): its kind, its path or hub
    id, and the sha256 of its file (an adapter), of its weight files (a local model), or the hub revision."""
    if adapter:
        return {"kind": "adapter", "path": teacher, "sha256": file_sha256(teacher)}
    where = resolve_model_dir(teacher)
    if teacher not in BUNDLED and not os.path.isdir(teacher):   # a hub id: the snapshot directory is the revision
        return {"kind": "model", "path": teacher, "revision": os.path.basename(os.path.normpath(where))}
    files = sorted(f for f in os.listdir(where) if f.endswith(".safetensors"))
    digest = hashlib.sha256("".join(file_sha256(os.path.join(where, f)) for f in files).encode()).hexdigest()
    return {"kind": "model", "path": teacher, "sha256": digest}


# ----------------------------------------------------------------------------------------------
# The run


class Run:
    """One training run's bookkeeping. Its fields name themselves: args, model, tok, optimizer, params (the trained
    adapter's), examples (GSM8K train, the first --limit), prompts (their prompt ids), step, total (the planned
    steps), saved (the step of the last checkpoint on disk, None before the first), teacher (OPD's --teacher, a
    Policy). meta["method"] names the run (sft, grpo, opd)."""

    def __init__(self, args, meta: dict, teacher: str | None = None):
        self.args, self.meta = args, meta
        args.device = distributed.init(args.device)   # under torchrun: this rank's device
        is_adapter = teacher and (os.path.isfile(teacher) or teacher.endswith(".pt"))   # else a model
        adapter = load_checkpoint(teacher) if is_adapter else None
        if adapter:   # --model and --data-dir default to what the teacher was trained on
            base = adapter["meta"].get("base_model") or "Qwen/Qwen3-0.6B-Base"
            if args.model and not same_model(args.model, base):
                raise LoadError(f"--teacher {teacher} is an adapter of {base}, not of --model {args.model}: export it "
                                f"as a model (python lora.py export --merged DIR) and pass that directory")
            args.model, args.data_dir = args.model or base, args.data_dir or adapter["meta"].get("data_dir")
            meta["teacher_method"] = adapter["meta"].get("method")
        elif teacher and not args.model:
            raise LoadError(f"--teacher {teacher} is a model, not a checkpoint of this project: name the student "
                            "with --model")
        args.data_dir = resolve_data_dir(args.model, args.data_dir)
        self.examples = load_gsm8k("train", args.data_dir)[:args.limit or None]
        if teacher:   # its tokenizer checked against the student's before anything is written
            teacher_tok = None if adapter else shared_tokenizer(args.model, teacher, self.examples)
            meta["teacher"] = teacher_record(teacher, adapter is not None)
        args.out = output_dir(args.out or f"ckpt/{meta['method']}.pt")
        args.log = output_dir(args.log or os.path.splitext(args.out)[0] + ".jsonl", "--log")
        self.resumed = self._resumable() if args.resume else None
        ckpt = self.resumed or (load_checkpoint(args.init) if args.init else None)
        if args.init and not args.resume:
            for key, name in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_targets", "targets")):
                mine, theirs = (",".join(v) if isinstance(v, list) else v
                                for v in (getattr(args, key), ckpt["lora"][name]))
                if mine != theirs:
                    flag = "--" + key.replace("_", "-")
                    raise LoadError(f"{flag} is {mine}, but --init {args.init} holds an adapter with {name} {theirs}: "
                                    f"pass {flag} {theirs} to start from it")
        torch.manual_seed(args.seed)   # the LoRA init, the same on every rank (and every CUDA device)
        dtype = getattr(torch, args.dtype)
        self.model, self.tok = load_model(args.model, device=args.device, dtype=dtype)
        adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if ckpt is not None:   # the checkpoint's weights, this run's dropout
            load_adapter(self.model, ckpt, dtype=adapter_dtype, dropout=args.lora_dropout)
        else:
            add_lora(self.model, LoraConfig(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets)),
                     dtype=adapter_dtype)
        self.teacher = None   # OPD's: a Policy, the student's base under adapter "teacher" or a model of its own
        if adapter:
            load_adapter(self.model, adapter, name="teacher", dropout=0.0)   # frozen: no dropout either
            self.teacher = Policy(self.model, self.tok, "teacher")
        elif teacher:   # frozen, in the student's dtype, with its own output layer
            model, _ = load_model(teacher, device=args.device, dtype=dtype, with_tokenizer=False)
            model.requires_grad_(False)
            for m in (self.model, model):   # both cut to the ids the tokenizer defines: padded rows get no probability
                m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight[:self.tok.vocab_size], requires_grad=False)
            self.teacher = Policy(model, teacher_tok, None)
        self.model.gradient_checkpointing = args.grad_checkpointing
        self.params = lora_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay,
                                           fused=args.device.startswith("cuda") or None)   # None: torch's default
        digest = hashlib.sha256(json.dumps(self.examples, sort_keys=True).encode()).hexdigest()[:16]
        if self.resumed and self.resumed["meta"].get("data_sha256") != digest:
            raise LoadError(f"--resume: the training examples are not those of the run in {args.out} "
                            f"(--data-dir {args.data_dir}, --limit {args.limit})")
        meta["data_sha256"] = digest
        self.prompts = self.tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in self.examples])
        self.problems = validation_problems(args)

    def _resumable(self) -> dict:
        """--out's checkpoint, once it is shown to be this method's unfinished run with these very flags."""
        args, method = self.args, self.meta["method"]
        if not os.path.exists(args.out):
            raise LoadError(f"--resume: {args.out} does not exist (nothing to resume; drop --resume to start)")
        ckpt = load_checkpoint(args.out)
        ts, before = ckpt.get("train_state") or {}, ckpt["meta"].get("args", {})
        if ckpt["meta"].get("method") != method:
            raise LoadError(f"--resume: {args.out} is a {ckpt['meta'].get('method')!r} run, not {method!r}")
        if finished(ckpt):
            raise LoadError(f"--resume: {args.out} is a finished run (step {ts['step']}); nothing to resume")
        if "rng" in ts:
            raise LoadError(f"--resume: {args.out} was written by an earlier version (saved random states), which "
                            "this one cannot continue to the bit; start the run anew")
        if ckpt["meta"].get("teacher") != self.meta.get("teacher"):
            raise LoadError(f"--resume: the teacher is not the run's ({ckpt['meta'].get('teacher')}); resume with it")
        changed = (k for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and k in before and before[k] != v)
        if k := next(changed, None):
            raise LoadError(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r} here but {before[k]!r} in the "
                            f"run of {args.out}; resume with the run's flags, or drop --resume to start a new run")
        return ckpt

    def start(self, lengths: list[int], steps_per_batch: int = 1):
        """Plan the run: its steps (--max-steps, else --epochs passes over len(lengths) examples in batches of
        --batch-size, --grad-accum batches a step, each batch taken steps_per_batch times: GRPO's --mu), and its
        data order (batches of examples whose lengths in tokens are close); then where it starts: step 0, or where
        --resume left it. Cuts the log back to that step (a new run starts a new log). Returns the context the
        steps run in: inside it Ctrl-C and SIGTERM end the step, not the program (going() then checkpoints)."""
        args = self.args
        batches = -(-len(lengths) // args.batch_size)
        self.total = args.max_steps or max(1, math.ceil(args.epochs * batches / args.grad_accum)) * steps_per_batch
        self.lengths, self._order = lengths, {}
        self.step, self.position = 0, {"epoch": 0, "index": 0}
        if self.resumed:
            ts = self.resumed["train_state"]   # the same flags and examples: the same planned steps
            self.optimizer.load_state_dict(ts["optimizer"])
            self.step, self.position = ts["step"], dict(ts["data"])
        self.first, self.saved = self.step, (self.step if self.resumed else None)
        if distributed.main_rank() and os.path.exists(args.log):   # a resumed run drops the steps it will redo
            with open(args.log) as f:
                lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= self.step]
            cli.write_text(args.log, "".join(lines) if self.step else "")
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, initial=self.step, desc=self.meta["method"], dynamic_ncols=True,
                        disable=None if distributed.main_rank() else True)
        distributed.barrier()
        return cli.stop_at_step_end()

    def next_batch(self, batches: int = 1) -> list[int]:
        """This rank's share of the next `batches` batches of the data order, taken together (example indices)."""
        step_batch = []
        for _ in range(batches):
            epoch = self.position["epoch"]
            if epoch not in self._order:   # each epoch its own shuffle, the same on every rank
                self._order = {epoch: length_grouped_batches(self.lengths, self.args.batch_size,
                                                             distributed.seed(self.args.seed, "data", epoch, rank_=0))}
            order = self._order[epoch]
            step_batch += order[self.position["index"]]
            self.position["index"] += 1
            if self.position["index"] == len(order):
                self.position.update(epoch=epoch + 1, index=0)
        return distributed.share(step_batch)

    def going(self, cycle: int = 1) -> bool:
        """Whether the run takes another step. It stops at a step that is a multiple of `cycle` (GRPO's --mu: a
        checkpoint holds no rollouts) after --stop-after steps of this invocation, or on Ctrl-C / SIGTERM on any rank:
        then it checkpoints the steps done and exits 128 + the signal's number (130, 143) with one line. At the end it
        writes the last checkpoint. Before each step it reseeds adapter dropout from (seed, step, rank)."""
        args, step = self.args, self.step
        signum = cli.stop_requested() if step % cycle == 0 else 0
        if distributed.any_rank(bool(signum)):        # under torchrun every rank stops at the same step
            self.save(force=True)
            if distributed.main_rank():
                print(f"interrupted at step {step}; checkpoint {args.out}; continue with --resume", file=sys.stderr)
            raise SystemExit(128 + (signum or 15))
        if step >= self.total or (args.stop_after and step - self.first >= args.stop_after and step % cycle == 0):
            self.save(force=True)
            self.bar.close()
            distributed.barrier()   # the checkpoint is on disk before any rank reads it (reproduce.py)
            if distributed.main_rank():
                print(f"{self.meta['method']}: step {step}/{self.total} -> {args.out} (log {args.log})",
                      file=sys.stderr)
            return False
        self.started = time.perf_counter()
        torch.manual_seed(distributed.seed(args.seed, "dropout", step))
        return True

    def all_reduce(self, loss: float, figures: dict, extremes: tuple = ()) -> dict:
        """The step over all ranks, in one collective: the loss summed, each figure averaged over its elements on
        every rank (those named in `extremes` as their /mean, /min and /max), then the gradients summed
        (distributed.sum_gradients). The NaN stop: a non-finite loss or gradient on any rank raises NonFiniteLoss
        before the optimizer moves."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0
        local = {k: [sum(float(t.detach().double().sum()) for t in v), sum(t.numel() for t in v),
                     min((float(t.min()) for t in v if t.numel()), default=math.inf),
                     max((float(t.max()) for t in v if t.numel()), default=-math.inf)] for k, v in figures.items()}
        ranks = distributed.gather([(loss, norm, local)])
        bad = next((f"the {what} is {value}" for loss, norm, _ in ranks
                    for what, value in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(value)), None)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            kept = (f"no checkpoint was written yet (--save-every {self.args.save_every})" if self.saved is None else
                    f"the last good checkpoint {self.args.out} (step {self.saved}) is kept")
            raise NonFiniteLoss(f"{bad} at step {self.step + 1}: stopping; {kept}")
        distributed.sum_gradients(self.params)
        stats = {"loss": sum(loss for loss, _, _ in ranks)}
        for k in sorted(figures):
            totals, counts, lows, highs = zip(*(figs[k] for _, _, figs in ranks))   # each over the ranks
            if sum(counts) and k in extremes:
                stats.update({f"{k}/mean": sum(totals) / sum(counts), f"{k}/min": min(lows), f"{k}/max": max(highs)})
            elif sum(counts):
                stats[k] = sum(totals) / sum(counts)
        return stats

    @torch.no_grad()
    def locality(self, batches: list) -> dict:
        """State locality every --locality-every steps ({} between): state_nll_base and target_nll (the module's
        docstring) as figures over the step's rows (pad_rows' batches)."""
        every = self.args.locality_every
        if not every or self.step % every:
            return {}
        figures = {"state_nll_base": [], "target_nll": []}
        was_training = self.model.training
        self.model.eval()
        for b in batches:
            figures["state_nll_base"].append(-token_logprobs(self.model, b.ids, b.attn, b.state, policy=None))
            figures["target_nll"].append(-token_logprobs(self.model, b.ids, b.attn, b.target))
        self.model.train(was_training)
        return figures

    def log(self, record: dict, tokens: float):
        """After the step: --eval-every's val_accuracy, then the step's record, with its wall time and tokens/s (of
        `tokens`, what the step processed on all ranks), appended to the JSONL log (rank 0), and the progress bar."""
        record = {"step": self.step, **record, **self.validate()}
        dt = time.perf_counter() - self.started
        record.update(step_s=dt, tokens_per_s=tokens / max(dt, 1e-9))
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        if distributed.main_rank():
            append_line(self.args.log, json.dumps(record))
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward", "state_nll_base") if k in record},
                             refresh=False)
        self.bar.update(1)

    def validate(self) -> dict:
        """{"val_accuracy": greedy target accuracy on the validation problems} after every --eval-every steps and the
        last (the adapter merged, as evaluate.py scores; each rank its share); {} between them."""
        if not self.problems or (self.step % self.args.eval_every and self.step != self.total):
            return {}
        with merged(self.model):
            _, records = eval_gsm8k(self.model, self.tok, distributed.share(self.problems), progress=False)
        correct, n = distributed.total([sum(r["correct"] for r in records), len(records)])
        return {"val_accuracy": correct / n}

    def save(self, force: bool = False):
        """After the step: a checkpoint every --save-every steps (force: now, unless this step's is on disk), and a
        snapshot (the adapter alone, a point of the run's trajectory) at --snapshots. Atomic; rank 0 writes. A
        finished run's checkpoint is its deliverable: it holds no optimizer state."""
        args, step = self.args, self.step
        meta = {"data_dir": args.data_dir, "args": vars(args), "step": step, "total_steps": self.total, **self.meta}
        state = {"step": step, "total_steps": self.total}
        if step in snapshot_steps(args.snapshots, self.total) and not force and distributed.main_rank():
            save_checkpoint(snapshot_path(args.out, step), self.model, meta, train_state=state)
        due = args.save_every and step % args.save_every == 0 and step < self.total
        if (due and not force) or (force and self.saved != step):
            if step < self.total:
                state.update(optimizer=self.optimizer.state_dict(), data=dict(self.position))
            if distributed.main_rank():
                save_checkpoint(args.out, self.model, meta, train_state=state)
            self.saved = step


def append_line(path: str, line: str):
    """Append a line to a log; a full disk leaves the log as it was (every line before whole), then raises."""
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(line + "\n")
            f.flush()
        except OSError as e:
            f.truncate(size)
            raise OSError(e.errno, e.strerror, path)


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


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """Linear warmup to `lr`, then cosine decay to 0 at `total` (step is 0-based)."""
    w = int(warmup * total) if warmup < 1 else int(warmup)
    if step < w:
        return lr * (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Rows and token log-probs


class Rows(NamedTuple):
    """A right-padded micro-batch (pad_rows): ids, attn [B, T] and the masks `target` (the scored tokens) and
    `state` (the state tokens of the supervised states, whose base NLL is state locality)."""
    ids: torch.Tensor
    attn: torch.Tensor
    target: torch.Tensor
    state: torch.Tensor


def pad_rows(rows, device) -> Rows:
    """Rows (prompt, states, targets), each three token lists laid end to end. A row whose states are None has its
    targets' own prefixes as states, i.e. the targets but the last (SFT's gold answer, GRPO's completion); OPD's
    continuation rows name theirs: the rollout prefix y_<t before the teacher's tokens."""
    ids, attn = pad([[*x, *(s or ()), *c] for x, s, c in rows], side="right")
    target, state = torch.zeros_like(attn), torch.zeros_like(attn)
    for b, (x, s, c) in enumerate(rows):
        n, start = len(x) + len(s or ()) + len(c), len(x) + len(s or ())
        target[b, start:n] = True
        state[b, len(x):n - 1 if s is None else start] = True   # states None: the targets' own prefixes
    return Rows(*(t.to(device) for t in (ids, attn, target, state)))


def gold_solutions(tok, examples, max_len: int) -> list[tuple]:
    """(prompt ids, gold answer ids + EOS) per example, tokenized apart so that the boundary between the prompt
    and the dataset's states is exact; at most max_len tokens in all (the answer is cut at its end)."""
    prompts = tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in examples])
    answers = tok.encode_batch([" " + ex["answer"] for ex in examples])
    eos = tok.eos_ids[:1]   # one EOS, so the model learns to stop
    return [(p[:max_len - 1], (a + eos)[:max(1, max_len - len(p))]) for p, a in zip(prompts, answers)]


def autocast(module):
    """bf16 autocast on CUDA and over bf16 weights; none over float32 or float64 weights on the CPU."""
    w = next(module.parameters())
    enabled = w.device.type == "cuda" or w.dtype == torch.bfloat16
    return torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=enabled)


def scored_hidden(model, input_ids, attention_mask, mask, policy: str | None = "default"):
    """Final hidden states [N, H] of the positions before each token of input_ids[mask] (the states it is scored at),
    under the policy of adapter `policy` (None: the frozen base; "teacher": OPD's teacher)."""
    assert not mask[:, 0].any(), "the first token has no prefix to be predicted from"
    with use_adapter(model, policy), autocast(model):
        return model(input_ids, attention_mask, return_hidden=True)[:, :-1][mask[:, 1:]]


def token_logprobs(model, input_ids, attention_mask, mask, temperature: float = 1.0, policy: str | None = "default",
                   chunk: int = 4096):
    """log π(input_ids[b, t] | input_ids[b, :t]) for every (b, t) with mask[b, t], in input_ids[mask] order, where π
    is the policy of adapter `policy` (the trained "default"; None: the frozen base; "teacher": OPD's teacher).

    The lm_head runs only on the positions that predict a masked token, `chunk` positions at a time, each
    chunk's logits recomputed in backward instead of kept: on Qwen's 151,936-token vocabulary, float32
    logits for a GRPO micro-batch would otherwise take tens of GB. Differentiable; logits / temperature, as
    the sampler records them (T = 0, greedy, scores the logits themselves).
    """
    h = scored_hidden(model, input_ids, attention_mask, mask, policy)
    targets = input_ids[mask]
    if h.shape[0] <= chunk or not torch.is_grad_enabled():
        return torch.cat([_logprobs(model.lm_head, h[i:i + chunk], targets[i:i + chunk], temperature)
                          for i in range(0, max(h.shape[0], 1), chunk)])
    return torch.cat([torch.utils.checkpoint.checkpoint(_logprobs, model.lm_head, h[i:i + chunk], targets[i:i + chunk],
                                                        temperature, use_reentrant=False)
                      for i in range(0, h.shape[0], chunk)])


def _logprobs(lm_head, h, targets, temperature: float):
    with autocast(lm_head):
        logits = upcast(lm_head(h))   # bf16 -> float32; float64 stays
    if temperature not in (0, 1):
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")
