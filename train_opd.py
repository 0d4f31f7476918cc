"""On-policy distillation: the learner's states, the teacher's signal (the paper's Eq. 7).

    python train_opd.py --teacher ckpt/sft_stress.pt                        # base model and data from the teacher
    python train_opd.py --teacher ckpt/sft_stress.pt --signal kl            # one-step exact KL (the paper's collapse)
    python train_opd.py --teacher ckpt/sft_stress.pt --signal sampled-kl    # the field's OPD: sampled KL as a reward
    python train_opd.py --teacher ckpt/sft_stress.pt --states teacher       # same signal, the teacher's states
    python train_opd.py --teacher ckpt/sft_stress.pt --states data          # same signal, the dataset's states
    python train_opd.py --teacher ckpt/sft_stress.pt --resume               # continue an interrupted run

A step has two halves, and they are two functions below:
1. State source (`collect_states`, --states): trajectories whose prefixes s_t = (x, y_<t) are the training
   states. `student` (default): the student samples rollouts of GSM8K train prompts (the current adapter,
   merged into the weights for speed). `teacher`: the teacher samples them (offline sequence-level
   distillation). `data`: the gold solutions (SFT's states).
2. Signal (--signal; a function that builds it and the loss it makes, in SIGNALS) at those states:
   - `continuation` (default, the paper's successful variant): at --cuts random cut points t of each
     trajectory the teacher writes --continuation-tokens tokens c from (x, y_<t) (greedy, or sampled at
     --teacher-temperature); the student learns them by cross-entropy on its own prefix:
         L(θ) = -Σ_cuts Σ_j log π_θ(c_j | x, y_<t, c_<j),   c ~ π_T(· | x, y_<t)             (Eq. 7)
   - `kl`: at every state of every trajectory, the exact one-step KL over the whole vocabulary,
         L(θ) = Σ_t KL(π_T(·|s_t) || π_θ(·|s_t))          (--kl reverse: KL(π_θ || π_T))
     The paper saw this variant collapse (GSM8K 0.040); it is computed exactly (no sampled estimate) so that
     such a result means the objective, not the estimator.
   - `sampled-kl` (OPD as tinker-cookbook runs it; TRL's MiniLLM at γ = 0, verl's and slime's OPD): no
     continuation and no sum over the vocabulary. The teacher scores the student's own sampled tokens, and the
     per-token sample of the reverse KL (both log-probs from one no-dropout forward each) is a negative advantage
     for GRPO's clipped policy-gradient loss (training.policy_gradient_loss; the ratio against the sampler's
     log-probs, one step per batch, no KL term):
         A_t = -Σ_{k≥t} γ^(k-t) (log π_S(y_k | s_k) - log π_T(y_k | s_k)),   y ~ π_S,  γ = --discount (0)
     Its expected gradient at γ = 0 is the exact gradient of Σ_t KL(π_S(·|s_t) || π_T(·|s_t)) (`kl --kl
     reverse`) at the sampled states; logged: reverse_kl_sampled (the per-token estimate, every step) and its
     mean over 32-token bins of response position (reverse_kl_by_position), and, as GRPO, the sampler-learner
     mismatch (sampling/importance_sampling_ratio/{min,mean,max}, kl_sample_train). Needs --states student; its
     adapter dropout defaults to 0, as GRPO's (the ratio is taken against the dropout-free sampler).
Losses are summed over supervised tokens (states, for kl) and divided by their count in the optimizer step.

Teacher and student are ONE base model with two LoRA adapters, "teacher" (frozen, from --teacher) and
"default" (the student: fresh, or --init); switching is a flag per layer, never a second copy of the base.
The loop is main()'s, its pieces (flags, checkpoints, --resume, logging) training.py's plain functions;
`python train_opd.py --teacher X.pt` needs nothing else, because --model and --data-dir default to what the
teacher's checkpoint records.

Logged per step (JSONL, training.py): loss; supervised tokens; response length; sample/learn seconds; tokens/s
(sampled plus trained tokens over the step's wall time). With state locality (every --locality-every steps):
state_nll_base (base-policy NLL of the state tokens y_<t), target_nll (the student's NLL of its targets, the
teacher's tokens, or for kl the expected NLL under π_T), and kl_forward = KL(π_T||π_S) and kl_reverse, exact,
averaged over the states the step supervised: the student's divergence from its teacher where it was trained,
before the update. The continuation loss needs neither the teacher's distribution nor the student's, so these
cost a no-grad forward of each there; the kl signal computes them anyway and logs them every step.

Defaults (ours; the paper gives no OPD hyperparameters): 8 prompts per step, 4 cuts x 32 greedy teacher tokens,
200 steps (1,600 of GSM8K's 7,473 train prompts), lr 1e-4, LoRA r 16 / alpha 32 (training.py's); `--max-steps 0
--epochs E` makes E passes over the prompts instead.

Honest simplifications:
- One rollout per prompt, sampled at --temperature 1 (the student's own distribution), from the policy as it
  is at the start of the step; all micro-batches of a step use those states (no off-policy correction needed:
  cross-entropy and KL are not importance-weighted objectives).
- Cut points are uniform over each trajectory's states (t = 0 is the bare prompt), without replacement.
- Rollouts end at EOS or lm-eval's GSM8K stop strings; the token that completes a stop string stays in the
  trajectory (the sampler did emit it). Nothing after the first EOS is ever a state.
- The teacher's continuations are not scored for correctness and not filtered. Greedy continuations distill the
  teacher's mode; --teacher-temperature 1 makes the cross-entropy an unbiased estimate of the forward KL's
  gradient on those states.
- Logits are computed in row chunks under activation checkpointing (training.token_logprobs; for the KLs,
  --logit-chunk states at a time), so the [states x vocabulary] matrices of the 152k vocabulary never exist
  all at once.
"""
import argparse
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import cli
import distributed
import lora
import training
from cli import NONNEGATIVE, PROBABILITY, SIZE, FlagParser, number
from evaluate import gsm8k_rollouts

