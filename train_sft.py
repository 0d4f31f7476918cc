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
import functools

import distributed
import training
from evaluate import gsm8k_prompt, gsm8k_rollouts, is_correct
from cli import RATE, SIZE, FlagParser, number

PRESETS = {
    "mild": dict(epochs=1.0, lr=1e-4, lora_r=16, lora_alpha=32),
    "stress": dict(epochs=5.0, lr=5e-4, lora_r=64, lora_alpha=128),
}


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mild",
                   help="sets --epochs, --lr, --lora-r, --lora-alpha (those show default None: the preset's value)")
    p.add_argument("--max-len", type=number(int, 2), default=1024, help="tokens per example at most (prompt + answer + EOS)")
    p.add_argument("--states", choices=["data", "learner"], default="data",
                   help="state source: the gold solutions, or the learner's own samples that are correct")
    p.add_argument("--group-size", type=SIZE, default=8, help="--states learner: completions sampled per prompt")
    p.add_argument("--keep", type=SIZE, default=1, help="--states learner: accepted completions kept per prompt, at most")
    p.add_argument("--temperature", type=RATE, default=1.0, help="--states learner: sampling temperature")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="--states learner: completion tokens at most")
    p.add_argument("--sample-batch-size", type=SIZE, default=256, help="--states learner: sequences per sampler batch")
    training.add_common_args(p)
    # None = "take it from the preset"
    p.set_defaults(epochs=None, lr=None, lora_r=None, lora_alpha=None, batch_size=16)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = f"ckpt/sft_{args.preset}.pt" if args.states == "data" else "ckpt/sft_learner.pt"
    return args


def sft_loss(model, batch, normalizer: float, locality: bool):
    """Eq. 5 on one micro-batch: summed gold-token NLL / the step's answer-token count."""
    ids, attn, target, state = batch
    logp = training.token_logprobs(model, ids, attn, target)
    loss = -logp.sum() / normalizer                                                 # Eq. 5
    figures = training.state_locality(model, ids, attn, state, target_logprobs=logp) if locality else {}
    return loss, figures


def accepted_samples(run, examples, seed: int):
    """--states learner: (prompt ids, None, completion ids) rows of the learner's accepted completions of
    `examples`, at most --keep per prompt, and the figures of the sampling."""
    args, tok = run.args, run.tok
    prompts = tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in examples])
    G = args.group_size
    rollouts = gsm8k_rollouts(run.model, tok, [p for p in prompts for _ in range(G)], "default", args.max_new_tokens,
                              args.temperature, seed, args.sample_batch_size)
    correct = [is_correct(r.text, examples[i // G]["answer"]) for i, r in enumerate(rollouts)]
    rows = []
    for j, p in enumerate(prompts):
        good = [rollouts[i] for i in range(j * G, (j + 1) * G) if correct[i]][:args.keep]
        rows += [(p, None, training.through_eos(r.tokens, tok.eos_ids)) for r in good]
    solved = sum(any(correct[j * G:(j + 1) * G]) for j in range(len(prompts)))
    return rows, {"prompts": len(prompts), "sampled": len(rollouts), "accepted": sum(correct), "kept": len(rows),
                  "solved": solved}


def main(argv=None):
    args = parse_args(argv)
    run = training.setup(args, "sft", meta={"preset": args.preset, "states": args.states})
    if args.states == "learner":
        return learner_states(run)
    pairs = training.gold_solutions(run.tok, training.train_examples(run), args.max_len)
    lengths = [len(p) + len(a) for p, a in pairs]

    @functools.cache
    def epoch_batches(epoch):
        return training.length_grouped_batches(lengths, args.batch_size, seed=args.seed * 1000 + epoch)

    n_batches = -(-len(pairs) // args.batch_size)
    for _ in training.steps(run, training.plan_steps(args, n_batches)):
        # The states x + y*_<t are the answer's own prefixes (states None): every answer token is a target.
        shares = [training.next_batch(run, epoch_batches) for _ in range(args.grad_accum)]
        micro = [training.pad_rows([(pairs[i][0], None, pairs[i][1]) for i in share], args.device)
                 for share in shares if share]
        n_targets, tokens = distributed.total([sum(int(b[2].sum()) for b in micro), sum(int(b[1].sum()) for b in micro)])
        locality = training.wants_locality(run)
        stats = training.train_step(run, micro, lambda b: sft_loss(run.model, b, n_targets, locality))
        stats["tokens"] = tokens
        training.end_step(run, stats)
    training.finish(run)
    return run


def learner_states(run):
    """--states learner: each step, Eq. 5 on the learner's own accepted completions of its prompts."""
    args = run.args
    examples = training.train_examples(run)
    epoch_batches = training.prompt_batches(args, examples)
    n_batches = -(-len(examples) // args.batch_size)
    for step in training.steps(run, training.plan_steps(args, n_batches)):
        micro, counts = [], dict.fromkeys(("prompts", "sampled", "accepted", "kept", "solved"), 0)
        for k in range(args.grad_accum):
            batch = [examples[i] for i in training.next_batch(run, epoch_batches)]
            rows, figures = accepted_samples(run, batch, seed=distributed.seed(args.seed * 10**9 + step * 1000 + k))
            counts = {key: counts[key] + figures[key] for key in counts}
            if rows:
                micro.append(training.pad_rows([(x, s, c[:max(1, args.max_len - len(x))]) for x, s, c in rows],
                                               args.device))
        counts = dict(zip(counts, distributed.total(list(counts.values()))))   # over all ranks
        n_targets, tokens = distributed.total([sum(int(b[2].sum()) for b in micro), sum(int(b[1].sum()) for b in micro)])
        locality = training.wants_locality(run)
        # no accepted completion: no micro-batch, no gradient, and AdamW leaves parameters without one alone
        stats = training.train_step(run, micro, lambda b: sft_loss(run.model, b, n_targets, locality))
        stats.update(kept=counts["kept"] / counts["sampled"], accepted=counts["accepted"] / counts["sampled"],
                     prompts_solved=counts["solved"] / counts["prompts"], tokens=tokens)
        training.end_step(run, stats)
    training.finish(run)
    return run


if __name__ == "__main__":
    training.cli(main)
