"""The KV-cache sampler: exact against transformers' greedy generate and against plain full forwards."""
import pytest
import torch

from conftest import reference_logprobs
from generate import generate, score
from model import load_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model_and_tok(tiny_dir):
    return load_model(tiny_dir)


def test_greedy_equals_transformers_generate_token_for_token(hf_models):
    for name, (path, hf) in hf_models.items():
        model, tok = load_model(path)
        ours = generate(model, tok, PROMPTS, max_new_tokens=24)
        for p, r in zip(PROMPTS, ours):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=1)[0, len(p):].tolist()
            n = len(r.tokens)
            assert r.tokens == ref[:n], name
            assert r.finish == "length" or ref[n - 1] in tok.eos_ids


@pytest.mark.parametrize("ragged", [False, True])
def test_speed_benchmark_times_the_same_greedy_tokens_on_both_sides(ragged):
    from bench.generate import bench
    from conftest import CONFIGS
    cfg = dict(CONFIGS["gqa_tied"], vocab_size=512)
    row = bench("small", cfg, 4, 12, 6, "cpu", torch.float32, repeats=1, ragged=ragged)
    assert row["identical_rows"] == "4/4" and row["prompt_len"] == ("6-12" if ragged else 12)


def test_batched_generation_equals_each_prompt_alone(model_and_tok):
    model, tok = model_and_tok
    batch = generate(model, tok, PROMPTS, max_new_tokens=16, temperature=0)
    for p, r in zip(PROMPTS, batch):
        alone = generate(model, tok, [p], max_new_tokens=16)[0]
        assert alone.tokens == r.tokens
        assert torch.allclose(torch.tensor(alone.logprobs), torch.tensor(r.logprobs), atol=1e-5)


def test_seeded_sampling_repeats_exactly_and_seeds_differ(model_and_tok):
    model, tok = model_and_tok
    a = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=1.0, seed=3)
    b = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=1.0, seed=3)
    c = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=1.0, seed=4)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_unseeded_sampling_leaves_the_callers_random_numbers_alone(model_and_tok):
    model, tok = model_and_tok
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=1.0, seed=None)
    assert torch.equal(torch.rand(3), expected)    # seed=None seeds the sampler's own generator, not torch's
    b = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=1.0, seed=None)
    assert [r.tokens for r in a] != [r.tokens for r in b]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_recorded_logprobs_are_the_sampling_policy(model_and_tok, temperature):
    model, tok = model_and_tok
    for r in generate(model, tok, PROMPTS, max_new_tokens=12, temperature=temperature, seed=1):
        ids = torch.tensor([r.prompt_ids + r.tokens])
        with torch.no_grad():
            lp = reference_logprobs(model, ids, temperature=temperature or 1.0)[0, len(r.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=1e-5, rtol=1e-5)


def test_top_k_one_is_greedy_and_top_p_keeps_only_likely_tokens(model_and_tok):
    model, tok = model_and_tok
    greedy = generate(model, tok, PROMPTS, max_new_tokens=10)
    topk1 = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert [r.tokens for r in greedy] == [r.tokens for r in topk1]
    tiny_p = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5)
    assert [r.tokens for r in greedy] == [r.tokens for r in tiny_p]


def test_eos_stops_a_row_by_position_even_when_eos_is_the_pad_id(model_and_tok):
    model, tok = model_and_tok
    sample = dict(max_new_tokens=12, temperature=1.0, seed=2)
    free = generate(model, tok, PROMPTS, **sample)
    k = next(i for i, t in enumerate(free[0].tokens) if i >= 2 and t not in free[0].tokens[:i])
    stop_token = free[0].tokens[k]           # pretend this token is EOS *and* padding: row 0 must stop right there
    old = tok.eos_ids, tok.pad_id
    tok.eos_ids, tok.pad_id = [stop_token], stop_token
    try:
        r = generate(model, tok, PROMPTS, **sample)
    finally:
        tok.eos_ids, tok.pad_id = old
    assert r[0].finish == "eos" and r[0].tokens == free[0].tokens[:k + 1]
    assert r[0].text == tok.decode(free[0].tokens[:k])
    for a, b in zip(r[1:], free[1:]):  # other rows are unaffected unless they hit that token themselves
        n = b.tokens.index(stop_token) + 1 if stop_token in b.tokens else len(b.tokens)
        assert a.tokens == b.tokens[:n]


