"""Rollout-state drift: how far a post-trained policy's own states move from the base model's.

    python drift.py --checkpoint ckpt/sft_stress.pt --out results/drift_sft_stress.json
    python drift.py --model Qwen/Qwen3-0.6B-Base --checkpoint ckpt/opd.pt --baseline-checkpoint ckpt/sft_stress.pt
    python drift.py --checkpoint ckpt/grpo.pt --features hidden        # drift in the base model's own space

Both policies (the checkpoint's, and the baseline checkpoint's or else the base model's) sample rollouts on
the same fixed prompt set: the first `--prompts` GSM8K test questions in evaluate.py's 0-shot prompt,
`--samples-per-prompt` rollouts each, temperature sampling with a fixed seed, the adapter merged for speed.
Every `--state-stride` tokens of a rollout y, and its end, give a state s_t = (x, y_<t), t = stride, 2*stride,
... < |y| and t = |y|. A state is represented by its generated part y_<t alone: the prompt x is the same for both
policies, and its words would dilute every distance. The two state sets are compared with four distances, each
a plain function below: MMD² (RBF kernel, unbiased), centroid L2, sliced Wasserstein-1 and the Jaccard distance
of the vocabularies. The MMD²'s bandwidth is the baseline's median pairwise state distance (`bandwidth_from`),
so the MMD²s of different policies against one baseline are on one scale and can be compared.

Representations (--features):
- lexical (the paper's): hashed word uni- and bi-gram counts of the decoded y_<t, L2-normalized. The paper
  names lexical features as a limitation, hence:
- hidden: the base model's final-norm last-layer hidden states of y_<t's tokens (read with x in context),
  mean-pooled. Always the base model's, so both policies' states are embedded by the same function.

The policy KL (RL's Razor, Shenfeld et al. 2025, found forgetting to track E_x[KL(π0 ‖ π)] on the new task):
per token, exact over the vocabulary, KL(π0 ‖ π) at every state of the baseline policy's rollouts and
KL(π ‖ π0) at every state of the policy's own, averaged over a prompt's states, then over prompts. π0 is the
baseline (the base: all adapters switched off, no second model). Measured on the drift prompts and on the
retention tasks' contexts (--retention-prompts TruthfulQA and MMLU contexts, one rollout of
--retention-tokens each: the first state is the context where the answer is scored), where forgetting shows.
They are never items the evaluations score (`retention_contexts` in the output says where they came from):
the data dir's extra ones, truthfulqa/extra.json (mc_task.json's layout) and mmlu/extra/<subject>_extra.csv
(the hendrycks layout), else the items beyond evaluate.py's default limits (TruthfulQA's questions after the
first 200, MMLU test rows outside its stratified 500), unless `--evaluated all` says the evaluations scored
every item (--limit 0): then a task without extra contexts has none.
It does not depend on --features; --no-policy-kl skips it.

Rollouts are cached as JSONL under --cache-dir, keyed by a hash of model, checkpoint contents, prompts and
sampling settings (batch size, dtype and device included), so each policy is sampled once per study; the
output JSON records whether each was.
The MMD's spread is a bootstrap over prompts, the unit the prompt set was drawn in: a resample draws the
prompts with replacement, once for both policies (paired), and each brings all its rollouts' states (a
rollout's states are prefixes of one another, and a prompt's rollouts alike, so resampling less would
understate it): the paper's P4 compares MMDs of 0.01093 and 0.01092, and only a spread
says whether two such numbers differ at all. Kernels are summed in blocks of --block states: memory stays
O(block²) however many states there are.

Left out: learned/sentence-embedding features and kernels other than the RBF (the paper uses neither).
"""
import hashlib
import json
import os
import re
import zlib

import torch
from tqdm import tqdm

import distributed
import lora
import training
from evaluate import (DEFAULT_LIMITS, GSM8K_STOP, file_sha256, gsm8k_prompt, gsm8k_rollouts, load_gsm8k, load_mmlu,
                      load_truthfulqa, mmlu_prompt, resolve_data_dir, stratified_subset, truthfulqa_prompt)
from cli import COUNT, NONNEGATIVE, SIZE, FlagParser, device, number, output_dir, run, write_text
from model import LoadError, load_model, upcast
from train_opd import one_step_kl

# ----------------------------------------------------------------------------------------------
# State representations

WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")   # lowercased alphanumeric runs, and every other symbol (+ = $ #) alone


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def lexical_features(texts: list[str], dim: int = 4096) -> torch.Tensor:
    """[N, dim] float32: phi(s) = c / ||c||_2, c[h] = #{word uni- and bigrams g of s : crc32(g) mod dim = h}.

    crc32 (not Python's salted hash) makes the features the same in every process. A bigram is its two
    words joined by a space, which no unigram contains, so the two kinds never share a string."""
    X = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        w = words(text)
        grams = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
        idx = torch.tensor([zlib.crc32(g.encode()) % dim for g in grams], dtype=torch.long)
        X[i] = torch.bincount(idx, minlength=dim)
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def hidden_features(model, rollouts, state_lengths: list[list[int]], batch_size: int = 16):
    """[N, H] float32, one row per state: phi(s) = mean of the final-norm last-layer hidden states over the tokens of
    its generated part y_<t (state_lengths[r]: rollout r's t's), read after the prompt x.

    The model is causal, so one forward over a whole rollout (prompt + tokens, right-padded) gives every prefix's
    hidden states, and the mean over the generated tokens a .. a + t - 1 is a difference of cumulative sums over t."""
    device = next(model.parameters()).device
    features = []
    for i in tqdm(range(0, len(rollouts), batch_size), desc="hidden states", disable=len(rollouts) <= batch_size):
        batch = rollouts[i:i + batch_size]
        rows = training.pad_rows([(r["prompt_ids"], None, r["tokens"]) for r in batch], device)
        h = upcast(model(rows.ids, rows.attn, return_hidden=True))
        csum = torch.nn.functional.pad(h.cumsum(1), (0, 0, 1, 0))   # [:, k]: the first k tokens' sum (right padding)
        for b, (r, lengths) in enumerate(zip(batch, state_lengths[i:i + batch_size])):
            a, t = len(r["prompt_ids"]), torch.tensor(lengths, device=device)   # y_<t: tokens a .. a + t - 1
            features.append(((csum[b, a + t] - csum[b, a]) / t[:, None]).cpu())
    return torch.cat(features)


# ----------------------------------------------------------------------------------------------
# Distances between two state sets X [m, d] and Y [n, d]


def median_bandwidth(Z, max_points: int = 1000, seed: int = 0) -> float:
    """Median heuristic: sigma = median ||z_i - z_j|| over pairs i < j of the states Z
    (of a seeded random subsample of max_points states when there are more; 1.0 if that median is 0)."""
    if len(Z) > max_points:
        Z = Z[torch.randperm(len(Z), generator=torch.Generator().manual_seed(seed))[:max_points].to(Z.device)]
    sigma = torch.pdist(Z.double()).quantile(0.5).item() if len(Z) > 1 else 0.0
    return sigma if sigma > 0 else 1.0


def kernel_sum(X, Y, sigma: float, wx, wy, block: int = 4096):
    """[B]: sum_ij wx[i, b] k(x_i, y_j) wy[j, b] with k(x, y) = exp(-||x - y||² / (2 sigma²)),
    one block x block tile of the kernel matrix at a time (never the whole |X| x |Y| matrix)."""
    total = torch.zeros(wx.shape[1], dtype=torch.float64, device=X.device)
    for i in tqdm(range(0, len(X), block), desc="kernel blocks", disable=len(X) <= 3 * block, leave=False):
        for j in range(0, len(Y), block):
            # in float64: the MMD² is a small difference of large kernel sums
            K = torch.exp(-torch.cdist(X[i:i + block].double(), Y[j:j + block].double()).square() / (2 * sigma ** 2))
            total += ((K @ wy[j:j + block]) * wx[i:i + block]).sum(0)
    return total


def mmd2(X, Y, sigma: float, wx=None, wy=None, block: int = 4096):
    """Unbiased MMD² with the RBF kernel of bandwidth sigma (Gretton et al. 2012, Eq. 3):

        MMD²_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i,y_j) / (mn)

    wx [m, B], wy [n, B] (optional) are multiplicities of B resamples (bootstrap counts). A within-set sum then
    runs over pairs of distinct original states, each weighted w_i w_j: (w^T K w - sum w_i²) / ((sum w)² - sum w_i²),
    as k(x, x) = 1. A copy of a state is never paired with itself, which would push every resample's MMD² up;
    all-ones weights give the formula above. Returns a float, or [B] with weights."""
    single = wx is None
    if single:
        wx, wy = (torch.ones(len(Z), 1, dtype=torch.float64, device=X.device) for Z in (X, Y))

    def within(Z, w):   # the mean kernel over pairs of distinct original states
        return (kernel_sum(Z, Z, sigma, w, w, block) - (w * w).sum(0)) / (w.sum(0) ** 2 - (w * w).sum(0))
    out = within(X, wx) + within(Y, wy) - 2 * kernel_sum(X, Y, sigma, wx, wy, block) / (wx.sum(0) * wy.sum(0))
    return out.item() if single else out


