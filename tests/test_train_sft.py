"""train_sft.py: the CLI writes a loadable checkpoint, the loss on a few examples goes to zero, prompts carry no loss."""
import pytest
import torch

import train_sft
import training
from conftest import reference_logprobs
from evaluate import load_gsm8k
from generate import Rollout
from lora import LoraConfig, add_lora, load_adapter, load_checkpoint, lora_parameters
from model import load_model
from trainer_helpers import gsm8k_dir, learnable_dir, one_thread, read_log, run_cli  # noqa: F401 (fixtures)


def rows(pairs):
    """SFT's micro-batch of (prompt, gold answer) pairs: the answer tokens are the targets, their prefixes the states."""
    return training.pad_rows([(prompt, None, answer) for prompt, answer in pairs], "cpu")


def test_cli_runs_end_to_end_and_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "sft.pt")
    r = run_cli("train_sft.py", "--model", tiny_dir, "--data-dir", data, "--out", out, "--preset", "stress",
                "--lora-r", "4", "--batch-size", "2", "--max-steps", "3", "--save-every", "2")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out)
    meta = ckpt["meta"]
    assert meta["method"] == "sft" and meta["preset"] == "stress" and meta["step"] == 3
    assert meta["base_model"] == tiny_dir and meta["data_dir"] == data
    assert meta["args"]["lr"] == 5e-4 and meta["args"]["lora_alpha"] == 128  # from the preset ...
    assert ckpt["lora"]["r"] == 4                                               # ... unless given explicitly
    assert training.finished(ckpt) and "optimizer" not in ckpt["train_state"]
    model, _ = load_model(tiny_dir)
    load_adapter(model, out)
    log = read_log(str(tmp_path / "sft.jsonl"))
    assert [row["step"] for row in log] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "state_nll_base", "target_nll"} <= set(log[0])


def test_presets_fill_only_the_flags_not_given():
    mild = train_sft.parse_args(["--preset", "mild"])
    assert (mild.epochs, mild.lr, mild.lora_r, mild.lora_alpha) == (1.0, 1e-4, 16, 32)
    stress = train_sft.parse_args(["--preset", "stress", "--lr", "1e-3"])
    assert (stress.epochs, stress.lr, stress.lora_r, stress.lora_alpha) == (5.0, 1e-3, 64, 128)
    assert stress.out == "ckpt/sft_stress.pt"


def test_sft_drives_the_loss_on_a_handful_of_examples_toward_zero(learnable_dir, tmp_path, one_thread):
    data = gsm8k_dir(str(tmp_path / "data"), n=4)
    run = train_sft.main(["--model", learnable_dir, "--data-dir", data, "--out", str(tmp_path / "sft.pt"),
                          "--batch-size", "4", "--max-steps", "60", "--lr", "2e-2", "--lora-r", "8",
                          "--lora-dropout", "0", "--warmup", "0", "--save-every", "0", "--locality-every", "20"])
    losses = [row["loss"] for row in read_log(run.log)]
    assert losses[0] > 5 and losses[-1] < 0.05
    # dataset states: their tokens stay as surprising to the base as ever while the learner fits them
    first, last = read_log(run.log)[0], read_log(run.log)[40]
    assert last["state_nll_base"] == pytest.approx(first["state_nll_base"], rel=1e-4)
    assert last["target_nll"] < 0.1 * first["target_nll"]


def test_prompt_tokens_carry_no_loss(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir)
    pairs = training.gold_solutions(tok, load_gsm8k("train", gsm8k_dir(str(tmp_path / "data"), n=3)), max_len=1024)
    ids, attn, target, state = rows(pairs)
    for row, (prompt, answer) in enumerate(pairs):
        assert target[row].nonzero().flatten().tolist() == list(range(len(prompt), len(prompt) + len(answer)))
        assert answer[-1] == tok.eos_ids[0]
    loss = train_sft.sft_loss(model, rows(pairs), normalizer=int(target.sum()))
    # the same number by brute force: every token's full-vocabulary log-prob, averaged over answer tokens only
    with torch.no_grad():
        logp = reference_logprobs(model, ids, attn)
    expected = -(logp * target[:, 1:]).sum() / target.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    pairs = training.gold_solutions(tok, load_gsm8k("train", gsm8k_dir(str(tmp_path / "data"), n=4)), max_len=1024)
    pairs[0] = (pairs[0][0], pairs[0][1][:3])  # unequal answer lengths: a per-micro-batch mean would differ

    def grads(micro):
        n = sum(int(b.target.sum()) for b in micro)
        for b in micro:
            train_sft.sft_loss(model, b, n).backward()
        g = torch.cat([p.grad.flatten() for p in lora_parameters(model)])
        model.zero_grad()
        return g
    whole = grads([rows(pairs)])
    split = grads([rows(pairs[:1]), rows(pairs[1:])])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# --states learner: Eq. 5 on the learner's own accepted completions (rejection-sampling fine-tuning)


