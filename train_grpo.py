"""GRPO: learner states, exact-answer reward (the paper's Eq. 6).

    python train_grpo.py --data-dir ../shared/data --out ckpt/grpo.pt
    python train_grpo.py --data-dir ../shared/data --init ckpt/sft_mild.pt --out ckpt/grpo_after_sft.pt

State source: the learner itself. Each optimizer step draws batch-size x grad-accum GSM8K train questions
(evaluate.py's prompt), samples G completions of each from the current policy (adapter merged into the
weights, the KV-cache sampler, temperature T, stop at EOS or "Question:" as evaluate.py does), and the signal
on those states is a scalar reward, 1 when evaluate.is_correct accepts the completion and 0 otherwise:

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)              group-relative advantage
    ρ_t = π_θ(y_t | s_t) / π_old(y_t | s_t)               both at logits / T; π_old = the sampler's log-probs
    L(θ) = agg_t[ -min(ρ_t A_i, clip(ρ_t, 1 - ε, 1 + ε) A_i) + β k3_t ]   (Eq. 6)
    k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1,  π_ref = the base policy (adapter off; no second model)

`advantages` and `clipped_loss` below are the equation; main() is the loop, step by step. OPD's sampled-KL
signal (train_opd.py) reuses clipped_loss with a per-token advantage.

Honest simplifications (read them before comparing numbers with other GRPO runs):
1. One optimizer step per batch of rollouts by default (--mu 1, fully on-policy, as TRL's default): then
   ρ = 1 up to numerics (the sampler runs merged bf16 weights, the learner unmerged ones under autocast) and
   the clip only guards that mismatch, which is logged before each batch's first update as TRL and tinker name it
   (sampling/importance_sampling_ratio/{min,mean,max}, kl_sample_train). --mu k takes k steps on each batch, where
   the clip does real work; a stop (Ctrl-C, --stop-after) then waits for the end of the cycle.
2. The KL reference is the base policy, not a frozen copy of the starting policy; with --init they differ.
   β defaults to 0 (as DAPO and Dr. GRPO): the paper's comparison is about states, and a KL term would
   pull the learner's states back toward the base on purpose.
3. Groups whose rewards are all equal have zero advantage: they are counted (zero_signal_frac) and, with
   β = 0, skipped in the learner pass (their gradient is exactly zero), but they stay in the loss
   normalizer; there is no DAPO-style resampling to refill the batch.
4. Completions cut by --max-new-tokens keep their reward (usually 0) with no overlong shaping; no entropy
   bonus; no top-p/top-k (the recorded log-probs would no longer be the sampling distribution's).
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch

import distributed
import training
from cli import NONNEGATIVE, RATE, SIZE, TWO_OR_MORE
from evaluate import gsm8k_rollouts, is_correct


def parse_args(argv=None):
    p = training.parser(__doc__)
    p.add_argument("--group-size", type=TWO_OR_MORE, default=8, help="G: completions sampled per prompt")
    p.add_argument("--temperature", type=RATE, default=1.0,
                   help="sampling temperature T > 0 (also divides the learner's logits)")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="completion tokens at most (evaluate.py's limit)")
    p.add_argument("--clip-eps", type=NONNEGATIVE, default=0.2, help="ε of the clipped ratio")
    p.add_argument("--beta", type=NONNEGATIVE, default=0.0, help="weight of the k3 KL to the base policy (0 = none)")
    p.add_argument("--mu", type=SIZE, default=1, help="optimizer steps on each batch of rollouts")
    # token-mean (DAPO) by default: every completion token weighs the same, so a long wrong answer is not
    # penalized less per token than a short one (seq-mean's length bias, the point of Dr. GRPO), and unlike
    # `constant` its scale does not depend on --max-new-tokens.
    p.add_argument("--loss-agg", choices=["token-mean", "seq-mean", "constant"], default="token-mean",
                   help="token-mean: over all completion tokens of the step (DAPO); seq-mean: per completion, then "
                        "over completions (GRPO); constant: token sum / (completions x max-new-tokens) (Dr. GRPO)")
    p.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group",
                   help="divide advantages by the group's reward std, the batch's, or nothing "
                        "(--no-std-scale is --scale-rewards none, Dr. GRPO's name)")
    p.add_argument("--no-std-scale", dest="scale_rewards", action="store_const", const="none", help=argparse.SUPPRESS)
    p.add_argument("--sample-batch-size", type=SIZE, default=256, help="sequences per sampler batch")
    # Chosen defaults (the paper gives none): 16 prompts x 8 samples = 128 rollouts per step, 200 steps;
    # a LoRA learning rate about ten times a full fine-tuning RL rate; no adapter dropout, so the learner
    # scores tokens with the same function that sampled them.
    p.set_defaults(lr=5e-5, batch_size=4, grad_accum=4, max_steps=200, lora_dropout=0.0, warmup=0.0)
    args = p.parse_args(argv)
    if args.mu > 1 and (args.save_every % args.mu or args.stop_after % args.mu):
        p.error("--save-every and --stop-after must be multiples of --mu (checkpoints fall between batches)")
    return args


# ----------------------------------------------------------------------------------------------
# The signal and Eq. 6


def exact_answer_reward(rollout, example) -> float:
    """The paper's reward: 1 when the extracted answer equals the gold number (evaluate.py's check)."""
    return float(is_correct(rollout.text, example["answer"]))


def advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group's (or the batch's) std unless scale == "none"."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "group":
        a = a / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        a = a / (rewards.std() + 1e-4)
    return a.flatten()


def clipped_loss(new, old, adv, weights, clip_eps: float, beta: float = 0.0, ref=None):
    """Eq. 6 over a micro-batch's tokens (1-D tensors in the same order), already weighted for the step's aggregate:

        ρ_t = exp(new_t - old_t),   L = Σ_t w_t [ -min(ρ_t A_t, clip(ρ_t, 1 - ε, 1 + ε) A_t) + β k3_t ]

    new: the learner's log-probs (differentiable); old: the sampler's; ref: the reference policy's, for β > 0."""
    ratio = torch.exp(new - old)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta > 0:
        per_token = per_token + beta * k3(new, ref)
    return (per_token * weights).sum()


