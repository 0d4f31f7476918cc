"""The KV-cache sampler: batched rollouts and continuation scoring (the trainers' differentiable token
log-probs are training.token_logprobs).

    from generate import generate, score
    rollouts = generate(model, tok, ["Question: ...\\nAnswer:"] * 8, max_new_tokens=256,
                        temperature=1.0, stop=["Question:"], seed=0)
    rollouts[0].text, rollouts[0].tokens, rollouts[0].logprobs

Every experiment in the study is dominated by sampling rollouts (GRPO's groups, OPD's student states and
teacher continuations, drift's state sets, GSM8K evaluation), so the structure is built for it:
- prompts are left-padded and prefilled in one batched forward that computes logits for the last position only;
- decoding writes into one preallocated cache (model.KVCache) and never loops over sequences in Python;
- finished sequences are tracked per row (a finish reason, 0 while running), never by comparing tokens with the pad id,
  because Qwen base models use the same id (<|endoftext|>) for padding and EOS;
- stop strings are checked in Python only for the rows whose new token could complete one (a precomputed
  vocabulary mask of "trigger" tokens), so the common step costs no decoding at all;
- on CUDA the one-token decode step (model.Qwen3.graph_step, over the whole cache so that no shape changes) is
  captured once as a CUDA graph and replayed (decode is launch-bound): DecodeGraph, in its own section at the end.

Left out: beam search, repetition penalties, speculative decoding (the study samples plainly).
"""
import time
import weakref
from typing import NamedTuple, Sequence

import torch
from tqdm import tqdm

import lora
from cli import COUNT, NONNEGATIVE, SIZE, FlagParser, device, number, run
from model import KVCache, load_model, upcast


class Rollout(NamedTuple):
    prompt_ids: list
    tokens: list      # new tokens, including the EOS or the token that completed a stop string
    text: str         # decoded new text, cut before the stop string; the EOS is not part of it
    logprobs: list    # log-prob of each token under the sampling policy: log_softmax(logits / T), T=1 when greedy
    finish: str       # "eos" | "stop" | "length"


def pad(seqs: Sequence[Sequence[int]], side: str = "left", pad_id: int = 0, device="cpu"):
    """ids [B, T] and mask [B, T] (True = token) of the sequences padded on `side`: "left" right-aligns them (a
    batch of prompts ends at one column, where decoding goes on), "right" left-aligns them (continuations,
    training rows)."""
    lengths = torch.tensor([len(s) for s in seqs])[:, None]
    T = int(lengths.max())
    mask = torch.arange(T) >= T - lengths if side == "left" else torch.arange(T) < lengths
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    # the mask's True cells, read row by row, are the sequences' tokens one after another
    ids[mask] = torch.tensor([token for s in seqs for token in s], dtype=torch.long)
    return ids.to(device), mask.to(device)


