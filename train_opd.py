"""On-policy distillation: the learner's states, the teacher's signal (the paper's Eq. 7).

    python train_opd.py --teacher ckpt/sft_stress.pt                        # base model and data from the teacher
    python train_opd.py --teacher ckpt/sft_stress.pt --signal kl            # one-step exact KL (the paper's collapse)
    python train_opd.py --teacher ckpt/sft_stress.pt --signal sampled-kl    # the field's OPD: sampled KL as a reward
    python train_opd.py --teacher ckpt/sft_stress.pt --states teacher       # same signal, the teacher's states
    python train_opd.py --teacher ckpt/sft_stress.pt --states data          # same signal, the dataset's states
    python train_opd.py --teacher ckpt/sft_stress.pt --resume               # continue an interrupted run

A step has two halves, and they are functions below; then its loss, where each signal's equation is written:
1. State source (`collect_states`, --states): trajectories whose prefixes s_t = (x, y_<t) are the training
   states. `student` (default): the student samples rollouts of GSM8K train prompts (the current adapter,
   merged into the weights for speed). `teacher`: the teacher samples them (offline sequence-level
   distillation). `data`: the gold solutions (SFT's states).
2. Signal (--signal; a function that builds it at those states, in SIGNALS, and a loss):
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
     for GRPO's clipped policy-gradient loss (train_grpo.clipped_loss, Eq. 6; the ratio against the sampler's
     log-probs, one step per batch, no KL term):
         A_t = -Σ_{k≥t} γ^(k-t) (log π_S(y_k | s_k) - log π_T(y_k | s_k)),   y ~ π_S,  γ = --discount (0)
     Its expected gradient at γ = 0 is the exact gradient of Σ_t KL(π_S(·|s_t) || π_T(·|s_t)) (`kl --kl
     reverse`) at the sampled states; logged: reverse_kl_sampled (the per-token estimate, every step) and its
     mean over 32-token bins of response position (reverse_kl_by_position), and, as GRPO, the sampler-learner
     mismatch (sampling/importance_sampling_ratio/{min,mean,max}, kl_sample_train). Needs --states student; its
     adapter dropout defaults to 0, as GRPO's (the ratio is taken against the dropout-free sampler).
Losses are summed over supervised tokens (states, for kl) and divided by their count in the optimizer step.

The teacher (--teacher, training.Run loads it; a training.Policy) is either of two things:
- an adapter checkpoint of the student's base (the paper's: a stress-SFT run). Teacher and student are then ONE base
  model with two LoRA adapters, "teacher" (frozen, no dropout) and "default" (the student: fresh, or --init);
  switching is a flag per layer, never a second copy of the base. `python train_opd.py --teacher X.pt` needs
  nothing else: --model and --data-dir default to what the checkpoint records.
- a model of its own, as the field distils (a larger Qwen3 into a smaller one): `--model S --teacher T`, with T in
  any form --model takes. It must share S's tokenizer (the same token at every id, the same ids for the train
  text), else one line stops the run before anything is written; cross-tokenizer distillation (GOLD) is not
  supported. It is frozen, in the student's --dtype, and keeps its own output layer. Both output layers are cut to
  the ids the tokenizer defines (Qwen3 pads its embedding past them), so the signals run over the ids both define
  and padded rows never get probability (the adapter is trained under the cut head and exported for the whole one,
  which no adapter changes). Its continuations stop at either model's EOS; the student's rollouts at the student's.
  A LoRA run on another base is first exported (`python lora.py export --merged DIR`).
The checkpoint records the teacher (kind, path or hub id, sha256 or revision); --resume refuses another.

Logged per step (JSONL, training.py): loss; supervised tokens; response length; sample/learn seconds; tokens/s
(sampled plus trained tokens over the step's wall time). With state locality (every --locality-every steps):
state_nll_base (base-policy NLL of the state tokens y_<t), target_nll (the student's NLL of its target tokens:
the teacher's, or for kl and sampled-kl its own), and kl_forward = KL(π_T||π_S) and kl_reverse, exact, averaged
over the states the step supervised: the student's divergence from its teacher where it was trained, before the
update, at the cost of a no-grad forward of each.

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
  `one_step_kl`, --logit-chunk states at a time), so the [states x vocabulary] matrices of the 152k vocabulary never
  exist all at once.
"""
import argparse
import math
import random
import time
from dataclasses import dataclass

import torch