DEFAULT_MODEL = "Qwen/Qwen3-0.6B-Base"


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="the teacher's LoRA checkpoint (.pt); its metadata names the base model and data")
    p.add_argument("--states", choices=["student", "teacher", "data"], default="student",
                   help="state source: the student's rollouts, the teacher's rollouts, or the gold solutions")
    p.add_argument("--signal", choices=["continuation", "kl", "sampled-kl"], default="continuation",
                   help="teacher continuations learned by cross-entropy (Eq. 7), exact per-state KL, or the "
                        "sampled reverse KL as a per-token advantage (policy gradient)")
    p.add_argument("--kl", choices=["forward", "reverse"], default="forward",
                   help="kl signal direction: forward KL(teacher||student) or reverse KL(student||teacher)")
    p.add_argument("--discount", type=PROBABILITY, default=0.0, help="sampled-kl: γ over future tokens' advantages")
    p.add_argument("--clip-eps", type=NONNEGATIVE, default=0.2, help="sampled-kl: ε of the clipped ratio (GRPO's)")
    p.add_argument("--cuts", type=SIZE, default=4, help="continuation: cut points per trajectory (random, seeded)")
    p.add_argument("--continuation-tokens", type=SIZE, default=32, help="continuation: teacher tokens per cut point")
    p.add_argument("--teacher-temperature", type=NONNEGATIVE, default=0.0,
                   help="continuation: teacher sampling temperature (0 = greedy)")
    p.add_argument("--temperature", type=NONNEGATIVE, default=1.0, help="rollout temperature (student or teacher states; 0 = greedy)")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="rollout length limit (evaluate.py's GSM8K limit)")
    p.add_argument("--max-len", type=number(int, 2), default=1024, help="--states data: tokens per gold example at most (as SFT)")
    p.add_argument("--sample-batch-size", type=SIZE, default=64, help="sequences per sampler batch")
    p.add_argument("--logit-chunk", type=SIZE, default=1024,
                   help="states per lm_head/softmax chunk in the loss (bounds memory)")
    training.add_common_args(p)
    # --model / --data-dir: None = the teacher's. 8 prompts x 4 cuts x 32 tokens per step, 200 steps (1,600 prompts).
    # --lora-dropout: None = 0.05, but 0 for sampled-kl, whose ratio is taken against the dropout-free sampler (as GRPO's)
    p.set_defaults(model=None, data_dir=None, batch_size=8, max_steps=200, lr=1e-4, lora_dropout=None)
    args = p.parse_args(argv)
    if args.lora_dropout is None:
        args.lora_dropout = 0.0 if args.signal == "sampled-kl" else 0.05
    if args.signal == "sampled-kl" and (args.states != "student" or args.temperature == 0):
        p.error("--signal sampled-kl is a policy gradient on the student's own samples: it needs --states student "
                "and --temperature > 0")
    if args.out is None:
        args.out = f"ckpt/opd_{args.signal}_{args.states}.pt"
    return args


