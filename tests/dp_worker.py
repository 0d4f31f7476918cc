"""One data-parallel gradient of GRPO or OPD on a fixed step, for tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_worker.py grpo MODEL_DIR OUT.pt

The step's prompts and rollouts are fixed (no sampling), the same for any number of ranks; each rank takes its
share of them as the trainers do, computes its part of the loss with the step-wide normalizers, and the summed
gradient of the adapter is written by rank 0.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import lora  # noqa: E402
import train_grpo  # noqa: E402
import train_opd  # noqa: E402
import training  # noqa: E402
from generate import Rollout  # noqa: E402
from model import load_model  # noqa: E402


def adapter(model, name, seed):
    torch.manual_seed(seed)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0), name=name)
    with torch.no_grad():
        for p in lora.lora_parameters(model, name):
            p.normal_(0, 0.1)


def grpo_step(model, tok, G=4, prompts=6):
    """6 prompts x 4 completions of unequal lengths; reward: the completion's last token is even."""
    args = train_grpo.parse_args(["--group-size", str(G), "--grad-accum", "2", "--max-new-tokens", "12"])
    gen = torch.Generator().manual_seed(0)
    group = [{"question": f"q{j}", "answer": "#### 1"} for j in range(prompts)]
    rollouts = []
    for j in range(prompts):
        prompt = torch.randint(3, 900, (3 + j,), generator=gen).tolist()
        for _ in range(G):
            n = int(torch.randint(2, 12, (1,), generator=gen))
            tokens = torch.randint(3, 900, (n,), generator=gen).tolist()
            rollouts.append(Rollout(prompt, tokens, "", (-torch.rand(n, generator=gen)).tolist(), "length"))
    mine = distributed.share(list(range(prompts)))
    local = [rollouts[j * G + g] for j in mine for g in range(G)]
    micro, _, _, _ = train_grpo.learner_batches(args, local, [group[j] for j in mine],
                                             lambda r, ex: float(r.tokens[-1] % 2 == 0))
    for m in micro:
        new = training.token_logprobs(model, m.rows.ids, m.rows.attn, m.rows.target, args.temperature)
        train_grpo.clipped_loss(new, m.old, m.adv, m.weights, args.clip_eps).backward()


def opd_step(model, tok, signal, prompts=5):
    adapter(model, "teacher", seed=2)
    for p in lora.lora_parameters(model, "teacher"):
        p.requires_grad_(False)
    lora.set_adapter(model, "default")
    args = train_opd.parse_args(["--teacher", "unused.pt", "--signal", signal])
    gen = torch.Generator().manual_seed(1)
    trajectories = []
    for j in range(prompts):
        n = 4 + 2 * j
        trajectories.append(train_opd.Trajectory(torch.randint(3, 900, (4,), generator=gen).tolist(),
                                                 torch.randint(3, 900, (n,), generator=gen).tolist(),
                                                 (-torch.rand(n, generator=gen)).tolist()))
    teacher = training.Policy(model, tok, "teacher")
    sup = train_opd.SIGNALS[args.signal](args, model, teacher, distributed.share(trajectories), seed=0)
    rows = sup.rows
    normalizer = distributed.total([int(rows.target.sum())])[0]
    if args.signal == "continuation":
        loss = train_opd.continuation_loss(model, rows, normalizer)
    elif args.signal == "kl":
        loss = train_opd.kl_loss(model, teacher, rows, normalizer, args.kl, args.logit_chunk)
    else:
        new = training.token_logprobs(model, rows.ids, rows.attn, rows.target, args.temperature)
        loss = train_grpo.clipped_loss(new, sup.logprobs, sup.advantage, 1.0 / normalizer, args.clip_eps)
    loss.backward()


def main():
    method, model_dir, out = sys.argv[1:4]
    distributed.init("cpu")
    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    adapter(model, "default", seed=1)
    if method == "grpo":
        grpo_step(model, tok)
    else:
        opd_step(model, tok, method.split(":")[1])
    params = lora.lora_parameters(model)
    distributed.sum_gradients(params)
    if distributed.main_rank():
        torch.save([p.grad for p in params], out)
    distributed.barrier()     # no rank leaves while another still talks to it (gloo aborts a process that does)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: under load, gloo's threads sometimes met it and aborted a rank that
    # had finished its work ("terminate called without an active exception", seen in 1 of 3 loaded runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