import distributed
import training
from cli import NONNEGATIVE, PROBABILITY, SIZE, TWO_OR_MORE
from evaluate import gsm8k_rollouts
from train_grpo import clipped_loss, ratio_figures


def parse_args(argv=None):
    p = training.parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--teacher", required=True,
                   help="an adapter checkpoint (.pt) of the student's base (its metadata names the base and data), "
                        "or a model (HF directory, hub id, tiny) with the student's tokenizer (then --model is needed)")
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
    p.add_argument("--temperature", type=NONNEGATIVE, default=1.0,
                   help="rollout temperature (student or teacher states; 0 = greedy)")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="rollout length limit (evaluate.py's GSM8K limit)")
    p.add_argument("--max-len", type=TWO_OR_MORE, default=1024,
                   help="--states data: tokens per gold example at most (as SFT)")
    p.add_argument("--sample-batch-size", type=SIZE, default=64, help="sequences per sampler batch")
    p.add_argument("--logit-chunk", type=SIZE, default=1024,
                   help="states per lm_head/softmax chunk in the KLs (bounds memory)")
    # --model / --data-dir: None = the teacher's. 8 prompts x 4 cuts x 32 tokens per step, 200 steps (1,600 prompts).
    # --lora-dropout: None = 0.05, but 0 for sampled-kl, whose ratio is taken against the dropout-free sampler (as
    # GRPO's)
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


def collect_states(args, model, tok, teacher, prompts: list, gold: list | None, seed: int) -> list:
    """--states: the student's rollouts of `prompts` (they stop at its EOS), the teacher's, or the `gold` solutions."""
    if args.states == "data":
        return [Trajectory(x, y) for x, y in gold]                                           # SFT's states
    sampler, tok, policy = (model, tok, "default") if args.states == "student" else teacher
    rollouts = gsm8k_rollouts(sampler, tok, prompts, policy, args.max_new_tokens, args.temperature, seed,
                              args.sample_batch_size)
    return [Trajectory(x, r.tokens, r.logprobs) for x, r in zip(prompts, rollouts)]


# ----------------------------------------------------------------------------------------------
# Signal: what the teacher supervises at those states (one function per --signal), and the losses they make


@dataclass
class Supervision:
    """A micro-batch of rows prompt + state tokens + supervised tokens (training.pad_rows: the masks `target`, the
    supervised tokens, each predicted from the state just before it, and `state`, the state-source tokens)."""
    rows: training.Rows
    logprobs: torch.Tensor | None = None     # sampled-kl: the sampler's log π_S(y_t | s_t), per target
    reverse_kl: torch.Tensor | None = None   # sampled-kl: log π_S(y_t | s_t) - log π_T(y_t | s_t), per target
    advantage: torch.Tensor | None = None    # sampled-kl: A_t, per target


def continuation_signal(args, model, teacher, trajectories, seed: int) -> Supervision:
    """The paper's signal: at --cuts random cut points t of each trajectory the teacher writes
    --continuation-tokens tokens c from the state (x, y_<t); they are the targets, (x, y_<t) the states."""
    rng = random.Random(seed)
    cuts = [(tr, t) for tr in trajectories
            for t in sorted(rng.sample(range(len(tr.response)), min(args.cuts, len(tr.response))))]
    continuations = gsm8k_rollouts(teacher.model, teacher.tok, [tr.prompt + tr.response[:t] for tr, t in cuts],
                                   teacher.adapter, args.continuation_tokens, args.teacher_temperature,
                                   distributed.seed(seed, "continuations"), args.sample_batch_size)
    rows = training.pad_rows([(tr.prompt, tr.response[:t], c.tokens) for (tr, t), c in zip(cuts, continuations)],
                             args.device)
    return Supervision(rows)


def continuation_loss(model, rows, normalizer: float):
    """Eq. 7: SFT's cross-entropy (Eq. 5) on the teacher's continuations, at the learner's states."""
    logp = training.token_logprobs(model, rows.ids, rows.attn, rows.target)
    return -logp.sum() / normalizer                                                             # Eq. 7


def kl_signal(args, model, teacher, trajectories, seed: int) -> Supervision:
    """Every state (x, y_<t) supervises the distribution of position t: the targets are all of y, and the states
    are their own prefixes (the last token of y ends the trajectory without forming a state)."""
    return Supervision(training.pad_rows([(tr.prompt, None, tr.response) for tr in trajectories], args.device))


