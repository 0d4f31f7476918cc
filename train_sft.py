"""Supervised fine-tuning: dataset states, gold tokens (the paper's Eq. 5).

    python train_sft.py --preset mild   --data-dir ../shared/data --out ckpt/sft_mild.pt
    python train_sft.py --preset stress --data-dir ../shared/data --out ckpt/sft_stress.pt
    python train_sft.py --preset stress --data-dir ../shared/data --out ckpt/sft_stress.pt --resume   # after a stop

State source: the dataset. Every state s_t = (x, y*_<t) is a GSM8K train question in evaluate.py's prompt
format followed by a prefix of its gold solution; the signal is the gold next token:

    L(θ) = -Σ_t log π_θ(y*_t | x, y*_<t)                                             (Eq. 5)

averaged over all answer tokens of the optimizer step (every token weighs the same, and gradient
accumulation equals one large batch). Prompt tokens carry no loss and are not even sent through the lm_head.

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

import training
from model import FlagParser, number

PRESETS = {
    "mild": dict(epochs=1.0, lr=1e-4, lora_r=16, lora_alpha=32),
    "stress": dict(epochs=5.0, lr=5e-4, lora_r=64, lora_alpha=128),
}


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mild",
                   help="sets --epochs, --lr, --lora-r, --lora-alpha (those show default None: the preset's value)")
    p.add_argument("--max-len", type=number(int, 2), default=1024, help="tokens per example at most (prompt + answer + EOS)")
    training.add_common_args(p)
    # None = "take it from the preset"
    p.set_defaults(epochs=None, lr=None, lora_r=None, lora_alpha=None, batch_size=16)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = f"ckpt/sft_{args.preset}.pt"
    return args


def sft_loss(model, batch, normalizer: float, locality: bool):
    """Eq. 5 on one micro-batch: summed gold-token NLL / the step's answer-token count."""
    ids, attn, target, state = batch
    logp = training.token_logprobs(model, ids, attn, target)
    loss = -logp.sum() / normalizer                                                 # Eq. 5
    figures = training.state_locality(model, ids, attn, state, target_logprobs=logp) if locality else {}
    return loss, figures


def main(argv=None):
    args = parse_args(argv)
    run = training.setup(args, "sft", meta={"preset": args.preset})
    pairs = training.gold_solutions(run.tok, training.train_examples(run), args.max_len)
    lengths = [len(p) + len(a) for p, a in pairs]

    @functools.cache
    def epoch_batches(epoch):
        return training.length_grouped_batches(lengths, args.batch_size, seed=args.seed * 1000 + epoch)

    n_batches = -(-len(pairs) // args.batch_size)
    for _ in training.steps(run, training.plan_steps(args, n_batches)):
        # The states x + y*_<t are the answer's own prefixes (states None): every answer token is a target.
        micro = [training.pad_rows([(pairs[i][0], None, pairs[i][1]) for i in training.next_batch(run, epoch_batches)],
                                   args.device) for _ in range(args.grad_accum)]
        n_targets = sum(int(b[2].sum()) for b in micro)
        locality = training.wants_locality(run)
        stats = training.train_step(run, micro, lambda b: sft_loss(run.model, b, n_targets, locality))
        stats["tokens"] = sum(int(b[1].sum()) for b in micro)
        training.end_step(run, stats)
    training.finish(run)
    return run


if __name__ == "__main__":
    training.cli(main)
