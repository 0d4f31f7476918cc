"""train_grpo.py: the CLI runs, the policy gradient climbs a reward, advantages, EOS masking, aggregation, clipping."""
import pytest
import torch

import train_grpo
import training
from generate import Rollout
from lora import LoraConfig, add_lora, load_adapter, load_checkpoint
from model import load_model
from trainer_helpers import gsm8k_dir, learnable_dir, one_thread, read_log, run_cli  # noqa: F401 (fixtures)


def low_token_fraction(rollout, example) -> float:
    """A synthetic reward the random model can learn: the fraction of completion tokens with id < 100."""
    return sum(t < 100 for t in rollout.tokens) / max(len(rollout.tokens), 1)


def test_cli_runs_end_to_end_and_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "grpo.pt")
    r = run_cli("train_grpo.py", "--model", tiny_dir, "--data-dir", data, "--out", out, "--batch-size", "2",
                "--grad-accum", "2", "--group-size", "4", "--max-new-tokens", "6", "--max-steps", "2", "--beta", "0.1")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["meta"]["method"] == "grpo" and ckpt["meta"]["step"] == 2 and ckpt["meta"]["args"]["beta"] == 0.1
    load_adapter(load_model(tiny_dir)[0], out)
    log = read_log(str(tmp_path / "grpo.jsonl"))
    assert {"reward", "accuracy", "completion_len", "zero_signal_groups", "kl", "clip_frac", "sample_s", "learn_s",
            "state_nll_base", "target_nll", "tokens_per_s"} <= set(log[-1])
    assert log[-1]["groups"] == 4 and log[-1]["kl"] >= 0  # β > 0: every group is scored, even without signal


def test_policy_gradient_climbs_a_synthetic_reward(learnable_dir, tmp_path, one_thread):
    data = gsm8k_dir(str(tmp_path / "data"))
    run = train_grpo.main(["--model", learnable_dir, "--data-dir", data, "--out", str(tmp_path / "pg.pt"),
                           "--batch-size", "4", "--grad-accum", "1", "--group-size", "8", "--max-new-tokens", "8",
                           "--max-steps", "20", "--lr", "2e-2", "--lora-r", "8", "--save-every", "0",
                           "--locality-every", "5"], reward_fn=low_token_fraction)
    log = read_log(run.log)
    rewards = [row["reward"] for row in log]
    assert sum(rewards[:3]) / 3 < 0.3 and sum(rewards[-3:]) / 3 > 0.6
    # the learner has left the base policy: zero KL at the start (fresh adapter), clearly positive later
    assert log[0]["kl"] < 1e-4 < 0.1 < log[15]["kl"]


def test_group_relative_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = train_grpo.advantages(rewards, group_size=4, scale="group")
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5774 + 1e-4), rtol=1e-3, atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal
    torch.testing.assert_close(train_grpo.advantages(rewards, 4, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_completion_tokens_after_the_first_eos_carry_no_loss(tiny_dir):
    _, tok = load_model(tiny_dir)
    eos = tok.eos_ids[0]
    r = Rollout(prompt_ids=[5, 6, 7], tokens=[8, 9, eos, 10, 11], text="", logprobs=[-1.0] * 5, finish="eos")
    ids, attn, target, state, old, adv, w = train_grpo.collate([r], [1.0], [0.5], set(tok.eos_ids), "cpu")
    assert ids[0].tolist() == [5, 6, 7, 8, 9, eos]
    assert target[0].tolist() == [False] * 3 + [True] * 3       # the EOS is the last supervised action
    assert state[0].tolist() == [False] * 3 + [True, True, False]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "constant"])
def test_loss_aggregation_weights(agg):
    lengths = [2, 6]
    w = train_grpo.token_weights(lengths, agg, max_new_tokens=10, n_total=2)
    per_sequence = [wi * n for wi, n in zip(w, lengths)]
    expected = {"token-mean": [2 / 8, 6 / 8], "seq-mean": [0.5, 0.5], "constant": [2 / 20, 6 / 20]}[agg]
    assert per_sequence == pytest.approx(expected)