def _kl(h_student, h_teacher, head_student, head_teacher):
    dtype = torch.promote_types(h_student.dtype, torch.float32)   # bf16 -> float32; float64 stays
    logp_s, logp_t = (head(h).log_softmax(-1, dtype=dtype) for h, head in ((h_student, head_student),
                                                                            (h_teacher, head_teacher)))
    forward = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return torch.stack([forward, reverse], dim=-1)


def one_step_kl(h_student, h_teacher, lm_head, chunk: int = 1024, teacher_head=None):
    """Per state [N, 2]: KL(π_T||π_S) and KL(π_S||π_T) of the next-token distributions that the final hidden states
    give through their output layers (the teacher's: `teacher_head`, else the student's lm_head), exact over the
    vocabulary. Over row chunks, each recomputed in backward: memory O(chunk x vocabulary), not O(states x
    vocabulary). (drift.py takes the policy KLs with it, the base in the teacher's place.)"""
    parts = [torch.utils.checkpoint.checkpoint(_kl, h_student[i:i + chunk], h_teacher[i:i + chunk], lm_head,
                                               teacher_head or lm_head, use_reentrant=False)
             for i in range(0, len(h_student), chunk)]
    return torch.cat(parts) if parts else h_student.new_zeros(0, 2)


def divergences(model, teacher, rows, chunk: int):
    """one_step_kl at every supervised state of the rows: the student as it is (in training: differentiable, with
    its adapter dropout), the teacher frozen."""
    h_student = training.scored_hidden(model, rows.ids, rows.attn, rows.target)
    with torch.no_grad():
        h_teacher = training.scored_hidden(teacher.model, rows.ids, rows.attn, rows.target, teacher.adapter)
    return one_step_kl(h_student, h_teacher, model.lm_head, chunk, teacher.model.lm_head)


def kl_loss(model, teacher, rows, normalizer: float, direction: str, chunk: int):
    """Σ_t KL(π_T(·|s_t) || π_S(·|s_t)) (direction reverse: KL(π_S || π_T)), exact, / the step's states."""
    kl = divergences(model, teacher, rows, chunk)
    return kl[:, 0 if direction == "forward" else 1].sum() / normalizer


def sampled_kl_signal(args, model, teacher, trajectories, seed: int) -> Supervision:
    """Teacher and student score the student's sampled tokens, each by one no-dropout forward, at the sampler's
    temperature: equal policies give exactly zero. The sampler's own log-probs (merged weights) are π_old of the
    ratio only. A_t = -Σ_{k≥t} γ^(k-t) (log π_S - log π_T)_k along each trajectory."""
    rows = training.pad_rows([(tr.prompt, None, tr.response) for tr in trajectories], args.device)
    with torch.no_grad():
        student = training.token_logprobs(model, rows.ids, rows.attn, rows.target, args.temperature)
        reverse_kl = student - training.token_logprobs(teacher.model, rows.ids, rows.attn, rows.target,
                                                       args.temperature, teacher.adapter)
    grid = torch.zeros(rows.target.shape, dtype=student.dtype, device=student.device)
    grid[rows.target] = reverse_kl
    sampler = torch.tensor([lp for tr in trajectories for lp in tr.logprobs], device=student.device)
    return Supervision(rows, sampler, reverse_kl, sampled_kl_advantage(grid, args.discount)[rows.target])


