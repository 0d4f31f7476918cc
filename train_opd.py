"""On-policy distillation: the learner's states, the teacher's signal (the paper's Eq. 7).

    python train_opd.py --teacher ckpt/sft_stress.pt                        # base model and data from the teacher
    python train_opd.py --teacher ckpt/sft_stress.pt --signal kl            # one-step exact KL (the paper's collapse)
    python train_opd.py --teacher ckpt/sft_stress.pt --states teacher       # same signal, the teacher's states
    python train_opd.py --teacher ckpt/sft_stress.pt --states data          # same signal, the dataset's states
    python train_opd.py --teacher ckpt/sft_stress.pt --resume               # continue an interrupted run

A step has two halves, and they are two functions below:
1. State source (`collect_states`, --states): trajectories whose prefixes s_t = (x, y_<t) are the training
   states. `student` (default): the student samples rollouts of GSM8K train prompts (the current adapter,
   merged into the weights for speed). `teacher`: the teacher samples them (offline sequence-level
   distillation). `data`: the gold solutions (SFT's states).
2. Signal (`teacher_signal`, --signal) at those states:
   - `continuation` (default, the paper's successful variant): at --cuts random cut points t of each
     trajectory the teacher writes --continuation-tokens tokens c from (x, y_<t) (greedy, or sampled at
     --teacher-temperature); the student learns them by cross-entropy on its own prefix:
         L(θ) = -Σ_cuts Σ_j log π_θ(c_j | x, y_<t, c_<j),   c ~ π_T(· | x, y_<t)             (Eq. 7)
   - `kl`: at every state of every trajectory, the exact one-step KL over the whole vocabulary,
         L(θ) = Σ_t KL(π_T(·|s_t) || π_θ(·|s_t))          (--kl reverse: KL(π_θ || π_T))
     The paper saw this variant collapse (GSM8K 0.040); it is computed exactly (no sampled estimate) so that
     such a result means the objective, not the estimator.
Losses are summed over supervised tokens (states, for kl) and divided by their count in the optimizer step.

Teacher and student are ONE base model with two LoRA adapters, "teacher" (frozen, from --teacher) and
"default" (the student: fresh, or --init); switching is a flag per layer, never a second copy of the base.
Flags, logging, checkpoints and --resume are training.py's; `python train_opd.py --teacher X.pt` needs nothing
else, because --model and --data-dir default to what the teacher's checkpoint records.

Logged per step (JSONL, training.py): loss; kl_forward = KL(π_T||π_S) and kl_reverse, exact, averaged over the
states the step supervised (the student's divergence from its teacher where it was trained, in the training
forward, i.e. before the update; for the continuation signal this costs one no-grad teacher forward); state
locality (state_nll_base: base-policy NLL of the state tokens y_<t; target_nll: the student's NLL of its
targets, the teacher's tokens, or for kl the expected NLL under π_T); supervised tokens; response length;
sample/learn seconds; tokens/s (sampled plus trained tokens over the step's wall time).

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
- The loss computes logits in row chunks (--logit-chunk) under activation checkpointing, so the
  [states x vocabulary] matrices of the 152k vocabulary never exist all at once.
"""
import argparse
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import lora
import training
from evaluate import GSM8K_STOP, gsm8k_prompt
from generate import generate

DEFAULT_MODEL = "Qwen/Qwen3-0.6B-Base"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="the teacher's LoRA checkpoint (.pt); its metadata names the base model and data")
    p.add_argument("--states", choices=["student", "teacher", "data"], default="student",
                   help="state source: the student's rollouts, the teacher's rollouts, or the gold solutions")
    p.add_argument("--signal", choices=["continuation", "kl"], default="continuation",
                   help="teacher continuations learned by cross-entropy (Eq. 7), or exact per-state KL")
    p.add_argument("--kl", choices=["forward", "reverse"], default="forward",
                   help="kl signal direction: forward KL(teacher||student) or reverse KL(student||teacher)")
    p.add_argument("--cuts", type=int, default=4, help="continuation: cut points per trajectory (random, seeded)")
    p.add_argument("--continuation-tokens", type=int, default=32, help="continuation: teacher tokens per cut point")
    p.add_argument("--teacher-temperature", type=float, default=0.0,
                   help="continuation: teacher sampling temperature (0 = greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (student or teacher states)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout length limit (evaluate.py's GSM8K limit)")
    p.add_argument("--sample-batch-size", type=int, default=64, help="sequences per sampler batch")
    p.add_argument("--logit-chunk", type=int, default=1024,
                   help="states per lm_head/softmax chunk in the loss (bounds memory)")
    training.add_common_args(p)
    # --model / --data-dir: None = the teacher's. 8 prompts x 4 cuts x 32 tokens per step, 200 steps (1,600 prompts).
    p.set_defaults(model=None, data_dir=None, batch_size=8, max_steps=200, lr=1e-4)
    args = p.parse_args(argv)
    if args.cuts < 1 or args.continuation_tokens < 1:
        p.error("--cuts and --continuation-tokens must be at least 1")
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


