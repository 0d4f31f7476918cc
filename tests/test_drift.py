"""drift.py: the distances against references and their defining properties, and one CLI study on a tiny model."""
import json
import os
import random

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

import drift


def rbf_mmd2_reference(X, Y, sigma):
    """The unbiased MMD² written out pair by pair (O(n²) Python loops over a full kernel matrix)."""
    k = lambda a, b: float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma ** 2)))
    X, Y = X.numpy().astype(np.float64), Y.numpy().astype(np.float64)
    m, n = len(X), len(Y)
    xx = sum(k(X[i], X[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(X[i], Y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_equals_direct_pairwise_reference():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(23, 4, generator=g), torch.randn(17, 4, generator=g) + 0.5
    sigma = drift.median_bandwidth(torch.cat([X, Y]))
    assert drift.mmd2(X, Y, sigma) == pytest.approx(rbf_mmd2_reference(X, Y, sigma), abs=1e-12)


def test_median_bandwidth_is_the_median_pairwise_distance():
    Z = torch.tensor([[0.0], [1.0], [3.0], [7.0]])   # pairwise distances 1 2 3 4 6 7 -> median 3.5
    assert drift.median_bandwidth(Z) == pytest.approx(3.5)


def test_blocked_kernel_sums_equal_one_unblocked_matrix():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(50, 6, generator=g), torch.randn(37, 6, generator=g)
    wx, wy = drift.bootstrap_weights(list(range(50)), 5), drift.bootstrap_weights(list(range(37)), 5, seed=1)
    whole = drift.mmd2(X, Y, 2.0, wx, wy, block=10_000)
    for block in (5, 16):
        assert torch.allclose(drift.mmd2(X, Y, 2.0, wx, wy, block=block), whole, rtol=0, atol=1e-12)
        assert drift.mmd2(X, Y, 2.0, block=block) == pytest.approx(drift.mmd2(X, Y, 2.0, block=10_000), abs=1e-12)


def resampled_mmd2_reference(X, Y, ix, iy, sigma):
    """MMD² of the resampled sets X[ix], Y[iy], written out pair by pair; within a set, only pairs of
    different original states count (a copy of a state is not a second, independent sample)."""
    k = lambda a, b: float(torch.exp(-((a - b) ** 2).sum() / (2 * sigma ** 2)))
    within = lambda Z, iz: np.mean([k(Z[a], Z[b]) for a in iz for b in iz if a != b])
    return within(X, ix) + within(Y, iy) - 2 * np.mean([k(X[a], Y[b]) for a in ix for b in iy])


def test_bootstrap_mmd_is_the_estimator_on_resampled_groups():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(12, 3, generator=g).double(), torch.randn(9, 3, generator=g).double()
    groups_x = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4]     # states grouped into prompts
    wx, wy = drift.bootstrap_weights(groups_x, 4), drift.bootstrap_weights(list(range(9)), 4, seed=1)
    boot = drift.mmd2(X, Y, 1.5, wx, wy)
    for b in range(4):
        counts = wx[:, b].long()
        assert all(counts[i] == counts[j] for i in range(12) for j in range(12) if groups_x[i] == groups_x[j])
        ix = torch.arange(12).repeat_interleave(counts).tolist()
        iy = torch.arange(9).repeat_interleave(wy[:, b].long()).tolist()
        assert boot[b].item() == pytest.approx(resampled_mmd2_reference(X, Y, ix, iy, 1.5), abs=1e-12)


def test_bootstrap_is_centred_on_the_estimate():
    # Nearly orthogonal states (like sparse lexical features): pairing a copy of a state with itself
    # (k = 1) would shift every resample up by about 2(1 - mean k)/m, many times the spread.
    g = torch.Generator().manual_seed(5)
    X, Y = [(torch.rand(400, 1024, generator=g) < 0.02).double() for _ in range(2)]
    d = drift.drift(X / X.norm(dim=1, keepdim=True), Y / Y.norm(dim=1, keepdim=True), list(range(400)),
                    list(range(400)), n_bootstrap=100)
    boot = d["mmd2_bootstrap"]
    assert abs(boot["mean"] - d["mmd2"]) < boot["std"]
    assert boot["ci95"][0] < d["mmd2"] < boot["ci95"][1]


def test_two_policies_against_one_baseline_share_its_bandwidth():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(80, 4, generator=g)
    near, far = (drift.drift(base + s * torch.randn(80, 4, generator=g), base, list(range(80)), list(range(80)),
                             n_bootstrap=0) for s in (0.1, 3.0))
    assert near["bandwidth"] == far["bandwidth"] == drift.median_bandwidth(base)   # one scale: comparable MMD²s
    assert near["bandwidth_from"] == "baseline median" and near["mmd2"] < far["mmd2"]


def test_bootstrap_resamples_prompts_for_both_policies_at_once():
    rollouts = [{"prompt_index": i // 2, "tokens": list(range(n))} for i, n in enumerate([5, 9, 3, 7, 4, 8])]
    lengths, groups = drift.states(rollouts, stride=4)
    assert lengths == [[4, 5], [4, 8, 9], [3], [4, 7], [4], [4, 8]]   # generated parts y_<t, the whole rollout last
    assert groups == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]                  # a state's unit is its prompt
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(len(groups), 3, generator=g), torch.randn(6, 3, generator=g)
    groups_y = [0, 1, 1, 2, 2, 2]
    d = drift.drift(X, Y, groups, groups_y, n_bootstrap=50)
    assert d["mmd2_bootstrap"]["over"] == "prompts"
    wx, wy = drift.bootstrap_weights(groups, 50, 0, 3), drift.bootstrap_weights(groups_y, 50, 0, 3)
    for p in range(3):   # constant within a prompt, and the same draws for the policy's and the baseline's states
        rows = wx[torch.tensor(groups) == p]
        assert (rows == rows[0]).all() and torch.equal(rows[0], wy[groups_y.index(p)])
    assert d["mmd2_bootstrap"]["replicates"] == pytest.approx(drift.mmd2(X, Y, d["bandwidth"], wx, wy).tolist())


def test_lexical_features_see_the_generated_part_not_the_prompt():
    tok = type("Tok", (), {"decode": staticmethod(lambda ids: " ".join(f"w{i}" for i in ids))})()
    args = type("Args", (), {"features": "lexical", "hash_dim": 64})()
    rollouts = [{"prompt_index": 0, "prompt_ids": [1, 2], "tokens": [7, 8, 9]},
                {"prompt_index": 1, "prompt_ids": [3, 4, 5], "tokens": [7, 8, 9]}]   # other prompts, same rollout
    lengths, _ = drift.states(rollouts, stride=2)
    X, vocab = drift.embed(rollouts, lengths, args, None, tok)
    assert torch.equal(X[:2], X[2:]) and vocab == {"w7", "w8", "w9"}


def test_sliced_wasserstein_in_one_dimension_is_scipys_wasserstein():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.exponential(size=25) + 0.3
    expected = wasserstein_distance(x, y)
    assert drift.wasserstein_1d(torch.tensor(x)[None], torch.tensor(y)[None]).item() == pytest.approx(expected, rel=1e-12)
    # every direction in 1-D is +-1 and W_1 is symmetric under reflection, so the average is exact too
    got = drift.sliced_wasserstein(torch.tensor(x)[:, None], torch.tensor(y)[:, None], n_projections=16)
    assert got == pytest.approx(expected, rel=1e-12)


def test_jaccard_on_hand_made_sets():
    assert drift.jaccard_distance({"a", "b", "c"}, {"b", "c", "d"}) == pytest.approx(1 - 2 / 4)
    assert drift.jaccard_distance({"a"}, {"b"}) == 1.0
    assert drift.jaccard_distance({"a", "b"}, {"b", "a"}) == 0.0
    assert drift.jaccard_distance(set(), set()) == 0.0


def test_identical_sets_have_zero_drift():
    X = torch.randn(200, 5, generator=torch.Generator().manual_seed(3))
    d = drift.drift(X, X.clone(), list(range(200)), list(range(200)), n_bootstrap=0)
    # the unbiased MMD² of a set with itself is -2(1 - mean k)/(n - 1): slightly negative, never below -2/(n-1)
    assert -2 / 199 <= d["mmd2"] <= 1e-12
    assert d["centroid_l2"] == 0 and d["sliced_wasserstein"] == 0


def test_every_distance_grows_with_a_shift():
    X = torch.randn(200, 5, generator=torch.Generator().manual_seed(4))
    direction = torch.ones(5) / 5 ** 0.5
    runs = [drift.drift(X, X + s * direction, list(range(200)), list(range(200)), n_bootstrap=0)
            for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    for key in ("mmd2", "centroid_l2", "sliced_wasserstein"):
        values = [r[key] for r in runs]
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)
    assert [r["centroid_l2"] for r in runs] == pytest.approx([0.0, 0.5, 1.0, 2.0, 4.0])


def shifted_texts(fraction: float, n=60, seed=0):
    """The same random sentences over 30 words, the first fraction * 30 of those words renamed everywhere."""
    rng = random.Random(seed)
    sentences = [[rng.randrange(30) for _ in range(12)] for _ in range(n)]
    return [" ".join(f"new{i}" if i < fraction * 30 else f"old{i}" for i in s) for s in sentences]


def test_lexical_drift_grows_with_the_fraction_of_new_words():
    base = shifted_texts(0.0)
    X = drift.lexical_features(base)
    vocab = lambda texts: {w for t in texts for w in drift.words(t)}
    runs = []
    for f in (0.0, 0.2, 0.5, 0.8):
        texts = shifted_texts(f)
        d = drift.drift(X, drift.lexical_features(texts), list(range(60)), list(range(60)), n_bootstrap=0)
        runs.append({**d, "jaccard": drift.jaccard_distance(vocab(base), vocab(texts))})
    assert runs[0]["centroid_l2"] == runs[0]["sliced_wasserstein"] == runs[0]["jaccard"] == 0
    for key in ("mmd2", "centroid_l2", "sliced_wasserstein", "jaccard"):
        values = [r[key] for r in runs]
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)


def test_lexical_features_are_deterministic_normalized_ngram_counts():
    X = drift.lexical_features(["Tom has 3 apples.", "tom HAS 3 apples .", ""], dim=64)
    assert torch.equal(X[0], X[1])          # case and spacing do not matter, words and symbols do
    assert X[0].norm().item() == pytest.approx(1.0) and X[2].norm().item() == 0
    assert drift.words("He pays $12 + 3=15.") == ["he", "pays", "$", "12", "+", "3", "=", "15", "."]
    # 5 words + 4 bigrams = 9 grams; the squared norm of the raw counts is 9 when no two share a bucket
    assert (X[0] > 0).sum() <= 9


# ----------------------------------------------------------------------------------------------
# On a tiny random Qwen3


def test_hidden_features_are_mean_pooled_states_of_the_generated_part(tiny_dir):
    from model import load_model
    model, _ = load_model(tiny_dir)
    seqs, starts = [[5, 9, 12, 40, 7, 3], [8, 2, 100]], [2, 1]   # different lengths: one row is left-padded
    rollouts = [{"prompt_ids": s[:a], "tokens": s[a:]} for s, a in zip(seqs, starts)]
    lengths = [[1, 4], [1, 2]]
    X = drift.hidden_features(model, rollouts, lengths)
    # pooled over y_<t, the tokens after the prompt, with the prompt in context
    direct = [model(torch.tensor([s[:a + t]]), return_hidden=True)[0][a:].mean(0)
              for s, a, ls in zip(seqs, starts, lengths) for t in ls]
    assert torch.allclose(X, torch.stack(direct), atol=1e-5)
    # without a prompt, the state's every token
    X = drift.hidden_features(model, [{"prompt_ids": [], "tokens": s} for s in seqs], [[2, 4, 6], [1, 3]])
    direct = [model(torch.tensor([s[:t]]), return_hidden=True)[0].mean(0) for s, ls in zip(seqs, [[2, 4, 6], [1, 3]])
              for t in ls]
    assert torch.allclose(X, torch.stack(direct), atol=1e-5)


def write_retention_data(root, truthfulqa: int, mmlu_rows: int):
    """TruthfulQA questions q0.. and one MMLU subject of rows r0.. in evaluate.py's layouts."""
    (root / "truthfulqa").mkdir(parents=True)
    items = [{"question": f"q{i}", "mc1_targets": {"yes": 1, "no": 0}, "mc2_targets": {"yes": 1, "no": 0}}
             for i in range(truthfulqa)]
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(items))
    (root / "mmlu" / "test").mkdir(parents=True)
    (root / "mmlu" / "test" / "art_test.csv").write_text("".join(f"r{i},a,b,c,d,A\n" for i in range(mmlu_rows)))


def test_retention_contexts_are_never_evaluated_items(tmp_path, monkeypatch):
    import evaluate
    write_retention_data(tmp_path, truthfulqa=10, mmlu_rows=12)
    monkeypatch.setitem(evaluate.DEFAULT_LIMITS, "truthfulqa", 6)   # what evaluate.py scores by default
    monkeypatch.setitem(evaluate.DEFAULT_LIMITS, "mmlu", 8)
    scored = {evaluate.truthfulqa_prompt(f"q{i}") for i in range(6)} | {evaluate.mmlu_prompt(ex) for ex in
              evaluate.stratified_subset(evaluate.load_mmlu("test", str(tmp_path)), 8, 0)}
    contexts, where = drift.retention_prompts(str(tmp_path), 3, "default")
    assert len(contexts) == 6 and not scored & set(contexts)
    assert contexts[:3] == [evaluate.truthfulqa_prompt(f"q{i}") for i in (6, 7, 8)]
    assert where["truthfulqa"]["contexts"] == where["mmlu"]["contexts"] == 3
    # evaluations of every item (--limit 0) leave none, and the output says so
    contexts, where = drift.retention_prompts(str(tmp_path), 3, "all")
    assert contexts == [] and where["truthfulqa"]["from"] == where["mmlu"]["from"] == "none"
    # extra contexts in the data dir are used whatever the evaluations scored
    write_retention_data(tmp_path / "extra", truthfulqa=2, mmlu_rows=2)
    os.rename(tmp_path / "extra" / "truthfulqa" / "mc_task.json", tmp_path / "truthfulqa" / "extra.json")
    (tmp_path / "mmlu" / "extra").mkdir()
    os.rename(tmp_path / "extra" / "mmlu" / "test" / "art_test.csv", tmp_path / "mmlu" / "extra" / "art_extra.csv")
    contexts, where = drift.retention_prompts(str(tmp_path), 3, "all")
    assert contexts[:2] == [evaluate.truthfulqa_prompt(f"q{i}") for i in (0, 1)] and len(contexts) == 4
    assert where["truthfulqa"]["from"] == "truthfulqa/extra.json" and where["mmlu"]["from"] == "mmlu/extra/"


GSM8K_LINES = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
    {"question": "Ann had 10 dollars and spent 3. How much is left?", "answer": "10 - 3 = 7\n#### 7"},
]


def random_adapter_checkpoint(model, path, seed):
    """A LoRA checkpoint whose B is random, so the adapter really changes the policy."""
    import lora
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            B = layer.lora_B["default"]
            B.copy_(torch.randn(B.shape, generator=g) * 0.5)
    lora.save_checkpoint(path, model, {"method": "test", "seed": seed})


def test_cli_writes_drift_json_and_reuses_cached_rollouts(tiny_dir, tmp_path, monkeypatch):
    import shutil
    import evaluate
    import lora
    from model import load_model
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    for task in ("truthfulqa", "mmlu"):   # the retention contexts of the policy KL: the data dir's extra ones
        shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "eval_data", task), tmp_path / "data" / task)
    shutil.copy(tmp_path / "data" / "truthfulqa" / "mc_task.json", tmp_path / "data" / "truthfulqa" / "extra.json")
    shutil.copytree(tmp_path / "data" / "mmlu" / "test", tmp_path / "data" / "mmlu" / "extra")
    for f in os.listdir(tmp_path / "data" / "mmlu" / "extra"):
        os.rename(tmp_path / "data" / "mmlu" / "extra" / f, tmp_path / "data" / "mmlu" / "extra" / f.replace("_test", "_extra"))
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in GSM8K_LINES))
    model, _ = load_model(tiny_dir)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    random_adapter_checkpoint(model, str(tmp_path / "a.pt"), seed=1)
    random_adapter_checkpoint(model, str(tmp_path / "b.pt"), seed=2)

    calls = []
    real_generate = evaluate.generate   # evaluate.gsm8k_rollouts samples drift's state sets
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: calls.append(len(a[2])) or real_generate(*a, **k))
    argv = ["--checkpoint", str(tmp_path / "a.pt"), "--baseline-checkpoint", str(tmp_path / "b.pt"),
            "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "rollouts"),
            "--prompts", "3", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--state-stride", "4",
            "--bootstrap", "20", "--projections", "8", "--device", "cpu"]   # --model comes from the checkpoint
    first = drift.main(argv + ["--out", str(tmp_path / "first.json"), "--retention-prompts", "2"])
    assert calls == [6, 6, 4, 4]     # 3 prompts x 2 samples, once per policy; then 2 + 2 retention contexts, 1 each
    kl = first["policy_kl"]           # against the baseline checkpoint's policy, which is not the policy
    assert len(kl["target"]["per_prompt"]["kl_base_policy"]) == 3 and len(kl["retention"]["per_prompt"]["kl_policy_base"]) == 4
    assert all(kl[w][k] > 0 for w in ("target", "retention") for k in ("kl_base_policy", "kl_policy_base"))
    saved = json.loads((tmp_path / "first.json").read_text())
    assert saved["model"] == tiny_dir and saved["features"] == "lexical"
    assert saved["policy"]["sampled"] and saved["baseline"]["sampled"]
    assert saved["policy"]["cache"] != saved["baseline"]["cache"]          # different checkpoints, different keys
    assert saved["policy"]["rollouts"] == saved["baseline"]["rollouts"] == 6
    assert saved["policy"]["states"] >= 6 and saved["baseline"]["states"] >= 6
    for key in ("mmd2", "mmd", "bandwidth", "centroid_l2", "sliced_wasserstein", "jaccard"):
        assert np.isfinite(saved[key]), key
    assert saved["mmd2_bootstrap"]["resamples"] == 20 and saved["mmd2_bootstrap"]["std"] >= 0
    assert saved["settings"]["state_stride"] == 4
    assert saved["retention_contexts"]["truthfulqa"] == {"from": "truthfulqa/extra.json", "contexts": 2,
                                                         "evaluated": "default"}

    # A second study over the same policies samples nothing, whatever the representation.
    second = drift.main(argv + ["--features", "hidden", "--out", str(tmp_path / "second.json"), "--no-policy-kl"])
    assert calls == [6, 6, 4, 4] and "policy_kl" not in second
    assert not second["policy"]["sampled"] and not second["baseline"]["sampled"]
    assert second["policy"]["cache"] == first["policy"]["cache"]
    assert second["policy"]["states"] == first["policy"]["states"] and second["jaccard"] == first["jaccard"]
    assert len(os.listdir(tmp_path / "rollouts")) == 4