# ----------------------------------------------------------------------------------------------
# State source: where the training states come from


@dataclass
class Trajectory:
    """A prompt x and a response y; its states are (x, y_<t) for t = 0 .. len(y) - 1."""
    prompt: list
    response: list
    logprobs: list | None = None     # the sampler's log-probs of y (None for the gold solutions)


def collect_states(args, model, tok, examples, seed: int) -> list:
    """--states: the student's rollouts, the teacher's rollouts, or the gold solutions of `examples`."""
    if args.states == "data":
        return [Trajectory(p, a) for p, a in training.gold_solutions(tok, examples, args.max_len)]  # SFT's states
    prompts = training.prompts(tok, examples)
    rollouts = gsm8k_rollouts(model, tok, prompts, "default" if args.states == "student" else "teacher",
                              args.max_new_tokens, args.temperature, seed, args.sample_batch_size)
    responses = [training.through_eos(r.tokens, tok.eos_ids) for r in rollouts]
    return [Trajectory(p, y, r.logprobs[:len(y)]) for p, y, r in zip(prompts, responses, rollouts)]


# ----------------------------------------------------------------------------------------------
# Signal: what the teacher supervises at those states, and the loss it makes (one pair of functions per --signal)


@dataclass
class Supervision:
    """A packed micro-batch: each row is prompt + state tokens + supervised tokens, right-padded.
    Masks are bool [B, T] over input positions (training.py's convention: token t predicted from t - 1)."""
    ids: torch.Tensor
    attn: torch.Tensor
    target: torch.Tensor   # supervised tokens: each is predicted from the state just before it
    state: torch.Tensor    # the state-source tokens of the supervised states (for state locality)
    sampled: int           # tokens the sampler produced for this micro-batch (rollouts + continuations)
    logprobs: torch.Tensor | None = None     # sampled-kl: the sampler's log π_S(y_t | s_t) at the targets, [B, T]
    reverse_kl: torch.Tensor | None = None   # sampled-kl: log π_S(y_t | s_t) - log π_T(y_t | s_t) there, [B, T]


def continuation_signal(args, model, tok, trajectories, seed: int, sampled: int) -> Supervision:
    """The paper's signal: at --cuts random cut points t of each trajectory the teacher writes
    --continuation-tokens tokens c from the state (x, y_<t); they are the targets, (x, y_<t) the states."""
    rng = random.Random(seed)
    cuts = [(tr, t) for tr in trajectories
            for t in sorted(rng.sample(range(len(tr.response)), min(args.cuts, len(tr.response))))]
    prefixes = [tr.prompt + tr.response[:t] for tr, t in cuts]
    continuations = gsm8k_rollouts(model, tok, prefixes, "teacher", args.continuation_tokens, args.teacher_temperature,
                                   distributed.seed(seed, "continuations"), args.sample_batch_size)
    rows = [(tr.prompt, tr.response[:t], training.through_eos(c.tokens, tok.eos_ids))
            for (tr, t), c in zip(cuts, continuations)]
    return Supervision(*training.pad_rows(rows, args.device), sampled + sum(len(c.tokens) for c in continuations))


def continuation_loss(args, model, sup: Supervision, normalizer: float, locality: bool):
    """Eq. 7: SFT's cross-entropy (Eq. 5) on the teacher's continuations, at the learner's states."""
    logp = training.token_logprobs(model, sup.ids, sup.attn, sup.target)
    loss = -logp.sum() / normalizer                                                             # Eq. 7
    if not locality:
        return loss, {}
    figures = logged_divergences(args, model, sup)
    figures.update(training.state_locality(model, sup.ids, sup.attn, sup.state, target_logprobs=logp))
    return loss, figures


def kl_signal(args, model, tok, trajectories, seed: int, sampled: int) -> Supervision:
    """Every state (x, y_<t) supervises the distribution of position t: the targets are all of y, and the states
    are their own prefixes (the last token of y ends the trajectory without forming a state)."""
    return Supervision(*training.pad_rows([(tr.prompt, None, tr.response) for tr in trajectories], args.device), sampled)


