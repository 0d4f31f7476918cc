"""train_grpo.py: the CLI runs, the policy gradient climbs a reward, advantages, EOS masking, aggregation, clipping."""
import math

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
    assert {"reward", "accuracy", "completion_len", "zero_signal_frac", "kl", "clip_frac", "sample_s", "learn_s",
            "tokens_per_s"} <= set(log[-1])
    assert {"state_nll_base", "target_nll"} <= set(log[0])   # state locality at step 0, every --locality-every
    assert log[-1]["kl"] >= 0  # β > 0: every group is scored, even without signal


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


def test_every_completion_token_is_a_target_with_its_advantage_weight_and_sampler_logprob(tiny_dir):
    _, tok = load_model(tiny_dir)
    eos = tok.eos_ids[0]
    args = train_grpo.parse_args(["--group-size", "2", "--grad-accum", "1", "--scale-rewards", "none"])
    rollouts = [Rollout(prompt_ids=[5, 6, 7], tokens=[8, 9, eos], text="", logprobs=[-1.0, -2.0, -3.0], finish="eos"),
                Rollout(prompt_ids=[5, 6, 7], tokens=[8, 4], text="", logprobs=[-4.0, -5.0], finish="length")]
    [m], figures, groups, tokens = train_grpo.learner_batches(args, rollouts, [{"answer": "#### 1"}],
                                                      lambda r, ex: float(len(r.tokens) == 3))
    rows = m.rows   # sorted by length: the short completion first
    assert rows.ids.tolist() == [[5, 6, 7, 8, 4, 0], [5, 6, 7, 8, 9, eos]] and (groups, tokens) == (1, 5)
    assert rows.target.tolist() == [[False] * 3 + [True] * 2 + [False], [False] * 3 + [True] * 3]   # the EOS too
    assert rows.state.tolist() == [[False] * 3 + [True, False, False], [False] * 3 + [True, True, False]]
    assert m.old.tolist() == [-4.0, -5.0, -1.0, -2.0, -3.0] and m.adv.tolist() == [-0.5] * 2 + [0.5] * 3
    assert m.weights.tolist() == pytest.approx([1 / 5] * 5)      # token-mean over the step's 5 tokens


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "constant"])
def test_loss_aggregation_weights(agg):
    lengths = [2, 6]
    w = train_grpo.token_weights(lengths, agg, max_new_tokens=10, n_total=2, tokens=8)
    per_sequence = [wi * n for wi, n in zip(w, lengths)]
    expected = {"token-mean": [2 / 8, 6 / 8], "seq-mean": [0.5, 0.5], "constant": [2 / 20, 6 / 20]}[agg]
    assert per_sequence == pytest.approx(expected)


def test_clipped_ratio_stops_the_gradient_beyond_the_trust_region(tiny_dir):
    model, tok = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    rows = training.pad_rows([([5, 6, 7], None, [8, 9, 10])] * 2, "cpu")
    new = training.token_logprobs(model, rows.ids, rows.attn, rows.target)
    old = new.detach() - 1.0          # ratio = e: beyond 1 + ε, so the positive-advantage row is clipped
    adv, weights = torch.tensor([1.0] * 3 + [-1.0] * 3), torch.full((6,), 1 / 6)
    figures = {}
    train_grpo.ratio_figures(figures, new, old, adv, clip_eps=0.2, first=False)
    assert figures["clip_frac"][0].mean() == 0.5
    train_grpo.clipped_loss(new, old, adv, weights, clip_eps=0.2).backward()
    # only the negative-advantage row (unclipped, since min() picks ρ·A < clip(ρ)·A there) moves the adapter
    assert sum(p.grad.norm() for p in model.parameters() if p.grad is not None) > 0
    model.zero_grad()
    new = training.token_logprobs(model, rows.ids, rows.attn, rows.target)
    train_grpo.clipped_loss(new, old, adv.clamp(min=0), weights, clip_eps=0.2).backward()   # the clipped row alone
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


def test_the_mismatch_figures_are_the_ratio_to_a_shifted_sampler(tiny_dir, tmp_path):
    """Sampler log-probs shifted by a known δ: the ratio is exp(-δ) at every token (its mean, min and max over the
    step), kl_sample_train is δ."""
    args = train_grpo.parse_args(["--model", tiny_dir, "--data-dir", gsm8k_dir(str(tmp_path / "data")),
                                  "--device", "cpu", "--out", str(tmp_path / "x.pt")])
    run = training.Run(args, {"method": "grpo"})
    rows = training.pad_rows([([5, 6, 7], None, [8, 9, 10, 11]), ([5, 6], None, [8, 9])], "cpu")
    with torch.no_grad():
        new = training.token_logprobs(run.model, rows.ids, rows.attn, rows.target)
    delta, figures = 0.3, {}
    train_grpo.ratio_figures(figures, new, new + 0.3, torch.ones(6), clip_eps=0.2, first=True)
    stats = run.all_reduce(0.0, figures, extremes=("sampling/importance_sampling_ratio",))
    for key in ("/mean", "/min", "/max"):
        assert stats[f"sampling/importance_sampling_ratio{key}"] == pytest.approx(math.exp(-delta), rel=1e-5)
    assert stats["kl_sample_train"] == pytest.approx(delta, rel=1e-5)