def scripted_sampler(tok, examples, correct_copies):
    """A stand-in for the learner's sampler: copy j of each prompt's G answers "#### gold" when j is in
    correct_copies(prompt index), else "#### -1"; the rollouts end with EOS, as sampled ones do."""
    index = {tuple(p): i for i, (p, _) in enumerate(training.gold_solutions(tok, examples, 1024))}

    def sample(model, tok_, prompts, policy, max_new_tokens, temperature, seed, batch_size):
        seen, out = {}, []
        for p in prompts:
            i = index[tuple(p)]
            j = seen[i] = seen.get(i, -1) + 1
            gold = examples[i]["answer"].split("#### ")[1]
            text = f" so #{i}.{j} #### {gold if j in correct_copies(i) else -1}"
            out.append(Rollout(list(p), tok.encode(text) + tok.eos_ids[:1], text, [0.0] * 99, "eos"))
        return out
    return sample


def trained_texts(tok, monkeypatch):
    """Record the target tokens of every micro-batch sft_loss sees, decoded per row."""
    seen, real = [], train_sft.sft_loss

    def recording(model, batch, *a, **k):
        ids, _, target, _ = batch
        seen.extend(tok.decode([t for t, m in zip(row.tolist(), mask.tolist()) if m]) for row, mask in zip(ids, target))
        return real(model, batch, *a, **k)
    monkeypatch.setattr(train_sft, "sft_loss", recording)
    return seen


@pytest.mark.parametrize("keep", [1, 2])
def test_learner_states_train_only_on_accepted_completions(tiny_dir, tmp_path, monkeypatch, keep, one_thread):
    data = gsm8k_dir(str(tmp_path / "data"), n=4)
    examples = load_gsm8k("train", data)
    _, tok = load_model(tiny_dir)
    # prompt i: copies 1 and 3 of 4 correct for even i; none for odd i
    monkeypatch.setattr(train_sft, "gsm8k_rollouts", scripted_sampler(tok, examples, lambda i: {1, 3} if i % 2 == 0 else set()))
    seen = trained_texts(tok, monkeypatch)
    run = train_sft.main(["--model", tiny_dir, "--data-dir", data, "--out", str(tmp_path / "rft.pt"), "--states", "learner",
                          "--group-size", "4", "--keep", str(keep), "--batch-size", "4", "--max-steps", "1",
                          "--save-every", "0"])
    expected = sorted(f" so #{i}.{j} #### {examples[i]['answer'].split('#### ')[1]}<|endoftext|>"
                      for i in (0, 2) for j in (1, 3)[:keep])
    assert sorted(s.replace(tok.decode(tok.eos_ids[:1]), "<|endoftext|>") for s in seen) == expected
    log = read_log(run.log)[0]
    assert log["accepted"] == 4 / 16 and log["kept"] == 2 * keep / 16 and log["prompts_solved"] == 0.5
    assert log["state_nll_base"] > 0 and log["grad_norm"] > 0


def test_learner_states_with_nothing_accepted_make_no_update(tiny_dir, tmp_path, monkeypatch, one_thread):
    data = gsm8k_dir(str(tmp_path / "data"), n=4)
    examples = load_gsm8k("train", data)
    _, tok = load_model(tiny_dir)
    monkeypatch.setattr(train_sft, "gsm8k_rollouts", scripted_sampler(tok, examples, lambda i: set()))
    seen, real, moved = trained_texts(tok, monkeypatch), torch.optim.AdamW.step, []

    def watched(optimizer, *a, **k):     # the parameters and AdamW's state around each optimizer step
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        out = real(optimizer, *a, **k)
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, params)) or bool(optimizer.state))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", watched)
    run = train_sft.main(["--model", tiny_dir, "--data-dir", data, "--out", str(tmp_path / "none.pt"), "--states",
                          "learner", "--group-size", "2", "--batch-size", "2", "--max-steps", "3", "--save-every", "0"])
    assert seen == [] and moved == [False] * 3
    assert [r["kept"] for r in read_log(run.log)] == [0.0] * 3 and load_checkpoint(run.out)["meta"]["step"] == 3


def test_learner_states_run_from_the_command_line(tiny_dir, tmp_path):
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "learner.pt")
    r = run_cli("train_sft.py", "--model", tiny_dir, "--data-dir", data, "--out", out, "--states", "learner",
                "--group-size", "2", "--max-new-tokens", "8", "--batch-size", "2", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["meta"]["states"] == "learner"
    assert {"kept", "accepted", "prompts_solved", "loss"} <= set(read_log(str(tmp_path / "learner.jsonl"))[-1])