def k3(new, ref):
    """k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1 per token: an unbiased, always >= 0 estimator of KL(π_θ || π_ref) on
    π_θ's samples (new, ref: the two policies' log-probs of them)."""
    return torch.exp(ref - new) - (ref - new) - 1


def ratio_figures(figures: dict, new, old, adv, clip_eps: float, first: bool):
    """Add to the step's figures the tokens the clip stopped (clip_frac) and, before any update on these rollouts
    (first), how far the sampler (merged weights) and the learner disagree, as TRL and tinker name it."""
    ratio = torch.exp(new - old).detach()
    clip = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    figures.setdefault("clip_frac", []).append(clip.float())
    if first:
        figures.setdefault("sampling/importance_sampling_ratio", []).append(ratio)
        figures.setdefault("kl_sample_train", []).append((old - new).detach())


def token_weights(lengths, agg: str, max_new_tokens: int, n_total: int, tokens: int):
    """Per-token loss weight of each completion so that the step's loss is the chosen aggregate; n_total and
    tokens: the step's completions and completion tokens (over all ranks)."""
    if agg == "token-mean":
        return [1.0 / max(tokens, 1)] * len(lengths)
    if agg == "seq-mean":
        return [1.0 / (max(n, 1) * n_total) for n in lengths]
    return [1.0 / (n_total * max_new_tokens)] * len(lengths)


@dataclass
class Micro:
    """A learner micro-batch: its rows (prompt + completion; the completion tokens are the targets, their own
    prefixes the states) and, per target token, the sampler's log-prob, the advantage and the loss weight."""
    rows: training.Rows
    old: torch.Tensor
    adv: torch.Tensor
    weights: torch.Tensor