def longest_first(run, items: list, length, batch_size: int, desc: str | None = None) -> list:
    """run(batch) -> a result per item of the batch, over batches of items of similar length(item), longest
    first (so that each batch pads little); the results come back in the items' order. desc: a progress bar."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    out = {}
    with tqdm(total=len(items), desc=desc, unit="seq", disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out.update(zip(chunk, run([items[i] for i in chunk])))
            bar.update(len(chunk))
    return [out[i] for i in range(len(items))]


def sample_next(logits, temperature: float, top_p: float, top_k: int, generator):
    """Next tokens [B] and their log-probs under the sampling policy log_softmax(logits / T).

    The recorded log-prob ignores top-k/top-p truncation (it is the policy's own probability, which is what
    GRPO's ratio and OPD's KL need); greedy decoding (T = 0) records log_softmax(logits).
    """
    logits = upcast(logits)
    logp = torch.log_softmax(logits / temperature if temperature not in (0, 1) else logits, dim=-1)
    if temperature == 0:
        token = logits.argmax(-1)
    else:
        filtered = logp.masked_fill(logp < logp.topk(top_k, dim=-1).values[:, -1:], float("-inf")) if top_k else logp
        if top_p < 1.0:
            sorted_logp, order = filtered.sort(dim=-1, descending=True)
            p = sorted_logp.softmax(-1)
            drop = p.cumsum(-1) - p >= top_p          # keep the smallest set reaching top_p
            filtered = filtered.scatter(-1, order, sorted_logp.masked_fill(drop, float("-inf")))
        token = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


FINISH = ("length", "eos", "stop")
_TRIGGERS = weakref.WeakKeyDictionary()   # tokenizer -> {(stop, vocab_size, device): mask}, gone with the tokenizer


def stop_triggers(tokenizer, stop: Sequence[str], vocab_size: int, device):
    """Bool [vocab]: tokens whose text contains the last character of some stop string. Only a row whose
    newest token is a trigger can have just completed a stop string, so only those rows are decoded."""
    cached = _TRIGGERS.setdefault(tokenizer, {})   # keyed by the object: a later tokenizer may reuse a freed id
    key = (tuple(stop), vocab_size, str(device))
    if key not in cached:
        n = min(tokenizer.vocab_size, vocab_size)
        texts = tokenizer.decode_batch([[i] for i in range(n)])
        # a trigger shows the last character of a stop string, or is a partial UTF-8 byte
        hit = [any(s[-1] in t for s in stop if s) or "\ufffd" in t for t in texts]
        cached[key] = torch.tensor(hit + [False] * (vocab_size - n), dtype=torch.bool, device=device)
    return cached[key]


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop: Sequence[str] = (), seed: int | None = 0, batch_size: int = 64,
             progress: bool = False, cuda_graph: bool = True) -> list[Rollout]:
    """Sample a rollout per prompt (str or token ids). temperature=0 is greedy. Same seed, same rollouts (on CPU)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)   # its own: the caller's torch RNG is left as it was
    generator.manual_seed(generator.seed() if seed is None else seed)   # None: a fresh seed

    def sample_batch(batch):   # prompts of similar lengths, decoded together
        ids, mask = pad(batch, device=device)
        B, P = ids.shape
        cache = KVCache.empty(model.config, B, P + max_new_tokens, device, model.embed_tokens.weight.dtype)
        logits = model(ids, mask, cache=cache, logits_to_keep=1)[:, -1]
        positions = mask.sum(-1)                        # next position of every row
        eos = torch.tensor(tokenizer.eos_ids or [-1], device=device)
        triggers = stop_triggers(tokenizer, stop, logits.shape[-1], device) if stop else None
        tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        logps = torch.zeros(B, max_new_tokens, dtype=upcast(logits).dtype, device=device)   # float64 if the model is
        length = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)   # new tokens kept per row
        reason = torch.zeros(B, dtype=torch.long, device=device)    # index into FINISH; 0 (length) while a row runs
        # on CUDA the decode step is replayed as a graph (DecodeGraph, at the end of this file)
        graph = DecodeGraph(model, cache) if cuda_graph and device.type == "cuda" and max_new_tokens > 1 else None
        alive = torch.arange(B, device=device)   # the rows still in the decoding batch (logits, cache, positions)
        for t in range(max_new_tokens):
            token, logp = sample_next(logits, temperature, top_p, top_k, generator)
            tokens[alive, t], logps[alive, t] = token, logp
            running = reason[alive] == 0
            ended = running & torch.isin(token, eos)
            reason[alive[ended]] = 1
            if triggers is not None:
                maybe = (running & ~ended & triggers[token]).nonzero().flatten().tolist()
                if maybe:  # rare: decode only these rows and look for a stop string
                    texts = tokenizer.decode_batch(tokens[alive[maybe], :t + 1].tolist())
                    stopped = [k for k, text in zip(maybe, texts) if any(s in text for s in stop)]
                    ended[stopped] = True
                    reason[alive[stopped]] = 2
            length[alive[ended]] = t + 1
            if t == max_new_tokens - 1 or bool((reason > 0).all()):
                break
            running &= ~ended
            if graph is None and 2 * int(running.sum()) <= len(alive):
                # Half the batch has finished: drop those rows, so one long sample does not hold up the finished
                # ones (the CUDA graph keeps its fixed batch).
                keep = running.nonzero().flatten()
                alive, token, positions, cache = alive[keep], token[keep], positions[keep], cache.select(keep)
            logits = (model(token[:, None], cache=cache, positions=positions[:, None])[:, -1] if graph is None
                      else graph(token, positions))
            positions = positions + 1
        result = []
        for prompt, row, lp, n, why in zip(batch, tokens.tolist(), logps.tolist(), length.tolist(), reason.tolist()):
            text = tokenizer.decode(row[:n - 1] if FINISH[why] == "eos" else row[:n])
            text = text[:min(text.find(s) for s in stop if s in text)] if FINISH[why] == "stop" else text
            result.append(Rollout(list(prompt), row[:n], text, lp[:n], FINISH[why]))
        return result
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    return longest_first(sample_batch, prompts, len, batch_size, "rollouts" if progress else None)


def score(model, contexts, continuations, batch_size: int = 64, desc: str | None = None) -> list[list[torch.Tensor]]:
    """log p(continuation tokens | context) for several continuations of each context.

    contexts: list of token lists; continuations: per context, a list of token lists. Contexts are batched by
    length (longest_first, with the progress bar `desc`); each is prefilled once (left-padded batch) and its
    cache rows are copied for its continuations, which then run as right-padded batches of similar lengths; the
    first continuation token is scored from the context's last logit, and the lm_head runs only where a real
    next token is scored (with a 150k vocabulary it costs more per position than a small model's whole body,
    so padding must not reach it).
    Returns, per context and continuation, a 1-D tensor of per-token log-probs (float32, CPU).
    """
    return longest_first(lambda batch: _score_batch(model, batch, batch_size), list(zip(contexts, continuations)),
                         lambda item: len(item[0]) + max(map(len, item[1]), default=0), batch_size, desc)