def centroid_distance(X, Y) -> float:
    """||mean_i x_i - mean_j y_j||_2"""
    return (X.double().mean(0) - Y.double().mean(0)).norm().item()


def wasserstein_1d(x, y):
    """[L]: W_1 between the empirical distributions of the rows x [L, m] and y [L, n]:
    W_1 = integral |F_x(t) - F_y(t)| dt, exact for step CDFs over the merged sorted values."""
    x, y = x.double().sort(-1).values.contiguous(), y.double().sort(-1).values.contiguous()
    z = torch.cat([x, y], -1).sort(-1).values
    Fx, Fy = (torch.searchsorted(v, z[:, :-1].contiguous(), right=True).double() / v.shape[1] for v in (x, y))
    return ((Fx - Fy).abs() * z.diff(dim=-1)).sum(-1)


def sliced_wasserstein(X, Y, n_projections: int = 128, seed: int = 0) -> float:
    """SW_1(X, Y) = (1/L) sum_l W_1(theta_l^T X, theta_l^T Y), theta_l L seeded directions uniform on the sphere."""
    theta = torch.randn(X.shape[1], n_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(X.device)
    return wasserstein_1d((X.double() @ theta).T, (Y.double() @ theta).T).mean().item()


def jaccard_distance(A: set, B: set) -> float:
    """d_J = 1 - |A & B| / |A | B| (0 for two empty sets)."""
    return 1 - len(A & B) / len(A | B) if A | B else 0.0


def bootstrap_weights(groups: list[int], n: int, seed: int = 0, units: int | None = None):
    """[len(groups), n] multiplicities: each column resamples the units 0 .. units - 1 (default max + 1: prompts)
    with replacement, and every state counts as often as its unit was drawn. The same seed and units give the same
    draws, so two state sets grouped by the same prompts are resampled together (paired)."""
    R = units or max(groups) + 1
    draws = torch.randint(0, R, (n, R), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(n, R, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n, R, dtype=torch.float64))
    return counts[:, groups].T.contiguous()


def drift(X, Y, groups_x, groups_y, n_bootstrap: int = 200, n_projections: int = 128, seed: int = 0,
          block: int = 4096) -> dict:
    """Every distance of the policy's states X from the baseline's Y, the MMD² with Y's own median bandwidth (one
    scale for every policy against that baseline), plus the MMD²'s bootstrap spread over prompts: groups_x and
    groups_y name each state's prompt, and a resample draws the prompts once for both sets."""
    sigma = median_bandwidth(Y, seed=seed)
    squared = mmd2(X, Y, sigma, block=block)
    out = {"bandwidth": sigma, "bandwidth_from": "baseline median", "mmd2": squared, "mmd": max(squared, 0.0) ** 0.5,
           "centroid_l2": centroid_distance(X, Y), "sliced_wasserstein": sliced_wasserstein(X, Y, n_projections, seed)}
    if n_bootstrap:
        units = max(groups_x + groups_y) + 1
        wx, wy = (bootstrap_weights(g, n_bootstrap, seed, units).to(X.device) for g in (groups_x, groups_y))
        boot = mmd2(X, Y, sigma, wx, wy, block).cpu()
        ci95 = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out["mmd2_bootstrap"] = {"resamples": n_bootstrap, "over": "prompts", "std": boot.std().item(),
                                 "mean": boot.mean().item(), "ci95": ci95, "replicates": boot.tolist()}
    return out


# ----------------------------------------------------------------------------------------------
# The policy KL: how far the post-trained policy's next-token distributions moved, at states (RL's Razor)


@torch.no_grad()
def policy_kl(model, rollouts, reference, policy, batch_size: int = 16, chunk: int = 1024) -> torch.Tensor:
    """[R, 2] float64: per rollout, the mean over its states s_t = (x, y_<t), t = 0 .. |y| - 1, of
    KL(π0(·|s_t) ‖ π(·|s_t)) and KL(π ‖ π0), exact over the vocabulary. π0 is adapter `reference` (None: the
    base, every adapter off: no second copy of the model) and π adapter `policy`. NaN for an empty rollout."""
    out = []
    for i in range(0, len(rollouts), batch_size):
        batch = rollouts[i:i + batch_size]
        rows = training.pad_rows([(r["prompt_ids"], None, r["tokens"]) for r in batch], model.lm_head.weight.device)
        h0, h = (training.scored_hidden(model, rows.ids, rows.attn, rows.target, p) for p in (reference, policy))
        # π0 in the teacher's place: KL(π0‖π), KL(π‖π0) per state, summed into its rollout's row
        kl = one_step_kl(h, h0, model.lm_head, chunk).double()
        total = kl.new_zeros(len(batch), 2).index_add_(0, rows.target.nonzero()[:, 0], kl)
        out.append((total / rows.target.sum(1, keepdim=True)).cpu())
    return torch.cat(out)


def per_prompt(values: torch.Tensor, rollouts) -> list[float]:
    """The mean of per-rollout values over each prompt's rollouts, in prompt order."""
    by_prompt = {}
    for v, r in zip(values.tolist(), rollouts):
        by_prompt.setdefault(r["prompt_index"], []).append(v)
    return [sum(v) / len(v) for _, v in sorted(by_prompt.items())]


def kl_measures(model, base_rollouts, policy_rollouts, reference, batch_size) -> dict:
    """KL(π0 ‖ π) at π0's own rollout states and KL(π ‖ π0) at π's, each averaged over a prompt's states and
    rollouts, then over prompts; per-prompt values too (the same prompts for every model: paired)."""
    def kl(rollouts):   # under torchrun each rank scores its share of the rollouts
        return torch.tensor(distributed.gather(policy_kl(model, distributed.share(rollouts), reference, "policy",
                                                         batch_size).tolist())).view(-1, 2)
    prompts = {"kl_base_policy": per_prompt(kl(base_rollouts)[:, 0], base_rollouts),
               "kl_policy_base": per_prompt(kl(policy_rollouts)[:, 1], policy_rollouts)}
    return {**{k: sum(v) / len(v) for k, v in prompts.items()}, "per_prompt": prompts}


def retention_prompts(data_dir, n: int, evaluated: str) -> tuple[list[str], dict]:
    """n TruthfulQA and n MMLU contexts, posed as evaluate.py poses them but none of them an item it scores (the
    module docstring says which), and where each task's came from."""
    extra = lambda *path: data_dir is not None and os.path.exists(os.path.join(data_dir, *path))   # noqa: E731
    tqa, mmlu, where = [], [], {"truthfulqa": "none", "mmlu": "none"}   # --evaluated all and no extra contexts
    if extra("truthfulqa", "extra.json"):
        tqa, where["truthfulqa"] = load_truthfulqa(data_dir, "extra.json"), "truthfulqa/extra.json"
    elif evaluated == "default":
        tqa = load_truthfulqa(data_dir)[DEFAULT_LIMITS["truthfulqa"]:]
        where["truthfulqa"] = f"after evaluate.py's first {DEFAULT_LIMITS['truthfulqa']}"
    if extra("mmlu", "extra"):
        mmlu, where["mmlu"] = load_mmlu("extra", data_dir), "mmlu/extra/"
    elif evaluated == "default":
        test = load_mmlu("test", data_dir)
        scored = {ex["id"] for ex in stratified_subset(test, DEFAULT_LIMITS["mmlu"], 0)}
        mmlu = [ex for ex in test if ex["id"] not in scored]
        where["mmlu"] = f"outside evaluate.py's stratified {DEFAULT_LIMITS['mmlu']}"
    tqa, mmlu = tqa[:n], stratified_subset(mmlu, n, 0)
    where = {task: {"from": where[task], "contexts": len(items), "evaluated": evaluated}
             for task, items in (("truthfulqa", tqa), ("mmlu", mmlu))}
    return [truthfulqa_prompt(ex["question"]) for ex in tqa] + [mmlu_prompt(ex) for ex in mmlu], where


# ----------------------------------------------------------------------------------------------
# Rollouts and their states


def policy_rollouts(model, tok, model_name, checkpoint, adapter, prompts, args, max_new_tokens, samples):
    """(rollouts as dicts, cache path, sampled?) for the policy base + checkpoint, whose weights are the model's
    adapter `adapter` (checkpoint None: the base itself): `samples` per prompt of at most max_new_tokens."""
    # Everything that changes what this run would sample: batching changes the random stream and the
    # padding, and dtype and device change the numerics, so each is part of the key.
    param = next(model.parameters())
    key = {"model": model_name, "checkpoint": checkpoint and file_sha256(checkpoint),
           "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest(), "samples_per_prompt": samples,
           "temperature": args.temperature, "max_new_tokens": max_new_tokens, "stop": list(GSM8K_STOP),
           "seed": args.seed, "batch_size": args.batch_size, "dtype": str(param.dtype), "device": param.device.type,
           **({"ranks": distributed.world()} if distributed.world() > 1 else {})}   # ranks sample other streams
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"rollouts_{digest}.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f], path, False
    index = distributed.share(list(range(len(prompts) * samples)))   # this rank's share of prompt x sample
    out = gsm8k_rollouts(model, tok, [prompts[i // samples] for i in index], adapter if checkpoint else None,
                         max_new_tokens, args.temperature, distributed.seed(args.seed), args.batch_size,
                         progress=distributed.main_rank())
    rollouts = distributed.gather([{"prompt_index": i // samples, "prompt_ids": r.prompt_ids, "tokens": r.tokens,
                                    "text": r.text, "finish": r.finish} for i, r in zip(index, out)])
    if distributed.main_rank():   # an interrupted run leaves no half cache
        write_text(output_dir(path, "--cache-dir"), "".join(json.dumps(r) + "\n" for r in rollouts))
    return rollouts, path, True


def states(rollouts, stride: int):
    """The generated parts' lengths t = stride, 2 stride, ... < |y| and |y| of every rollout (y_<t is never empty),
    and the prompt each state belongs to (the bootstrap's unit)."""
    lengths = [[*range(stride, len(r["tokens"]), stride), len(r["tokens"])] if r["tokens"] else [] for r in rollouts]
    return lengths, [r["prompt_index"] for r, ls in zip(rollouts, lengths) for _ in ls]


def embed(rollouts, lengths, args, model, tok):
    """Features [N, d] of the states' generated parts y_<t (not the prompt, which both policies share) and the set
    of words they use."""
    texts = [tok.decode(r["tokens"][:t]) for r, ls in zip(rollouts, lengths) for t in ls]
    vocab = {w for text in texts for w in words(text)}
    if args.features == "lexical":
        return lexical_features(texts, args.hash_dim), vocab
    with lora.use_adapter(model, None):   # always the base model's space
        return hidden_features(model, rollouts, lengths, args.batch_size), vocab


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = FlagParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="base model dir or hub id (default: the checkpoint's meta base_model)")
    p.add_argument("--checkpoint", required=True, help="LoRA checkpoint (.pt) of the post-trained policy")
    p.add_argument("--baseline-checkpoint", help="LoRA checkpoint of the policy to compare with (default: the base)")
    p.add_argument("--data-dir", help="directory with gsm8k/test.jsonl (default: the hub's openai/gsm8k)")
    p.add_argument("--out", help="output JSON (default: results/drift_<checkpoint name>.json)")
    p.add_argument("--cache-dir", default="results/rollouts", help="where sampled rollouts are cached (JSONL)")
    p.add_argument("--prompts", type=COUNT, default=100, help="prompt set: the first N GSM8K test questions (0: all)")
    p.add_argument("--samples-per-prompt", type=SIZE, default=4, help="rollouts per prompt and policy")
    p.add_argument("--temperature", type=NONNEGATIVE, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="rollout length limit")
    p.add_argument("--state-stride", type=SIZE, default=16, help="a state every this many rollout tokens")
    p.add_argument("--features", choices=["lexical", "hidden"], default="lexical", help="state representation")
    p.add_argument("--hash-dim", type=SIZE, default=4096, help="buckets of the hashed lexical features")
    p.add_argument("--bootstrap", type=COUNT, default=200, help="bootstrap resamples (over prompts) for the MMD²")
    p.add_argument("--projections", type=SIZE, default=128, help="random directions of the sliced Wasserstein")
    p.add_argument("--block", type=SIZE, default=4096, help="states per kernel tile (memory ~ 3 x block² x 8 bytes)")
    p.add_argument("--batch-size", type=SIZE, default=64, help="sequences per sampling / forward batch")
    p.add_argument("--no-policy-kl", dest="policy_kl", action="store_false", help="skip the (feature-free) policy KLs")
    p.add_argument("--retention-prompts", type=COUNT, default=32, help="policy-KL contexts per retention task")
    p.add_argument("--evaluated", choices=["default", "all"], default="default", help="retention items the "
                   "evaluations score: evaluate.py's default limits or all (--limit 0); KL contexts avoid them")
    p.add_argument("--retention-tokens", type=SIZE, default=32, help="length of the one rollout per retention context")
    p.add_argument("--seed", type=number(int), default=0, help="seed of sampling, projections, bandwidth, bootstrap")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default=None,
                   help="the base model's weights (default: bfloat16 on CUDA, float32 on the CPU)")
    args = p.parse_args(argv)
    args.device = distributed.init(args.device)   # under torchrun: rollouts and policy KLs split over the ranks
    name = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = output_dir(args.out or os.path.join("results", f"drift_{name}.json"))
    sides = {"baseline": args.baseline_checkpoint, "policy": args.checkpoint}   # None: the base model
    checkpoints = {side: lora.load_checkpoint(path) for side, path in sides.items() if path}
    model_name = args.model or checkpoints["policy"]["meta"].get("base_model")
    if not model_name:
        raise LoadError(f"{args.checkpoint} does not name its base model; pass --model")
    # data before the model: a missing file fails at once
    args.data_dir = resolve_data_dir(model_name, args.data_dir)
    prompts = [gsm8k_prompt(ex["question"]) for ex in load_gsm8k("test", args.data_dir)[:args.prompts or None]]
    contexts, where = (retention_prompts(args.data_dir, args.retention_prompts, args.evaluated)
                       if args.policy_kl and args.retention_prompts else ([], None))
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tok = load_model(model_name, device=args.device, dtype=getattr(torch, dtype))
    for side, ckpt in checkpoints.items():   # both on the one base, before any sampling: a mismatch fails at once
        lora.load_adapter(model, ckpt, name=side)

    result, state_sets = {"model": model_name, "features": args.features}, {}
    for side, ckpt in sides.items():
        rollouts, path, sampled = policy_rollouts(model, tok, model_name, ckpt, side, prompts, args,
                                                  args.max_new_tokens, args.samples_per_prompt)
        lengths, groups = states(rollouts, args.state_stride)
        X, vocab = embed(rollouts, lengths, args, model, tok)
        state_sets[side] = (X.to(args.device), groups, vocab, rollouts)
        result[side] = {"checkpoint": ckpt, "rollouts": len(rollouts), "states": len(X), "sampled": sampled,
                        "cache": path, "mean_rollout_tokens": sum(len(r["tokens"]) for r in rollouts) / len(rollouts)}
    (Xb, groups_b, vocab_b, rollouts_b), (Xp, groups_p, vocab_p, rollouts_p) = state_sets.values()
    settings = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "baseline_checkpoint")}
    result.update(drift(Xp, Xb, groups_p, groups_b, args.bootstrap, args.projections, args.seed, args.block),
                  jaccard=jaccard_distance(vocab_p, vocab_b), settings=settings)
    if args.policy_kl:
        reference = "baseline" if args.baseline_checkpoint else None
        result["policy_kl"] = {"target": kl_measures(model, rollouts_b, rollouts_p, reference, args.batch_size)}
        result["retention_contexts"] = where
        if contexts:
            base_r, policy_r = (policy_rollouts(model, tok, model_name, ckpt, side, contexts, args,
                                                args.retention_tokens, 1)[0] for side, ckpt in sides.items())
            result["policy_kl"]["retention"] = kl_measures(model, base_r, policy_r, reference, args.batch_size)
    if distributed.main_rank():
        write_text(out, json.dumps(result, indent=2))
        for on, v in result.get("policy_kl", {}).items():
            print(f"policy KL {on}: KL(π0‖π) {v['kl_base_policy']:.4f}, KL(π‖π0) {v['kl_policy_base']:.4f}")
        std = result.get("mmd2_bootstrap", {}).get("std", float("nan"))
        print(f"drift {args.features}: MMD² {result['mmd2']:.5f} (bootstrap std {std:.5f}), centroid "
              f"{result['centroid_l2']:.4f}, SW {result['sliced_wasserstein']:.4f}, "
              f"Jaccard {result['jaccard']:.4f} -> {out}")
    distributed.barrier()
    return result


if __name__ == "__main__":
    run(main)