def kl_loss(args, model, sup: Supervision, normalizer: float, locality: bool):
    """Σ_t KL(π_T(·|s_t) || π_S(·|s_t)) (--kl reverse: KL(π_S || π_T)), exact over the vocabulary, / the states."""
    forward, reverse, cross = teacher_divergences(model, sup, args.logit_chunk).unbind(-1)
    loss = (forward if args.kl == "forward" else reverse).sum() / normalizer
    figures = {"kl_forward": training.total(forward), "kl_reverse": training.total(reverse)}
    if locality:   # the target is π_T: the student's expected NLL of the teacher's samples
        figures.update(training.state_locality(model, sup.ids, sup.attn, sup.state, target_logprobs=-cross))
    return loss, figures


def sampled_kl_signal(args, model, tok, trajectories, seed: int, sampled: int) -> Supervision:
    """Teacher and student score the student's sampled tokens by the same forward (the student without dropout), at
    the sampler's temperature: equal policies give exactly zero. The sampler's own log-probs (merged weights) are
    π_old of the ratio only."""
    ids, attn, target, state = training.pad_rows([(tr.prompt, None, tr.response) for tr in trajectories], args.device)
    logp = {}
    for policy in ("default", "teacher"):
        with torch.no_grad(), as_policy(model, policy), training.autocast(model):
            logp[policy] = training.token_logprobs(model, ids, attn, target, temperature=args.temperature).float()
    reverse_kl = torch.zeros(target.shape, device=target.device)
    reverse_kl[target] = logp["default"] - logp["teacher"]
    sampler = training.on_targets([tr.logprobs for tr in trajectories], target)
    return Supervision(ids, attn, target, state, sampled, sampler, reverse_kl)


def sampled_kl_loss(args, model, sup: Supervision, normalizer: float, locality: bool):
    """GRPO's clipped policy-gradient loss with the per-token advantage A_t = -Σ_{k≥t} γ^(k-t) (log π_S - log π_T)."""
    batch = [sup.ids, sup.attn, sup.target, sup.state, sup.logprobs,
             sampled_kl_advantage(sup.reverse_kl, args.discount), sup.target.float() / normalizer]
    loss, figures = training.policy_gradient_loss(model, batch, args.temperature, args.clip_eps, 0.0, locality)
    figures["reverse_kl_sampled"] = training.total(sup.reverse_kl[sup.target])
    if locality:
        figures.update(logged_divergences(args, model, sup))
    return loss, figures


SIGNALS = {"continuation": (continuation_signal, continuation_loss), "kl": (kl_signal, kl_loss),
           "sampled-kl": (sampled_kl_signal, sampled_kl_loss)}


@contextmanager
def as_policy(model, adapter: str):
    """Adapter `adapter`'s policy as it samples: that adapter active, no adapter dropout."""
    was_training = model.training
    model.eval()
    try:
        with lora.use_adapter(model, adapter):
            yield model
    finally:
        model.train(was_training)


def teacher_divergences(model, sup: Supervision, chunk: int):
    """Per supervised state [N, 3]: training.divergences() of the student as it is (training: differentiable, with
    its adapter dropout) and of the teacher."""
    h_student = training.scored_hidden(model, sup.ids, sup.attn, sup.target)
    with torch.no_grad(), as_policy(model, "teacher"):
        h_teacher = training.scored_hidden(model, sup.ids, sup.attn, sup.target)
    return training.divergences(h_student, h_teacher, model.lm_head, chunk)


def logged_divergences(args, model, sup: Supervision) -> dict:
    """kl_forward and kl_reverse, exact, at the supervised states, of the student without dropout (logging only)."""
    with torch.no_grad(), as_policy(model, "default"):
        forward, reverse, _ = teacher_divergences(model, sup, args.logit_chunk).unbind(-1)
    return {"kl_forward": training.total(forward), "kl_reverse": training.total(reverse)}