def test_clipped_ratio_stops_the_gradient_beyond_the_trust_region(tiny_dir):
    model, tok = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    args = train_grpo.parse_args(["--clip-eps", "0.2"])
    r = Rollout([5, 6, 7], [8, 9, 10], "", [0.0] * 3, "length")
    ids, attn, target, *_ = batch = train_grpo.collate([r, r], [1.0, -1.0], [1 / 6, 1 / 6], set(tok.eos_ids), "cpu")
    with torch.no_grad():
        new = training.token_logprobs(model, ids, attn, target)
    old = torch.zeros_like(batch[4])
    old[target] = new - 1.0  # ratio = e: beyond 1 + ε, so the positive-advantage row is clipped
    batch[4] = old
    loss, figures = training.policy_gradient_loss(model, batch, args.temperature, args.clip_eps, args.beta, False)
    loss.backward()
    clipped, tokens = figures["clip_frac"]                      # a figure is (sum, count)
    assert clipped / tokens == 0.5
    # only the negative-advantage row (unclipped, since min() picks ρ·A < clip(ρ)·A there) moves the adapter
    grad_norm = sum(p.grad.norm() for p in model.parameters() if p.grad is not None)
    assert grad_norm > 0
    model.zero_grad()
    batch[5] = batch[5].clamp(min=0)  # keep only the positive (clipped) row's advantage
    loss, _ = training.policy_gradient_loss(model, batch, args.temperature, args.clip_eps, args.beta, False)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_zero_temperature_is_refused_at_parsing(capsys):
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--temperature", "0"])
    assert "argument --temperature: 0 must be greater than 0" in capsys.readouterr().err
    assert train_grpo.parse_args(["--temperature", "0.7"]).temperature == 0.7


def test_the_sampler_learner_mismatch_is_logged_and_is_numerics_only_in_float32(learnable_dir, tmp_path, one_thread):
    """Issue 28: TRL's sampling/importance_sampling_ratio/{min,mean,max} and tinker's kl_sample_train at each batch's
    first update: on CPU in float32 the merged-weight sampler and the unmerged learner agree to 1e-5."""
    data = gsm8k_dir(str(tmp_path / "data"))
    args = train_grpo.main(["--model", learnable_dir, "--data-dir", data, "--out", str(tmp_path / "g.pt"),
                            "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "8", "--max-steps", "4",
                            "--mu", "2", "--save-every", "0", "--lr", "1e-2"], reward_fn=low_token_fraction)
    log = read_log(args.log)
    for row in log[::2]:                            # the first update of each batch of rollouts
        for key in ("min", "mean", "max"):
            assert abs(row[f"sampling/importance_sampling_ratio/{key}"] - 1) < 1e-5, row
        assert abs(row["kl_sample_train"]) < 1e-5
    assert all("kl_sample_train" not in row for row in log[1::2])   # the second update has moved the learner


def test_the_mismatch_figures_are_the_ratio_to_a_shifted_sampler(tiny_dir):
    """Sampler log-probs shifted by a known δ: the ratio is exp(-δ) at every token, kl_sample_train is δ."""
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    ids = torch.randint(2, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids, dtype=torch.bool)
    target = torch.zeros_like(attn)
    target[:, 3:] = True
    with torch.no_grad():
        new = training.token_logprobs(model, ids, attn, target)
    delta, old = 0.3, torch.zeros(target.shape)
    old[target] = new + 0.3
    batch = [ids, attn, target, target.clone(), old, torch.ones(target.shape), target.float() / 8]
    _, figures = training.policy_gradient_loss(model, batch, 1.0, 0.2, 0.0, False)
    sums = {}
    training.add(sums, torch.tensor(0.0), figures)
    stats = training.over_ranks(sums, [], None, 0, None, None)
    for key in ("min", "mean", "max"):
        assert stats[f"sampling/importance_sampling_ratio/{key}"] == pytest.approx(torch.exp(torch.tensor(-delta)).item(),
                                                                                   rel=1e-5)
    assert stats["kl_sample_train"] == pytest.approx(delta, rel=1e-5)