def sampled_kl_advantage(reverse_kl: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = -Σ_{k≥t} γ^(k-t) reverse_kl_k along each row of a [B, T] grid that is zero off the targets (only the
    targets' A_t are used)."""
    if discount == 0:
        return -reverse_kl
    k = torch.arange(reverse_kl.shape[1], device=reverse_kl.device)
    lag = k[:, None] - k[None, :]                                   # [k, t]: k - t
    gamma = torch.where(lag >= 0, discount ** lag.clamp(min=0).to(reverse_kl.dtype), 0.0)
    return -(reverse_kl @ gamma)


SIGNALS = {"continuation": continuation_signal, "kl": kl_signal, "sampled-kl": sampled_kl_signal}


# ----------------------------------------------------------------------------------------------
# What is logged beside the loss


@torch.no_grad()
def divergence_figures(args, model, teacher, micro: list) -> dict:
    """kl_forward and kl_reverse, exact, at the supervised states, of the student without dropout."""
    kl = [divergences(model, teacher, sup.rows, args.logit_chunk) for sup in micro]
    return {"kl_forward": [d[:, 0] for d in kl], "kl_reverse": [d[:, 1] for d in kl]}


def by_position(micro: list, width: int = 32) -> list:
    """The step's sampled reverse KL per token, averaged in bins of `width` response positions (0-31, 32-63, ..)."""
    bins = {}
    for sup in micro:
        position = (sup.rows.target.cumsum(1) - 1)[sup.rows.target] // width
        for b, v in zip(position.tolist(), sup.reverse_kl.tolist()):
            bins.setdefault(b, []).append(v)
    return [round(sum(bins[b]) / len(bins[b]), 5) if b in bins else None for b in range(max(bins, default=-1) + 1)]


def main(argv=None):
    args = parse_args(argv)
    meta = {"method": "opd", "signal": args.signal, "states": args.states}
    run = training.Run(args, meta, teacher=args.teacher)   # the teacher, frozen: adapter "teacher" or its own model
    model, tok, teacher, optimizer = run.model, run.tok, run.teacher, run.optimizer
    gold = training.gold_solutions(tok, run.examples, args.max_len) if args.states == "data" else None
    with run.start([len(p) for p in run.prompts]):   # inside, Ctrl-C and SIGTERM end the step, then the run
        while run.going():
            micro, responses = [], []
            for k in range(args.grad_accum):
                batch = run.next_batch()
                if not batch:      # under torchrun, a micro-batch smaller than the number of ranks
                    continue
                seed = distributed.seed(args.seed, "opd", run.step, k)
                trajectories = collect_states(args, model, tok, teacher, [run.prompts[i] for i in batch],
                                              gold and [gold[i] for i in batch], seed)             # the state source
                responses += [len(tr.response) for tr in trajectories]
                micro.append(SIGNALS[args.signal](args, model, teacher, trajectories, seed))   # the teacher's signal
            sampled = time.perf_counter()
            supervised, response_tokens, n_responses, read = distributed.total(
                [sum(int(s.rows.target.sum()) for s in micro), sum(responses), len(responses),
                 sum(int(s.rows.attn.sum()) for s in micro)])                      # the step's, over all ranks
            # tokens/s: read by the learner, written by the sampler (rollouts; continuations, which are the targets)
            tokens = read + response_tokens * (args.states != "data") + supervised * (args.signal == "continuation")
            normalizer = max(1, supervised)
            figures = run.locality([s.rows for s in micro])
            if figures:   # at the same steps: how far the student is from its teacher where it is trained
                figures.update(divergence_figures(args, model, teacher, micro))
            if args.signal == "sampled-kl":
                figures["reverse_kl_sampled"] = [s.reverse_kl for s in micro]
            model.train()
            loss_sum = 0.0
            for sup in micro:
                if args.signal == "continuation":
                    loss = continuation_loss(model, sup.rows, normalizer)                                  # Eq. 7
                elif args.signal == "kl":
                    loss = kl_loss(model, teacher, sup.rows, normalizer, args.kl, args.logit_chunk)   # Σ_t KL, exact
                else:   # sampled-kl: GRPO's clipped loss (Eq. 6), A_t = -(log π_S - log π_T), one update per batch
                    new = training.token_logprobs(model, sup.rows.ids, sup.rows.attn, sup.rows.target, args.temperature)
                    loss = clipped_loss(new, sup.logprobs, sup.advantage, 1.0 / normalizer, args.clip_eps)
                    ratio_figures(figures, new, sup.logprobs, sup.advantage, args.clip_eps, first=True)
                loss.backward()
                loss_sum += loss.item()
            model.eval()
            stats = run.all_reduce(loss_sum, figures, extremes=("sampling/importance_sampling_ratio",))
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip or math.inf).item()
            lr = training.lr_at(run.step, run.total, args.lr, args.warmup)     # warmup, then cosine decay
            optimizer.param_groups[0]["lr"] = lr                               # one group: the adapter
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            record = {**stats, "lr": lr, "grad_norm": grad_norm, "supervised_tokens": normalizer,
                      "response_len": response_tokens / max(1, n_responses), "sample_s": sampled - run.started,
                      "learn_s": time.perf_counter() - sampled}
            if args.signal == "sampled-kl":
                record["reverse_kl_by_position"] = by_position(micro)   # this rank's (rank 0 logs)
            run.log(record, tokens)
            run.save()                                                         # every --save-every, and --snapshots
    return args


if __name__ == "__main__":
    training.run(main)
