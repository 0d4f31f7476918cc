"""Data parallel over torchrun's processes: every rank holds the whole model and does its share of each batch.

    torchrun --standalone --nproc_per_node 4 train_grpo.py --data-dir ../shared/data      # one process per GPU
    torchrun --standalone --nproc_per_node 2 evaluate.py --checkpoint ckpt/grpo.pt ...    # gloo on CPU, NCCL on CUDA

The contract that keeps every hyperparameter's meaning: a step's global batch is the one of one process; rank r
takes items r, r + N, r + 2N, .. of it (`share`); every step-wide normalizer (target tokens, completions) is
counted over all ranks (`total`), so each rank's loss is its part of the one-process loss and the sum of the
ranks' gradients (`sum_gradients`) is the one-process gradient; every rank then takes the same AdamW step.
Results are put back in the one-process order (`gather`); rank 0 logs, draws the progress bars and writes
every file. Each rank samples with its own seed stream (`seed`): rank 0's is the one-process stream.

Without torchrun (no WORLD_SIZE > 1 in the environment) every function here is the identity of one process.
"""
import hashlib
import os

import torch
import torch.distributed as dist


def init(device: str) -> str:
    """Join torchrun's process group (once per process: NCCL for CUDA, gloo for CPU). Returns this rank's
    device: cuda becomes cuda:LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{torch.cuda.current_device()}" if dist.is_initialized() and device == "cuda" else device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def main_rank() -> bool:
    """Whether this process logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def seed(base: int, *where, rank_: int | None = None) -> int:
    """The seed of one random stream, the one derivation every script uses: a hash of the run's seed, where the stream
    is used (a purpose and a step, e.g. seed(3, "rollouts", 17)) and this rank (rank_=0: the same on every rank, as
    the data order must be). A hash, so no two streams coincide (base * 1000 + step would give seed 1 at step 1000
    the stream of seed 2 at step 0); rank 0's stream is the one-process stream."""
    text = "/".join(str(part) for part in (base, *where, rank() if rank_ is None else rank_))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def share(items: list) -> list:
    """This rank's share of a batch: items rank, rank + N, ..."""
    return list(items[rank()::world()])


def gather(local: list) -> list:
    """The inverse of share(): every rank's items, back in the batch's order, on every rank."""
    if world() == 1:
        return list(local)
    parts = [None] * world()
    dist.all_gather_object(parts, list(local))
    out = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def _reduce(values: list[float], op) -> list[float]:
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def total(values: list) -> list:
    """The sum over ranks of each of the values (one all-reduce): step-wide counts and figures."""
    return list(values) if world() == 1 else _reduce([float(v) for v in values], dist.ReduceOp.SUM)


def any_rank(flag: bool) -> bool:
    """Whether flag is true on any rank (a stop request, a non-finite loss): all ranks decide alike."""
    return bool(flag) if world() == 1 else _reduce([float(flag)], dist.ReduceOp.MAX)[0] > 0


def sum_gradients(params: list):
    """Sum every rank's gradients into each rank's, in one all-reduce of the flattened adapter gradients. A rank
    without a gradient contributes zeros; if no rank has one, nothing changes (no update, as in one process)."""
    if world() == 1 or not any_rank(any(p.grad is not None for p in params)):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def barrier():
    """Wait for every rank (e.g. until rank 0 has written a file the others read next)."""
    if world() > 1:
        dist.barrier()
