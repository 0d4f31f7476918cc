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
import time

import cli

import distributed
import lora
import training
from evaluate import gsm8k_rollouts, is_correct
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


def accepted_samples(args, model, tok, examples, seed: int):
    """--states learner: (prompt ids, None, completion ids) rows of the learner's accepted completions of
    `examples`, at most --keep per prompt, and the figures of the sampling."""
    prompts = training.prompts(tok, examples)
    G = args.group_size
    rollouts = gsm8k_rollouts(model, tok, [p for p in prompts for _ in range(G)], "default", args.max_new_tokens,
                              args.temperature, seed, args.sample_batch_size)
    correct = [is_correct(r.text, examples[i // G]["answer"]) for i, r in enumerate(rollouts)]
    rows = []
    for j, p in enumerate(prompts):
        good = [rollouts[i] for i in range(j * G, (j + 1) * G) if correct[i]][:args.keep]
        rows += [(p, None, training.through_eos(r.tokens, tok.eos_ids)) for r in good]
    solved = sum(any(correct[j * G:(j + 1) * G]) for j in range(len(prompts)))
    return rows, {"prompts": len(prompts), "sampled": len(rollouts), "accepted": sum(correct), "kept": len(rows),
                  "solved": solved}


def gold_batch(args, pairs, shares):
    """A micro-batch per share of gold (prompt, answer) pairs: the states x + y*_<t are the answer's own prefixes
    (pad_rows' states None), and every answer token is a target."""
    return [training.pad_rows([(pairs[i][0], None, pairs[i][1]) for i in share], args.device) for share in shares if share]


def learner_batch(args, model, tok, examples, shares, step: int):
    """--states learner: a micro-batch per share of prompts, of the learner's own accepted completions (none when
    it solved nothing), and the step's sampling counts over all ranks."""
    micro, counts = [], dict.fromkeys(("prompts", "sampled", "accepted", "kept", "solved"), 0)
    for k, share in enumerate(shares):
        seed = distributed.seed(args.seed, "rollouts", step, k)
        rows, figures = accepted_samples(args, model, tok, [examples[i] for i in share], seed)
        counts = {key: counts[key] + figures[key] for key in counts}
        if rows:
            micro.append(training.pad_rows([(x, s, c[:max(1, args.max_len - len(x))]) for x, s, c in rows], args.device))
    return micro, dict(zip(counts, distributed.total(list(counts.values()))))


def main(argv=None):
    args = parse_args(argv)
    meta = {"method": "sft", "preset": args.preset, "states": args.states}
    model, tok, optimizer, resumed = training.setup(args, meta)
    params = lora.lora_parameters(model)
    examples = training.train_examples(args, meta, resumed)
    problems = training.validation_problems(args)
    if args.states == "learner":
        lengths = [len(p) for p in training.prompts(tok, examples)]
    else:
        pairs = training.gold_solutions(tok, examples, args.max_len)
        lengths = [len(p) + len(a) for p, a in pairs]
    epoch_batches = training.data_order(lengths, args.batch_size, args.seed)
    total = training.plan_steps(args, -(-len(examples) // args.batch_size))
    step, position = training.start(resumed, total)
    first, saved, bar = step, (step if resumed else None), training.progress(args, "sft", step, total)
    save = lambda snapshot=False: training.save(args, model, optimizer, meta, step, total, position, snapshot)  # noqa: E731
    with cli.stop_at_step_end():
        while step < total and not training.stopping(args, step, first, saved, save):
            started = time.perf_counter()
            # the step's states and signal: gold solutions, or the learner's own accepted samples
            shares = [distributed.share(training.next_batch(epoch_batches, position)) for _ in range(args.grad_accum)]
            record = {}
            if args.states == "learner":
                micro, counts = learner_batch(args, model, tok, examples, shares, step)
                record = {"kept": counts["kept"] / counts["sampled"], "accepted": counts["accepted"] / counts["sampled"],
                          "prompts_solved": counts["solved"] / counts["prompts"]}
            else:
                micro = gold_batch(args, pairs, shares)
            n_targets, tokens = distributed.total([sum(int(b[2].sum()) for b in micro), sum(int(b[1].sum()) for b in micro)])
            locality = training.wants_locality(args, step)
            # loss and backward, micro-batch by micro-batch (no accepted completion: no micro-batch, no update)
            model.train()
            sums = {}
            for batch in micro:
                with training.autocast(model):
                    loss, figures = sft_loss(model, batch, n_targets, locality)     # Eq. 5, / the step's targets
                if not training.add(sums, loss, figures):
                    break
                loss.backward()
            model.eval()
            stats = training.over_ranks(sums, params, optimizer, step, saved, args)
            grad_norm = training.clip_gradients(params, args.clip, optimizer, step, saved, args)
            lr = training.schedule(optimizer, step, total, args)         # warmup, then cosine decay
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record.update(training.validate(args, model, tok, problems, step, total))   # --eval-every
            training.log(args, bar, {"step": step, "loss": stats.pop("loss"), "lr": lr, "grad_norm": grad_norm,
                                     **stats, **record}, started, tokens)
            saved = training.checkpoint(args, step, total, save, saved)   # every --save-every, and --snapshots
    bar.close()
    training.finish(args, "sft", save, saved, step, total)
    return args


if __name__ == "__main__":
    training.run(main)
