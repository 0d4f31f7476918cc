"""GRPO: learner states, exact-answer reward (the paper's Eq. 6).

    python train_grpo.py --data-dir ../shared/data --out ckpt/grpo.pt
    python train_grpo.py --data-dir ../shared/data --init ckpt/sft_mild.pt --out ckpt/grpo_after_sft.pt

State source: the learner itself. Each optimizer step draws batch-size x grad-accum GSM8K train questions
(evaluate.py's prompt), samples G completions of each from the current policy (adapter merged into the
weights, the KV-cache sampler, temperature T, stop at EOS or "Question:" as evaluate.py does), and the signal
on those states is a scalar reward, 1 when evaluate.is_correct accepts the completion and 0 otherwise:

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)              group-relative advantage
    ρ_t = π_θ(y_t | s_t) / π_old(y_t | s_t)                           both at logits / T; π_old = the sampler's log-probs
    L(θ) = agg_t[ -min(ρ_t A_i, clip(ρ_t, 1 - ε, 1 + ε) A_i) + β k3_t ]   (Eq. 6)
    k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1,  π_ref = the base policy (adapter off; no second model)

Honest simplifications (read them before comparing numbers with other GRPO runs):
1. One optimizer step per batch of rollouts by default (--mu 1, fully on-policy, as TRL's default): then
   ρ = 1 up to numerics (the sampler runs merged bf16 weights, the learner unmerged ones under autocast) and
   the clip only guards that mismatch, which is logged before each batch's first update as TRL and tinker name it
   (sampling/importance_sampling_ratio/{min,mean,max}, kl_sample_train). --mu k takes k steps on each batch, where
   the clip does real work; a stop (Ctrl-C, --stop-after) then waits for the end of the cycle.
2. The KL reference is the base policy, not a frozen copy of the starting policy; with --init they differ.
   β defaults to 0 (as DAPO and Dr. GRPO): the paper's comparison is about states, and a KL term would
   pull the learner's states back toward the base on purpose.
3. Groups whose rewards are all equal have zero advantage: they are counted (zero_signal_groups) and, with
   β = 0, skipped in the learner pass (their gradient is exactly zero), but they stay in the loss
   normalizer; there is no DAPO-style resampling to refill the batch.
4. Completions cut by --max-new-tokens keep their reward (usually 0) with no overlong shaping; no entropy
   bonus; no top-p/top-k (the recorded log-probs would no longer be the sampling distribution's).
"""
import time

import torch

import cli
import distributed
import lora
import training
from evaluate import gsm8k_rollouts, is_correct
from cli import NONNEGATIVE, RATE, SIZE, FlagParser, number


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--group-size", type=number(int, 2), default=8, help="G: completions sampled per prompt")
    p.add_argument("--temperature", type=RATE, default=1.0, help="sampling temperature T > 0 (also divides the learner's logits)")
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
                   help="divide advantages by the group's reward std, the batch's, or nothing")
    p.add_argument("--no-std-scale", dest="scale_rewards", action="store_const", const="none",
                   help="same as --scale-rewards none (Dr. GRPO)")
    p.add_argument("--sample-batch-size", type=SIZE, default=256, help="sequences per sampler batch")
    training.add_common_args(p)
    # Chosen defaults (the paper gives none): 16 prompts x 8 samples = 128 rollouts per step, 200 steps;
    # a LoRA learning rate about ten times a full fine-tuning RL rate; no adapter dropout, so the learner
    # scores tokens with the same function that sampled them.
    p.set_defaults(lr=5e-5, batch_size=4, grad_accum=4, max_steps=200, lora_dropout=0.0, warmup=0.0)
    args = p.parse_args(argv)
    if args.mu > 1 and (args.save_every % args.mu or args.stop_after % args.mu):
        p.error("--save-every and --stop-after must be multiples of --mu (checkpoints fall between batches)")
    if args.out is None:
        args.out = "ckpt/grpo.pt"
    return args


def exact_answer_reward(rollout, example) -> float:
    """The paper's reward: 1 when the extracted answer equals the gold number (evaluate.py's check)."""
    return float(is_correct(rollout.text, example["answer"]))


def advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """r - mean(group), divided by the group's (or the batch's) std unless scale == "none"."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "group":
        a = a / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        a = a / (rewards.std() + 1e-4)
    return a.flatten()


def collate(rollouts, adv, weights, eos_ids, device):
    """A micro-batch of prompt + completion rows (training.pad_rows: the completion tokens up to the first EOS are
    the targets, their own prefixes the states), with the sampler's log-probs, the advantages and the per-token
    loss weights laid out on the same [B, T] grid (training.policy_gradient_loss's batch)."""
    completions = [training.through_eos(r.tokens, eos_ids) for r in rollouts]
    ids, attn, target, state = training.pad_rows([(r.prompt_ids, None, c) for r, c in zip(rollouts, completions)],
                                                 device)
    grids = [training.on_targets(v, target) for v in ([r.logprobs for r in rollouts], adv.tolist() if
                                                      torch.is_tensor(adv) else adv, weights)]
    return [ids, attn, target, state, *grids]


def token_weights(lengths, agg: str, max_new_tokens: int, n_total: int, tokens: int | None = None):
    """Per-token loss weight of each completion so that the step's loss is the chosen aggregate; n_total and
    tokens: the step's completions and completion tokens (over all ranks; tokens defaults to sum(lengths))."""
    if agg == "token-mean":
        total = sum(lengths) if tokens is None else tokens
        return [1.0 / max(total, 1)] * len(lengths)
    if agg == "seq-mean":
        return [1.0 / (max(n, 1) * n_total) for n in lengths]
    return [1.0 / (n_total * max_new_tokens)] * len(lengths)


def learner_batches(rollouts, group, args, eos, reward_fn):
    """The step's micro-batches for the learner pass, and the figures of its rollouts. `group` holds this rank's
    prompts (all of the step's in one process) and `rollouts` their G samples each; the rewards of every rank
    are gathered, so advantages, normalizers and figures are those of the whole step."""
    G = args.group_size
    rewards = torch.tensor([reward_fn(r, group[i // G]) for i, r in enumerate(rollouts)], dtype=torch.float32)
    grouped = torch.tensor(distributed.gather(rewards.view(-1, G).tolist()), dtype=torch.float32).view(-1, G)
    mine = grouped[distributed.rank()::distributed.world()]               # this rank's prompts, in its order
    adv = advantages(grouped.flatten(), G, args.scale_rewards).view(-1, G)[distributed.rank()::distributed.world()].flatten()
    lengths = [len(training.through_eos(r.tokens, eos)) for r in rollouts]
    correct = sum(is_correct(r.text, group[i // G]["answer"]) for i, r in enumerate(rollouts))
    n_total, tokens, correct, truncated = distributed.total(
        [len(rollouts), sum(lengths), correct, sum(r.finish == "length" for r in rollouts)])
    weights = token_weights(lengths, args.loss_agg, args.max_new_tokens, int(n_total), int(tokens))
    zero_signal = (grouped == grouped[:, :1]).all(1)
    # Zero-advantage completions contribute exactly zero gradient unless the KL term acts on them.
    flat = (mine == mine[:, :1]).all(1)
    keep = [i for i in range(len(rollouts)) if args.beta > 0 or not flat[i // G]]
    keep.sort(key=lambda i: lengths[i])  # similar lengths per micro-batch: less padding
    size = -(-len(keep) // args.grad_accum) if keep else 1
    batch = [collate([rollouts[i] for i in part], adv[part], [weights[i] for i in part], eos, args.device)
             for part in (keep[j:j + size] for j in range(0, len(keep), size))]
    stats = {"reward": grouped.mean().item(), "accuracy": correct / n_total,
             "zero_signal_groups": int(zero_signal.sum()), "groups": len(grouped),
             "completion_len": tokens / n_total, "truncated": truncated / n_total, "tokens": tokens}
    return batch, stats


def sample(model, tok, examples, args, seed):
    """G rollouts per example from the current policy (its adapter merged into the weights)."""
    prompts = training.prompts(tok, examples)
    return gsm8k_rollouts(model, tok, [p for p in prompts for _ in range(args.group_size)], "default",
                          args.max_new_tokens, args.temperature, seed, args.sample_batch_size)


def main(argv=None, reward_fn=exact_answer_reward):
    args = parse_args(argv)
    meta = {"method": "grpo"}
    model, tok, optimizer, resumed = training.setup(args, meta)
    params = lora.lora_parameters(model)
    examples = training.train_examples(args, meta, resumed)
    problems = training.validation_problems(args)
    eos = set(tok.eos_ids)

    epoch_batches = training.data_order([len(p) for p in training.prompts(tok, examples)], args.batch_size, args.seed)
    n_batches = -(-len(examples) // args.batch_size)
    total = args.max_steps or training.plan_steps(args, n_batches) * args.mu
    step, position = training.start(resumed, total)
    first, saved, bar = step, (step if resumed else None), training.progress(args, "grpo", step, total)
    save = lambda snapshot=False: training.save(args, model, optimizer, meta, step, total, position, snapshot)  # noqa: E731
    micro = None
    with cli.stop_at_step_end():
        # a stop (Ctrl-C, --stop-after) waits for the end of a cycle of --mu steps: a checkpoint holds no rollouts
        while step < total and (step % args.mu or not training.stopping(args, step, first, saved, save)):
            started = time.perf_counter()
            if micro is None or step % args.mu == 0:  # the states: a fresh batch of rollouts from the current policy
                # this rank's share of the step's prompts (all grad-accum batches), so every world size works
                step_batch = [i for _ in range(args.grad_accum) for i in training.next_batch(epoch_batches, position)]
                group = [examples[i] for i in distributed.share(step_batch)]
                rollouts = sample(model, tok, group, args, seed=distributed.seed(args.seed, "rollouts", step))
                micro, rollout_stats = learner_batches(rollouts, group, args, eos, reward_fn)   # the signal: rewards
            sampled = time.perf_counter()
            locality = training.wants_locality(args, step)
            model.train()
            sums = {}
            for batch in micro:
                with training.autocast(model):
                    loss, figures = training.policy_gradient_loss(model, batch, args.temperature, args.clip_eps,
                                                                  args.beta, locality, step % args.mu == 0)  # Eq. 6
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
            stats = {"loss": stats.pop("loss"), "lr": lr, "grad_norm": grad_norm, **stats, **rollout_stats,
                     "sample_s": sampled - started, "learn_s": time.perf_counter() - sampled}
            stats.update(training.validate(args, model, tok, problems, step, total))   # --eval-every
            tokens = stats.pop("tokens")
            training.log(args, bar, {"step": step, **stats}, started, tokens)
            saved = training.checkpoint(args, step, total, save, saved)   # every --save-every, and --snapshots
    bar.close()
    training.finish(args, "grpo", save, saved, step, total)
    return args


if __name__ == "__main__":
    training.run(main)
