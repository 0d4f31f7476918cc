"""Supervised fine-tuning: dataset states, gold tokens (the paper's Eq. 5).

    python train_sft.py --preset mild   --data-dir ../shared/data --out ckpt/sft_mild.pt
    python train_sft.py --preset stress --data-dir ../shared/data --out ckpt/sft_stress.pt
    python train_sft.py --preset stress --data-dir ../shared/data --out ckpt/sft_stress.pt --resume   # after a stop
    python train_sft.py --states learner --data-dir ../shared/data --out ckpt/sft_learner.pt   # its own correct samples

State source: the dataset. Every state s_t = (x, y*_<t) is a GSM8K train question in evaluate.py's prompt
format followed by a prefix of its gold solution; the signal is the gold next token:

    L(θ) = -Σ_t log π_θ(y*_t | x, y*_<t)                                             (Eq. 5)

averaged over all answer tokens of the optimizer step (every token weighs the same, and gradient
accumulation equals one large batch). Prompt tokens carry no loss and are not even sent through the lm_head.
The loop below is the method, step by step; the run's bookkeeping (flags, checkpoints, --resume, the log, ranks)
is training.Run's.

--states learner: the same loss on the learner's own states (rejection-sampling fine-tuning: STaR, RFT; "Retaining
by Doing", Chen et al. 2025, finds it forgets less than SFT on gold data). Each step samples --group-size
completions of each of its prompts from the current adapter (merged into the weights: GRPO's sampler, at
--temperature, stopping where evaluate.py stops), keeps the ones evaluate.is_correct accepts, at most --keep per
prompt, and trains Eq. 5 on them, their tokens as sampled up to the first EOS. The signal stays dense (every
token of an accepted completion is a target), the states are the learner's: the cell between SFT and GRPO. A step
that keeps nothing makes no update (the adapter and AdamW's moments stay as they were). Logged: kept (the
fraction of samples kept), accepted (the fraction correct), prompts_solved.

Presets (explicit flags override them):
- mild   1 epoch, lr 1e-4, r 16 / alpha 32: one pass at about ten times a typical full fine-tuning
         learning rate (the usual LoRA ratio) teaches the "#### N" answer format and some arithmetic style
         while moving the model little; the paper gives no mild setting, this is our choice.
- stress 5 epochs, lr 5e-4, r 64 / alpha 128: the paper's setting, meant to overfit and to show forgetting.
Both use 16 examples per optimizer step, 3% warmup, cosine decay, clip 1.0, adapter dropout 0.05.

Honest simplifications: the gold answer is used verbatim, GSM8K's "<<48/2=24>>" calculator annotations
included (they are the dataset's tokens; the paper does not say it stripped them), plus one EOS so the model
learns to stop; there is no packing of several examples into one row (batches of similar lengths keep
padding small instead); examples longer than --max-len tokens are cut at the end.
"""
import math

import torch

import distributed
import training
from cli import RATE, SIZE, TWO_OR_MORE
from evaluate import gsm8k_rollouts, is_correct

PRESETS = {
    "mild": dict(epochs=1.0, lr=1e-4, lora_r=16, lora_alpha=32),
    "stress": dict(epochs=5.0, lr=5e-4, lora_r=64, lora_alpha=128),
}


def parse_args(argv=None):
    p = training.parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mild",
                   help="sets --epochs, --lr, --lora-r, --lora-alpha (those show default None: the preset's value)")
    p.add_argument("--max-len", type=TWO_OR_MORE, default=1024,
                   help="tokens per example at most (prompt + answer + EOS)")
    p.add_argument("--states", choices=["data", "learner"], default="data",
                   help="state source: the gold solutions, or the learner's own samples that are correct")
    p.add_argument("--group-size", type=SIZE, default=8, help="--states learner: completions sampled per prompt")
    p.add_argument("--keep", type=SIZE, default=1,
                   help="--states learner: accepted completions kept per prompt, at most")
    p.add_argument("--temperature", type=RATE, default=1.0, help="--states learner: sampling temperature")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="--states learner: completion tokens at most")
    p.add_argument("--sample-batch-size", type=SIZE, default=256, help="--states learner: sequences per sampler batch")
    # None = "take it from the preset"
    p.set_defaults(epochs=None, lr=None, lora_r=None, lora_alpha=None, batch_size=16)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = f"ckpt/sft_{args.preset}.pt" if args.states == "data" else "ckpt/sft_learner.pt"
    return args