def sample(model, tok, policy: str, prompts, max_new_tokens: int, temperature: float, seed: int, batch_size: int):
    """Rollouts of `policy` ("default" = the student, "teacher"), its adapter merged into the weights."""
    with lora.use_adapter(model, policy), lora.merged(model):
        return generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        stop=GSM8K_STOP, seed=seed, batch_size=batch_size)


def through_eos(tokens, eos_ids):
    """The tokens up to and including the first EOS: nothing after it is a state."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:i + 1])
    return list(tokens)


def collect_states(run, examples, seed: int) -> list:
    """--states: the student's rollouts, the teacher's rollouts, or the gold solutions of `examples`."""
    args, model, tok = run.args, run.model, run.tok
    prompts = tok.encode_batch([gsm8k_prompt(ex["question"]) for ex in examples])
    if args.states == "data":
        answers = tok.encode_batch([" " + ex["answer"] for ex in examples])   # as train_sft.py: gold + EOS
        responses = [a + tok.eos_ids[:1] for a in answers]
    else:
        policy = "default" if args.states == "student" else "teacher"
        rollouts = sample(model, tok, policy, prompts, args.max_new_tokens, args.temperature, seed,
                          args.sample_batch_size)
        responses = [r.tokens for r in rollouts]
    return [Trajectory(p, through_eos(y, tok.eos_ids)) for p, y in zip(prompts, responses)]


# ----------------------------------------------------------------------------------------------
# Signal: what the teacher supervises at those states


@dataclass
class Supervision:
    """A packed micro-batch: each row is prompt + state tokens + supervised tokens, right-padded.
    Masks are bool [B, T] over input positions (training.py's convention: token t predicted from t - 1)."""
    ids: torch.Tensor
    attn: torch.Tensor
    target: torch.Tensor   # supervised tokens: each is predicted from the state just before it
    state: torch.Tensor    # the state-source tokens of the supervised states (for state locality)
    sampled: int           # tokens the sampler produced for this micro-batch (rollouts + continuations)


def pack(rows, device) -> tuple:
    """rows: (prompt, state tokens, supervised tokens) -> ids, attn, target, state masks."""
    T = max(len(x) + len(s) + len(c) for x, s, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn, target, state = (torch.zeros(len(rows), T, dtype=torch.bool) for _ in range(3))
    for b, (x, s, c) in enumerate(rows):
        n = len(x) + len(s) + len(c)
        ids[b, :n] = torch.tensor(list(x) + list(s) + list(c))
        attn[b, :n] = True
        state[b, len(x):len(x) + len(s)] = True
        target[b, len(x) + len(s):n] = True
    return ids.to(device), attn.to(device), target.to(device), state.to(device)


def teacher_signal(run, trajectories, seed: int, sampled: int = 0) -> Supervision:
    """--signal: the teacher's continuations at random cut points, or every state (its distribution is
    computed in the loss, where the student's is)."""
    args, model, tok = run.args, run.model, run.tok
    if args.signal == "kl":
        # Every state (x, y_<t) supervises the distribution of position t: the targets are all of y. The state
        # tokens are y but its last token, which ends the trajectory without forming a state.
        ids, attn, target, _ = pack([(tr.prompt, [], tr.response) for tr in trajectories], args.device)
        state = target.clone()
        state[torch.arange(len(trajectories)), attn.sum(1) - 1] = False
        return Supervision(ids, attn, target, state, sampled)
    rng = random.Random(seed)
    cuts = [(tr, t) for tr in trajectories
            for t in sorted(rng.sample(range(len(tr.response)), min(args.cuts, len(tr.response))))]
    prefixes = [tr.prompt + tr.response[:t] for tr, t in cuts]
    continuations = sample(model, tok, "teacher", prefixes, args.continuation_tokens, args.teacher_temperature,
                           seed + 1, args.sample_batch_size)
    rows = [(tr.prompt, tr.response[:t], through_eos(c.tokens, tok.eos_ids)) for (tr, t), c in zip(cuts, continuations)]
    return Supervision(*pack(rows, args.device), sampled + sum(len(c.tokens) for c in continuations))


# ----------------------------------------------------------------------------------------------
# Loss: both signals compare the student's and the teacher's next-token distributions at the supervised states


@contextmanager
def as_teacher(model):
    """The teacher's policy: its adapter active, no adapter dropout."""
    was_training = model.training
    model.eval()
    try:
        with lora.use_adapter(model, "teacher"):
            yield model
    finally:
        model.train(was_training)


def supervised_hidden(model, sup: Supervision):
    """Final hidden states [N, H] of the N supervised states (the position before each target token)."""
    return model(sup.ids, sup.attn, return_hidden=True)[:, :-1][sup.target[:, 1:]]


def _divergences(h_student, h_teacher, targets, lm_head):
    """Per state: KL(π_T||π_S), KL(π_S||π_T), cross-entropy H(π_T, π_S) and -log π_S(target), exact over the
    vocabulary."""
    logp_s = lm_head(h_student).float().log_softmax(-1)
    logp_t = lm_head(h_teacher).float().log_softmax(-1)
    forward = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    reverse = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    cross = -(logp_t.exp() * logp_s).sum(-1)
    nll = -logp_s.gather(-1, targets[:, None]).squeeze(-1)
    return torch.stack([forward, reverse, cross, nll], dim=-1)


def divergences(h_student, h_teacher, targets, lm_head, chunk: int = 1024):
    """_divergences over row chunks, each recomputed in backward: memory O(chunk x vocabulary), not O(N x vocab)."""
    parts = [checkpoint(_divergences, h_student[i:i + chunk], h_teacher[i:i + chunk], targets[i:i + chunk], lm_head,
                        use_reentrant=False) for i in range(0, len(h_student), chunk)]
    return torch.cat(parts) if parts else h_student.new_zeros(0, 4)


def opd_loss(run, sup: Supervision, normalizer: float, locality: bool):
    """The step's loss on one micro-batch: summed per supervised state, divided by the step's state count."""
    args, model = run.args, run.model
    h_student = supervised_hidden(model, sup)
    with torch.no_grad(), as_teacher(model):
        h_teacher = supervised_hidden(model, sup)
    per_state = divergences(h_student, h_teacher, sup.ids[sup.target], model.lm_head, args.logit_chunk)
    forward, reverse, cross, nll = per_state.unbind(-1)
    if args.signal == "continuation":
        loss = nll.sum() / normalizer                                            # Eq. 7
        target_logprobs = -nll
    else:
        loss = (forward if args.kl == "forward" else reverse).sum() / normalizer
        target_logprobs = -cross               # the target is π_T: the student's expected NLL of the teacher's samples
    figures = {"kl_forward": forward.mean().item(), "kl_reverse": reverse.mean().item()}
    if locality:
        figures.update(training.state_locality(model, sup.ids, sup.attn, sup.state, target_logprobs=target_logprobs))
    return loss, figures


# ----------------------------------------------------------------------------------------------


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
    run = training.setup(args, "opd", meta={"teacher": args.teacher, "teacher_method": teacher["meta"].get("method"),
                                            "signal": args.signal, "states": args.states})
    # Adding the teacher's adapter draws LoRA init numbers: keep the RNG stream a resumed run restored.
    with torch.random.fork_rng():
        lora.load_adapter(run.model, teacher, name="teacher")
    examples = training.train_examples(args)
    lengths = [len(ex["question"]) for ex in examples]     # characters: close enough to group prompt lengths

    def epoch_batches(epoch):
        return training.length_grouped_batches(lengths, args.batch_size, seed=args.seed * 1000 + epoch)

    n_batches = -(-len(examples) // args.batch_size)
    for step in training.steps(run, training.plan_steps(args, n_batches)):
        t0 = time.perf_counter()
        micro, responses = [], []
        for k in range(args.grad_accum):
            batch = [examples[i] for i in training.next_batch(run, epoch_batches)]
            seed = args.seed * 10**9 + step * 1000 + 2 * k     # states: seed; the teacher's continuations: seed + 1
            trajectories = collect_states(run, batch, seed)
            responses += [len(tr.response) for tr in trajectories]
            sampled = 0 if args.states == "data" else sum(len(tr.response) for tr in trajectories)
            micro.append(teacher_signal(run, trajectories, seed, sampled))
        t1 = time.perf_counter()
        normalizer = max(1, sum(int(s.target.sum()) for s in micro))
        locality = training.wants_locality(run)
        stats = training.train_step(run, micro, lambda s: opd_loss(run, s, normalizer, locality))
        stats["supervised_tokens"] = normalizer
        stats["response_len"] = sum(responses) / len(responses)
        stats["sample_s"], stats["learn_s"] = t1 - t0, time.perf_counter() - t1
        stats["tokens"] = sum(s.sampled + int(s.attn.sum()) for s in micro)
        training.end_step(run, stats)
    training.finish(run)
    return run


if __name__ == "__main__":
    training.cli(main)