def sampled_kl_advantage(reverse_kl: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = -Σ_{k≥t} γ^(k-t) reverse_kl_k along each row of a [B, T] grid that is zero off the targets (only the
    targets' A_t are used)."""
    if discount == 0:
        return -reverse_kl
    k = torch.arange(reverse_kl.shape[1], device=reverse_kl.device)
    lag = k[:, None] - k[None, :]                                   # [k, t]: k - t
    gamma = torch.where(lag >= 0, discount ** lag.clamp(min=0).float(), 0.0)
    return -(reverse_kl @ gamma)


# ----------------------------------------------------------------------------------------------


def by_position(micro: list, width: int = 32) -> list:
    """The step's sampled reverse KL per token, averaged in bins of `width` response positions (0-31, 32-63, ..)."""
    sums, counts = defaultdict(float), defaultdict(int)
    for sup in micro:
        position = (sup.target.cumsum(1) - 1)[sup.target] // width
        for b, v in zip(position.tolist(), sup.reverse_kl[sup.target].tolist()):
            sums[b] += v
            counts[b] += 1
    return [round(sums[b] / counts[b], 5) if counts[b] else None for b in range(max(counts, default=-1) + 1)]


def load_teacher(args) -> dict:
    """Read the teacher's checkpoint and fill --model / --data-dir from its metadata when not given."""
    ckpt = lora.load_checkpoint(args.teacher)
    meta = ckpt["meta"]
    if args.model is None:
        args.model = meta.get("base_model") or DEFAULT_MODEL
    if args.data_dir is None:
        args.data_dir = meta.get("data_dir")
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    teacher = load_teacher(args)
    meta = {"method": "opd", "teacher": args.teacher, "teacher_method": teacher["meta"].get("method"),
            "signal": args.signal, "states": args.states}
    model, tok, optimizer, resumed = training.setup(args, meta)
    lora.load_adapter(model, teacher, name="teacher")
    params = lora.lora_parameters(model)
    signal, opd_loss = SIGNALS[args.signal]
    examples = training.train_examples(args, meta, resumed)
    problems = training.validation_problems(args)
    epoch_batches = training.data_order([len(p) for p in training.prompts(tok, examples)], args.batch_size, args.seed)
    total = training.plan_steps(args, -(-len(examples) // args.batch_size))
    step, position = training.start(resumed, total)
    first, saved, bar = step, (step if resumed else None), training.progress(args, "opd", step, total)
    save = lambda snapshot=False: training.save(args, model, optimizer, meta, step, total, position, snapshot)  # noqa: E731
    with cli.stop_at_step_end():
        while step < total and not training.stopping(args, step, first, saved, save):
            started = time.perf_counter()
            micro, responses = [], []
            for k in range(args.grad_accum):
                batch = [examples[i] for i in distributed.share(training.next_batch(epoch_batches, position))]
                if not batch:      # under torchrun, a micro-batch smaller than the number of ranks
                    continue
                seed = distributed.seed(args.seed, "opd", step, k)
                trajectories = collect_states(args, model, tok, batch, seed)          # the state source
                responses += [len(tr.response) for tr in trajectories]
                sampled = 0 if args.states == "data" else sum(len(tr.response) for tr in trajectories)
                micro.append(signal(args, model, tok, trajectories, seed, sampled))  # the teacher's signal there
            sampled_s = time.perf_counter()
            supervised, response_tokens, n_responses, tokens = distributed.total(
                [sum(int(s.target.sum()) for s in micro), sum(responses), len(responses),
                 sum(s.sampled + int(s.attn.sum()) for s in micro)])          # the step's, over all ranks
            normalizer = max(1, supervised)
            locality = training.wants_locality(args, step)
            model.train()
            sums = {}
            for sup in micro:
                with training.autocast(model):
                    loss, figures = opd_loss(args, model, sup, normalizer, locality)
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
            record = {"step": step, "loss": stats.pop("loss"), "lr": lr, "grad_norm": grad_norm, **stats,
                      "supervised_tokens": normalizer, "response_len": response_tokens / n_responses,
                      "sample_s": sampled_s - started, "learn_s": time.perf_counter() - sampled_s}
            if args.signal == "sampled-kl":
                record["reverse_kl_by_position"] = by_position(micro)   # this rank's (rank 0 logs)
            record.update(training.validate(args, model, tok, problems, step, total))   # --eval-every
            training.log(args, bar, record, started, tokens)
            saved = training.checkpoint(args, step, total, save, saved)   # every --save-every, and --snapshots
    bar.close()
    training.finish(args, "opd", save, saved, step, total)
    return args


if __name__ == "__main__":
    training.run(main)