def sft_loss(model, rows, normalizer: float):
    """Eq. 5 on one micro-batch: the summed NLL of its target tokens / the step's target-token count."""
    logp = training.token_logprobs(model, rows.ids, rows.attn, rows.target)
    return -logp.sum() / normalizer                                                   # Eq. 5


def accepted_samples(args, model, tok, prompts, examples, seed: int):
    """--states learner: (prompt ids, None, completion ids) rows of the learner's completions of `prompts` that
    evaluate.is_correct accepts, at most --keep per prompt, and figures of the sampling: per sample whether it was
    accepted and kept, per prompt whether any sample solved it."""
    G = args.group_size
    rollouts = gsm8k_rollouts(model, tok, [p for p in prompts for _ in range(G)], "default", args.max_new_tokens,
                              args.temperature, seed, args.sample_batch_size)
    correct = torch.tensor([is_correct(r.text, examples[i // G]["answer"]) for i, r in enumerate(rollouts)])
    kept = correct.view(-1, G) & (correct.view(-1, G).cumsum(1) <= args.keep)   # the first --keep accepted
    rows = [(prompts[i // G], None, r.tokens[:max(1, args.max_len - len(r.prompt_ids))])
            for i, r in enumerate(rollouts) if kept.flatten()[i]]
    return rows, {"accepted": [correct.float()], "kept": [kept.flatten().float()],
                  "prompts_solved": [correct.view(-1, G).any(1).float()]}


def main(argv=None):
    args = parse_args(argv)
    run = training.Run(args, {"method": "sft", "preset": args.preset, "states": args.states})
    model, tok, optimizer = run.model, run.tok, run.optimizer
    gold = training.gold_solutions(tok, run.examples, args.max_len) if args.states == "data" else None
    lengths = [len(p) for p in run.prompts] if args.states == "learner" else [len(p) + len(a) for p, a in gold]
    with run.start(lengths):   # inside, Ctrl-C and SIGTERM end the step, then the run
        while run.going():
            # the step's states and signal: the gold solutions' prefixes and tokens, or the learner's accepted samples
            micro, figures = [], {}
            for k in range(args.grad_accum):
                batch = run.next_batch()
                if args.states == "learner":
                    seed = distributed.seed(args.seed, "rollouts", run.step, k)
                    rows, sampling = accepted_samples(args, model, tok, [run.prompts[i] for i in batch],
                                                      [run.examples[i] for i in batch], seed)
                    figures = {key: figures.get(key, []) + v for key, v in sampling.items()}
                else:   # the states x + y*_<t are the answer's own prefixes (states None), every answer token a target
                    rows = [(gold[i][0], None, gold[i][1]) for i in batch]
                if rows:
                    micro.append(training.pad_rows(rows, args.device))
            n_targets, tokens = distributed.total([sum(int(r.target.sum()) for r in micro),
                                                   sum(int(r.attn.sum()) for r in micro)])
            figures.update(run.locality(micro))
            # loss and backward, micro-batch by micro-batch (no accepted completion: no micro-batch, no update)
            model.train()
            loss_sum = 0.0
            for rows in micro:
                loss = sft_loss(model, rows, n_targets)                        # Eq. 5, / the step's target tokens
                loss.backward()
                loss_sum += loss.item()
            model.eval()
            stats = run.all_reduce(loss_sum, figures)          # gradients and figures of every rank; a NaN stops here
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip or math.inf).item()
            lr = training.lr_at(run.step, run.total, args.lr, args.warmup)     # warmup, then cosine decay
            optimizer.param_groups[0]["lr"] = lr                               # one group: the adapter
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.log({**stats, "lr": lr, "grad_norm": grad_norm}, tokens)
            run.save()                                                         # every --save-every, and --snapshots
    return args


if __name__ == "__main__":
    training.run(main)