def test_rollout_cache_is_keyed_by_batch_size(tiny_dir, tmp_path):
    import lora
    from model import load_model
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in GSM8K_LINES))
    model, _ = load_model(tiny_dir)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    random_adapter_checkpoint(model, str(tmp_path / "a.pt"), seed=1)
    argv = ["--checkpoint", str(tmp_path / "a.pt"), "--data-dir", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "rollouts"), "--out", str(tmp_path / "d.json"), "--prompts", "2",
            "--samples-per-prompt", "2", "--max-new-tokens", "6", "--bootstrap", "0", "--projections", "4",
            "--device", "cpu", "--no-policy-kl"]
    # batching changes the random stream and the padding, so another batch size may sample other rollouts
    one, two = (drift.main(argv + ["--batch-size", b])["policy"] for b in ("1", "4"))
    assert one["sampled"] and two["sampled"] and one["cache"] != two["cache"]
    again = drift.main(argv + ["--batch-size", "4"])["policy"]
    assert not again["sampled"] and again["cache"] == two["cache"]


def test_policy_kl_is_the_full_softmax_kl_at_every_state_and_zero_for_a_fresh_adapter(tiny_dir):
    import lora
    from model import load_model
    model, _ = load_model(tiny_dir)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0), name="policy")
    g = torch.Generator().manual_seed(0)
    rollouts = [{"prompt_index": i // 2, "prompt_ids": torch.randint(2, 300, (n,), generator=g).tolist(),
                 "tokens": torch.randint(2, 300, (k,), generator=g).tolist()}
                for i, (n, k) in enumerate([(5, 7), (3, 4), (6, 1), (4, 9), (2, 0)])]   # left-padded batches of 3
    fresh = drift.policy_kl(model, rollouts, None, "policy", batch_size=3)
    assert fresh[:4].abs().max() < 1e-9 and fresh[4].isnan().all()     # B = 0: the base itself; no states: NaN
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B["policy"].copy_(torch.randn(layer.lora_B["policy"].shape, generator=g) * 0.5)
    kl = drift.policy_kl(model, rollouts, None, "policy", batch_size=3)
    for r, row in zip(rollouts[:4], kl):
        ids = torch.tensor([r["prompt_ids"] + r["tokens"]])
        with torch.no_grad(), lora.use_adapter(model, None):
            lp0 = model(ids)[0].double().log_softmax(-1)
        with torch.no_grad(), lora.use_adapter(model, "policy"):
            lp = model(ids)[0].double().log_softmax(-1)
        at = slice(len(r["prompt_ids"]) - 1, len(ids[0]) - 1)          # the states s_t, t = 0 .. |y| - 1
        forward = (lp0.exp() * (lp0 - lp)).sum(-1)[at].mean().item()     # KL(π0 ‖ π)
        reverse = (lp.exp() * (lp - lp0)).sum(-1)[at].mean().item()      # KL(π ‖ π0)
        assert forward > 1e-3 and reverse > 1e-3
        assert row.tolist() == pytest.approx([forward, reverse], rel=1e-4)
    assert drift.per_prompt(kl[:4, 0], rollouts[:4]) == pytest.approx([kl[:2, 0].mean().item(), kl[2:4, 0].mean().item()])