def test_finished_rows_leave_the_batch_and_the_others_still_sample_the_policy(model_and_tok):
    model, tok = model_and_tok
    prompts = [list(range(5 + i, 8 + i + i % 4)) for i in range(8)]     # 3 to 6 tokens: positions differ
    sample = dict(max_new_tokens=12, temperature=1.0, seed=1)
    free = generate(model, tok, prompts, **sample)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    old = tok.eos_ids
    tok.eos_ids = sorted({r.tokens[2] for r in free[:4]})    # as EOS these end rows 0-3 within three steps
    try:
        batch = generate(model, tok, prompts, **sample)
    finally:
        tok.eos_ids = old
        hook.remove()
    assert min(sizes) < len(prompts) and sum(r.finish == "eos" for r in batch) >= 4   # the decoding batch shrank
    for r in batch:      # and every row, kept or dropped, was sampled from its own context
        ids = torch.tensor([r.prompt_ids + r.tokens])
        with torch.no_grad():
            lp = reference_logprobs(model, ids)[0, len(r.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, atol=1e-5, rtol=1e-5)


def test_stop_strings_cut_text_and_tokens(model_and_tok):
    model, tok = model_and_tok
    sample = dict(max_new_tokens=24, temperature=1.0, seed=2)
    free = generate(model, tok, PROMPTS, **sample)
    # a stop string the row really produces later on: the clean text of one of its tokens, not seen before it
    row, k = next((b, i) for b, r in enumerate(free) for i in range(2, len(r.tokens))
                  if tok.decode(r.tokens[i:i + 1]).isprintable() and tok.decode(r.tokens[i:i + 1]).strip()
                  and tok.decode(r.tokens[i:i + 1]) not in tok.decode(r.tokens[:i + 1])[:-1])
    stop = tok.decode(free[row].tokens[k:k + 1])
    r = generate(model, tok, PROMPTS, stop=[stop], **sample)[row]
    assert r.finish == "stop"
    assert r.tokens == free[row].tokens[:k + 1]
    assert r.text == tok.decode(free[row].tokens[:k + 1])[:-len(stop)]


def test_continuation_from_a_given_prefix_equals_one_long_generation(model_and_tok):
    model, tok = model_and_tok
    whole = generate(model, tok, PROMPTS[:1], max_new_tokens=16)[0]
    state = PROMPTS[0] + whole.tokens[:6]     # a state s_t = (x, y_<t): the teacher continues from here
    cont = generate(model, tok, [state], max_new_tokens=10)[0]
    assert cont.tokens == whole.tokens[6:16]


def test_score_equals_full_forward_and_shares_each_context(model_and_tok):
    model, tok = model_and_tok
    contexts = [[5, 6, 7, 8], [9, 10]]
    choices = [[[1, 2, 3], [4], [11, 12]], [[7, 7]]]
    scored = score(model, contexts, choices, batch_size=2)
    for ctx, conts, got in zip(contexts, choices, scored):
        for c, lp in zip(conts, got):
            ids = torch.tensor([ctx + c])
            with torch.no_grad():
                ref = reference_logprobs(model, ids)[0, len(ctx) - 1:]
            torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


def test_stop_triggers_belong_to_their_tokenizer_even_when_its_id_is_reused(monkeypatch):
    """CPython gives a new object the id of a freed one; a cache keyed by id would hand the new tokenizer the old
    one's trigger mask. Here every object has the same id, so the reuse happens on every call, not by chance."""
    import generate as sampler

    class Vocab:   # tokenizer-like: token i is texts[i]
        def __init__(self, texts):
            self.texts, self.vocab_size = texts, len(texts)

        def decode_batch(self, seqs):
            return ["".join(self.texts[i] for i in s) for s in seqs]

    monkeypatch.setattr(sampler, "id", lambda obj: 0, raising=False)
    first = Vocab(["a", ":", "b"])
    assert sampler.stop_triggers(first, ["Q:"], 3, "cpu").tolist() == [False, True, False]
    del first
    assert sampler.stop_triggers(Vocab([":", "a", "b"]), ["Q:"], 3, "cpu").tolist() == [True, False, False]


def test_stop_strings_on_real_qwen_tokenizer_gsm8k_format():
    from conftest import TOKENIZER_DIR
    from model import load_tokenizer
    from generate import stop_triggers
    tok = load_tokenizer(TOKENIZER_DIR)
    triggers = stop_triggers(tok, ["Question:"], 151936, "cpu")
    assert triggers[tok.encode(":")[0]] and not triggers[tok.encode(" the")[0]]