def learner_batches(args, rollouts, group, reward_fn):
    """The step's micro-batches for the learner pass, the figures of its rollouts, and its groups and completion
    tokens (over all ranks). `group`
    holds this rank's prompts (all of the step's in one process) and `rollouts` their G samples each; the rewards of
    every rank are gathered, so advantages, normalizers and figures are those of the whole step."""
    G = args.group_size
    rewards = torch.tensor([reward_fn(r, group[i // G]) for i, r in enumerate(rollouts)], dtype=torch.float32)
    grouped = torch.tensor(distributed.gather(rewards.view(-1, G).tolist()), dtype=torch.float32).view(-1, G)
    mine = slice(distributed.rank(), None, distributed.world())                  # this rank's prompts, in its order
    adv = advantages(grouped.flatten(), G, args.scale_rewards).view(-1, G)[mine].flatten()
    lengths = [len(r.tokens) for r in rollouts]
    n_total, tokens = distributed.total([len(rollouts), sum(lengths)])
    weights = torch.tensor(token_weights(lengths, args.loss_agg, args.max_new_tokens, int(n_total), int(tokens)))
    # Zero-advantage completions contribute exactly zero gradient unless the KL term acts on them.
    flat = (grouped[mine] == grouped[mine][:, :1]).all(1)
    keep = sorted((i for i in range(len(rollouts)) if args.beta > 0 or not flat[i // G]), key=lambda i: lengths[i])
    size = -(-len(keep) // args.grad_accum) if keep else 1   # similar lengths per micro-batch: less padding
    micro = []
    for part in (keep[j:j + size] for j in range(0, len(keep), size)):
        counts = torch.tensor([lengths[i] for i in part])   # a completion's advantage and weight, on each token
        micro.append(Micro(training.pad_rows([(rollouts[i].prompt_ids, None, rollouts[i].tokens) for i in part],
                                             args.device),
                           torch.tensor([lp for i in part for lp in rollouts[i].logprobs]).to(args.device),
                           adv[part].repeat_interleave(counts).to(args.device),
                           weights[part].repeat_interleave(counts).to(args.device)))
    figures = {"reward": [rewards], "accuracy": [torch.tensor([exact_answer_reward(r, group[i // G])
                                                               for i, r in enumerate(rollouts)])],
               "completion_len": [torch.tensor(lengths, dtype=torch.float32)],
               "truncated": [torch.tensor([r.finish == "length" for r in rollouts], dtype=torch.float32)],
               "zero_signal_frac": [flat.float()]}
    return micro, figures, int(n_total) // G, tokens


def main(argv=None, reward_fn=exact_answer_reward):
    args = parse_args(argv)
    run = training.Run(args, {"method": "grpo"})
    model, tok, optimizer = run.model, run.tok, run.optimizer
    with run.start([len(p) for p in run.prompts], steps_per_batch=args.mu):   # Ctrl-C, SIGTERM: end the step
        # a stop (Ctrl-C, --stop-after) waits for the end of a cycle of --mu steps: a checkpoint holds no rollouts
        while run.going(cycle=args.mu):
            first = run.step % args.mu == 0
            if first:   # the states: a fresh batch of rollouts from the current policy, G per prompt
                batch = run.next_batch(args.grad_accum)   # this rank's share of the step's prompts
                prompts = [run.prompts[i] for i in batch for _ in range(args.group_size)]
                rollouts = gsm8k_rollouts(model, tok, prompts, "default", args.max_new_tokens, args.temperature,
                                          distributed.seed(args.seed, "rollouts", run.step), args.sample_batch_size)
                # the signal: rewards, group-relative advantages
                micro, rollout_figures, groups, tokens = learner_batches(args, rollouts,
                                                                         [run.examples[i] for i in batch], reward_fn)
            sampled = time.perf_counter()
            locality = run.locality([m.rows for m in micro])   # {} but every --locality-every steps
            figures = {**rollout_figures, **locality}
            model.train()
            loss_sum = 0.0
            for m in micro:
                new = training.token_logprobs(model, m.rows.ids, m.rows.attn, m.rows.target, args.temperature)
                ref = None
                if args.beta > 0 or locality:   # kl: k3 to the base, in the loss (β > 0) or logged beside it
                    with torch.no_grad():   # π_ref: the base policy, the same weights with the adapter off
                        ref = training.token_logprobs(model, m.rows.ids, m.rows.attn, m.rows.target, args.temperature,
                                                      policy=None)
                    figures.setdefault("kl", []).append(k3(new.detach(), ref))
                loss = clipped_loss(new, m.old, m.adv, m.weights, args.clip_eps, args.beta, ref)        # Eq. 6
                loss.backward()
                loss_sum += loss.item()
                ratio_figures(figures, new, m.old, m.adv, args.clip_eps, first)
            model.eval()
            stats = run.all_reduce(loss_sum, figures, extremes=("sampling/importance_sampling_ratio",))
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip or math.inf).item()
            lr = training.lr_at(run.step, run.total, args.lr, args.warmup)     # warmup, then cosine decay
            optimizer.param_groups[0]["lr"] = lr                               # one group: the adapter
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.log({**stats, "lr": lr, "grad_norm": grad_norm, "groups": groups, "sample_s": sampled - run.started,
                     "learn_s": time.perf_counter() - sampled}, tokens)
            run.save()                                                         # every --save-every, and --snapshots
    return args


if __name__ == "__main__":
    training.run(main)