@torch.inference_mode()
def _score_batch(model, batch, batch_size):
    device = next(model.parameters()).device
    ids, mask = pad([context for context, _ in batch], device=device)
    cache = KVCache.empty(model.config, len(batch), ids.shape[1], device, model.embed_tokens.weight.dtype)
    last = upcast(model(ids, mask, cache=cache, logits_to_keep=1)[:, -1]).log_softmax(-1)

    def run(part):   # (context row, continuation) pairs of similar lengths, each after its context's cache row
        rows = torch.tensor([r for r, _ in part], device=device)
        cont_ids, cont_mask = pad([c for _, c in part], side="right", device=device)
        sub = cache.select(rows, slots=ids.shape[1] + cont_ids.shape[1])
        hidden = model(cont_ids, cont_mask, cache=sub, return_hidden=True)
        # token 0 comes from the context's last logit, token i > 0 from continuation position i - 1
        first = last[rows].gather(-1, cont_ids[:, :1])
        scored = cont_mask[:, 1:]
        logp = upcast(model.lm_head(hidden[:, :-1][scored])).log_softmax(-1)
        rest = torch.zeros(scored.shape, dtype=logp.dtype, device=device)
        rest[scored] = logp.gather(-1, cont_ids[:, 1:][scored][:, None]).squeeze(-1)
        per_token = torch.cat([first, rest], dim=1).cpu()
        return [per_token[k, :len(c)] for k, (_, c) in enumerate(part)]
    pairs = [(row, cont) for row, (_, conts) in enumerate(batch) for cont in conts]
    scores = iter(longest_first(run, pairs, lambda pair: len(pair[1]), batch_size))
    return [[next(scores) for _ in conts] for _, conts in batch]


# ----------------------------------------------------------------------------------------------
# CUDA graph decode: the same step as the loop's model(...) call, captured once and replayed


class DecodeGraph:
    """One decode step (B tokens -> next-token logits) captured as a CUDA graph over a static cache.

    Shapes never change: the step is model.graph_step, which reads all cache slots, masked by cache.valid;
    the write slot and positions are tensors updated in place before each replay.
    """

    def __init__(self, model, cache: KVCache):
        B, S = cache.valid.shape
        dev = cache.valid.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        # warm-up really runs: let it write the last slot, which decoding fills later anyway
        self.slot = torch.full((1,), S - 1, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels outside the graph
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        cache.valid[:, S - 1] = False

    def _step(self):
        return self.model.graph_step(self.tokens, self.positions, self.cache, self.slot)

    def __call__(self, tokens, positions):
        """model(tokens[:, None], cache=cache, positions=positions[:, None])[:, -1], replayed."""
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.slot.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


# ----------------------------------------------------------------------------------------------
# The sampler's command line: python generate.py --model tiny --prompt "..." --n 4 --temperature 1


def main():
    p = FlagParser(description="Sample continuations of a prompt with the KV-cache sampler.")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="HF model directory or hub id")
    p.add_argument("--checkpoint", help="a LoRA checkpoint (.pt) to apply, merged")
    p.add_argument("--prompt", default="Question: Natalia sold clips to 48 of her friends in April, and then she sold "
                   "half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
                   help="prompt text (plain base-model format)")
    p.add_argument("--n", type=SIZE, default=4, help="samples of the prompt")
    p.add_argument("--max-new-tokens", type=SIZE, default=128, help="new tokens per sample at most")
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(float, maximum=1, above=0), default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=COUNT, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); default 'Question:'")
    p.add_argument("--seed", type=number(int), default=0, help="sampling seed")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"], help="the model's weights")
    args = p.parse_args()
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if args.checkpoint:
        lora.load_adapter(model, args.checkpoint)
    t0 = time.time()
    with lora.merged(model):
        rollouts = generate(model, tok, [args.prompt] * args.n, args.max_new_tokens, args.temperature, args.top_p,
                            args.top_k, args.stop if args.stop is not None else ["Question:"], args.seed)
    dt = time.time() - t0
    for i, r in enumerate(rollouts):
        print(f"--- sample {i} ({len(r.tokens)} tokens, {r.finish}) ---\n{r.text.strip()}")
    print(f"{sum(len(r.tokens) for r in rollouts)} tokens in {dt:.2f}s")


if __name__ == "__main__":
    run(main)
