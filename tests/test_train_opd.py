"""On-policy distillation (train_opd.py): the command line, the KL, the state sources, and that it distills.

The world: the `tiny_dir` model with its embeddings scaled up tenfold (the fixture's embeddings have std 0.02,
which caps every logit near 1 and keeps every policy LoRA can reach close to uniform: teacher and student
could hardly disagree), a GSM8K-layout data directory, and a teacher = that base + a random LoRA adapter,
saved as training.py saves checkpoints (base_model and data_dir in its metadata).
"""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import generate as generate_module
import lora
import train_grpo
import train_opd
import training
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """The CPU is shared: one thread per test avoids oversubscription (tiny models gain nothing from two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_world")
    model_dir = str(root / "model")
    shutil.copytree(tiny_dir, model_dir)
    weights = os.path.join(model_dir, "model.safetensors")
    state = load_file(weights)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 10
    save_file(state, weights, metadata={"format": "pt"})
    data_dir = str(root / "data")
    os.makedirs(os.path.join(data_dir, "gsm8k"))
    with open(os.path.join(data_dir, "gsm8k", "train.jsonl"), "w") as f:
        for i in range(16):
            f.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many apples?",
                                "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) + "\n")
    model, tok = load_model(model_dir)
    torch.manual_seed(0)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.05))   # dropout: the teacher must switch it off
    with torch.no_grad():                          # A keeps its random init; B = 0 would make the teacher the base
        for layer in lora.lora_layers(model).values():
            layer.lora_B["default"].normal_(0, 0.2)
    teacher = str(root / "teacher.pt")
    lora.save_checkpoint(teacher, model, {"method": "sft", "data_dir": data_dir, "args": {}, "step": 1})
    return SimpleNamespace(model_dir=model_dir, data_dir=data_dir, teacher=teacher, root=root)


def teacher_and_student(world, student=None):
    """One base with the teacher's adapter and the student's (a checkpoint, or fresh = the base policy)."""
    model, tok = load_model(world.model_dir)
    if student:
        lora.load_adapter(model, student)
    else:
        lora.add_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    lora.load_adapter(model, world.teacher, name="teacher", dropout=0.0)   # as training.Run loads it: frozen, no dropout
    return model, tok


def opd_args(**args):
    defaults = dict(signal="kl", kl="forward", states="student", logit_chunk=1024, device="cpu", cuts=2,
                    continuation_tokens=4, teacher_temperature=0.0, temperature=1.0, max_new_tokens=16,
                    sample_batch_size=64, max_len=1024)
    return SimpleNamespace(**{**defaults, **args})


@torch.no_grad()
def kl_on_student_states(model, tok, n=8, seed=1234):
    """Mean exact KL(teacher || student) over every state of fresh student rollouts (not the training ones)."""
    args = opd_args(max_new_tokens=16)
    examples = [{"question": f"Sam has {i} pens and gets {i + 2} more. How many pens?", "answer": "#### 0"}
                for i in range(n)]
    prompts = [x for x, _ in training.gold_solutions(tok, examples, 1024)]
    teacher = training.Policy(model, tok, "teacher")
    trajectories = train_opd.collect_states(args, model, tok, teacher, prompts, None, seed)
    sup = train_opd.kl_signal(args, model, teacher, trajectories, seed)
    return train_opd.divergences(model, teacher, sup.rows, 1024)[:, 0].mean().item()


def direct_kl(model, trajectories, reverse=False):
    """Reference: each trajectory alone (no padding), full logits under each adapter, float64, state by state."""
    model.eval()
    values = []
    for tr in trajectories:
        ids = torch.tensor([tr.prompt + tr.response])
        with torch.no_grad(), lora.use_adapter(model, "teacher"):
            logp_t = model(ids)[0].double().log_softmax(-1)
        with torch.no_grad(), lora.use_adapter(model, "default"):
            logp_s = model(ids)[0].double().log_softmax(-1)
        for t in range(len(tr.response)):
            pos = len(tr.prompt) + t - 1            # the state (x, y_<t) ends here and predicts y_t
            p, q = (logp_s[pos], logp_t[pos]) if reverse else (logp_t[pos], logp_s[pos])
            values.append((p.exp() * (p - q)).sum())
    return torch.stack(values)


def test_cli_needs_only_the_teacher(world, tmp_path):
    out = str(tmp_path / "opd.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_opd.py"), "--teacher", world.teacher,
                           "--max-steps", "1", "--out", out], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = lora.load_checkpoint(out)
    assert ckpt["meta"]["method"] == "opd" and ckpt["meta"]["teacher"] == {
        "kind": "adapter", "path": world.teacher, "sha256": evaluate.file_sha256(world.teacher)}
    assert ckpt["meta"]["base_model"] == world.model_dir and ckpt["meta"]["data_dir"] == world.data_dir
    model, _ = load_model(world.model_dir)
    lora.load_adapter(model, out)                                   # loadable on the teacher's base
    with open(str(tmp_path / "opd.jsonl")) as f:
        record = json.loads(f.readline())
    for key in ("loss", "kl_forward", "kl_reverse", "state_nll_base", "target_nll", "tokens_per_s"):
        assert key in record, key


@pytest.mark.parametrize("signal", ["kl", "continuation", "sampled-kl"])
def test_opd_lowers_kl_on_the_students_own_states(world, tmp_path, signal):
    model, tok = teacher_and_student(world)
    before = kl_on_student_states(model, tok)
    out = str(tmp_path / f"{signal}.pt")
    # Sampled (T=1) continuations make the cross-entropy an unbiased estimate of the forward KL on those states;
    # the greedy default distills the teacher's mode, which lowers KL only where the teacher is sharp.
    extra = ["--teacher-temperature", "1", "--continuation-tokens", "8"] if signal == "continuation" else []
    train_opd.main(["--teacher", world.teacher, "--signal", signal, "--out", out, "--max-steps", "25",
                    "--batch-size", "4", "--max-new-tokens", "16", "--lr", "1e-2", "--warmup", "0",
                    "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--save-every", "0",
                    "--locality-every", "5"] + extra)
    model, tok = teacher_and_student(world, out)
    after = kl_on_student_states(model, tok)
    assert before > 0.5 and after < 0.4 * before, (before, after)     # typically 0.15-0.25 x before


@pytest.mark.parametrize("states", ["student", "teacher"])
def test_state_source_decides_who_samples_the_states(world, tmp_path, monkeypatch, states):
    calls = []
    real_generate = generate_module.generate

    def recording_generate(model, tok, prompts, **kw):
        merged = any(layer.merged_weight is not None for layer in lora.lora_layers(model).values())
        rollouts = real_generate(model, tok, prompts, **kw)
        calls.append(dict(policy=lora.active_adapter(model), merged=merged, rollouts=rollouts, **kw))
        return rollouts

    monkeypatch.setattr(evaluate, "generate", recording_generate)   # evaluate.gsm8k_rollouts samples every state
    train_opd.main(["--teacher", world.teacher, "--states", states, "--out", str(tmp_path / "s.pt"),
                    "--max-steps", "2", "--batch-size", "3", "--max-new-tokens", "12", "--continuation-tokens", "4",
                    "--save-every", "0", "--locality-every", "0"])
    state_calls = [c for c in calls if c["max_new_tokens"] == 12]
    continuation_calls = [c for c in calls if c["max_new_tokens"] == 4]
    assert len(state_calls) == 2 and len(continuation_calls) == 2
    assert all(c["policy"] == ("default" if states == "student" else "teacher") and c["merged"] for c in state_calls)
    assert all(c["policy"] == "teacher" and c["temperature"] == 0.0 for c in continuation_calls)
    # The sampler's recorded log-probs are the sampling policy's: they match the teacher's own scores exactly when
    # (and only when) the teacher sampled the states. The student is still the base policy at step 1.
    model, tok = teacher_and_student(world)
    first = state_calls[0]["rollouts"][0]
    with lora.use_adapter(model, "teacher"):
        teacher_lp = generate_module.score(model, [first.prompt_ids], [[first.tokens]])[0][0]
    with lora.use_adapter(model, None):
        base_lp = generate_module.score(model, [first.prompt_ids], [[first.tokens]])[0][0]
    sampler_lp = torch.tensor(first.logprobs)
    sampled_by, other = (teacher_lp, base_lp) if states == "teacher" else (base_lp, teacher_lp)
    assert torch.allclose(sampler_lp, sampled_by, atol=1e-4)
    assert not torch.allclose(sampler_lp, other, atol=1e-2)


def test_data_states_are_the_gold_solutions(world):
    model, tok = teacher_and_student(world)
    examples = [{"question": "Tom has 2 apples and buys 5 more. How many apples?", "answer": "2 + 5 = 7\n#### 7"}]
    gold = training.gold_solutions(tok, examples, 1024)
    [tr] = train_opd.collect_states(opd_args(states="data"), model, tok, None, [gold[0][0]], gold, seed=0)
    assert tok.decode(tr.response[:-1]) == " 2 + 5 = 7\n#### 7" and tr.response[-1] == tok.eos_ids[0]
    assert tok.decode(tr.prompt) == "Question: Tom has 2 apples and buys 5 more. How many apples?\nAnswer:"


def test_loading_the_teacher_leaves_the_student_trainable_and_the_teacher_frozen(world):
    model, _ = teacher_and_student(world)
    assert all(p.requires_grad for p in lora.lora_parameters(model, "default"))
    assert not any(p.requires_grad for p in lora.lora_parameters(model, "teacher"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)   # the base


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_exact_kl_matches_a_direct_computation(world, direction):
    model, tok = teacher_and_student(world)
    torch.manual_seed(1)
    with torch.no_grad():                           # a student that differs from the base and from the teacher
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.1)
    # Two lengths in one batch: the short row is padded, and padding must not become states.
    trajectories = [train_opd.Trajectory([3, 40, 41, 42], [50, 51, 52, 53, 54, 1]),
                    train_opd.Trajectory([3, 60], [70, 71, 1])]
    args = opd_args(signal="kl", kl=direction, logit_chunk=4)   # chunks split rows across the batch
    teacher = training.Policy(model, tok, "teacher")
    sup = train_opd.kl_signal(args, model, teacher, trajectories, seed=0)
    assert int(sup.rows.target.sum()) == 9 and int(sup.rows.state.sum()) == 9 - 2
    model.train()
    loss = train_opd.kl_loss(model, teacher, sup.rows, 9, direction, args.logit_chunk)
    reference = direct_kl(model, trajectories, reverse=direction == "reverse")
    other = direct_kl(model, trajectories, reverse=direction == "forward")
    assert loss.item() == pytest.approx(reference.mean().item(), rel=1e-4, abs=1e-6)
    logged = train_opd.divergence_figures(args, model, teacher, [sup])["kl_forward" if direction == "forward" else "kl_reverse"]
    assert logged[0].shape == (9,) and logged[0].mean().item() == pytest.approx(reference.mean().item(), rel=1e-4)
    assert abs(reference.mean() - other.mean()) > 1e-3          # the two directions are different objectives
    loss.backward()
    grads = [p.grad for p in lora.lora_parameters(model) if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in lora.lora_parameters(model, "teacher"))   # the teacher stays frozen


def test_resume_ends_with_the_same_student(world, tmp_path):
    """Stop after 2 of 4 steps and resume: the states (sampled from seeds of the step), the teacher's continuations,
    adapter dropout and AdamW all continue exactly, so the adapter equals an uninterrupted run's."""
    common = ["--teacher", world.teacher, "--max-steps", "4", "--batch-size", "2", "--max-new-tokens", "8",
              "--continuation-tokens", "4", "--lr", "1e-2", "--lora-r", "4", "--save-every", "0"]
    train_opd.main(common + ["--out", str(tmp_path / "whole.pt")])
    train_opd.main(common + ["--out", str(tmp_path / "parts.pt"), "--stop-after", "2"])
    train_opd.main(common + ["--out", str(tmp_path / "parts.pt"), "--resume"])
    whole, parts = (lora.load_checkpoint(str(tmp_path / f"{n}.pt")) for n in ("whole", "parts"))
    assert parts["meta"]["step"] == 4
    for key, t in whole["adapter"].items():
        assert torch.equal(t, parts["adapter"][key]), key


def test_sigterm_checkpoints_the_step_and_resume_ends_with_the_same_student(world, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM in the middle of step 2: the step finishes, its checkpoint is written, the exit code
    is 143, and --resume ends where an uninterrupted run ends."""
    import os
    import signal
    common = ["--teacher", world.teacher, "--max-steps", "4", "--batch-size", "2", "--max-new-tokens", "8",
              "--continuation-tokens", "4", "--lr", "1e-2", "--lora-r", "4", "--save-every", "0"]
    train_opd.main(common + ["--out", str(tmp_path / "whole.pt")])
    real, calls = train_opd.continuation_loss, []

    def loss_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:        # during the second optimizer step (one micro-batch a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(train_opd, "continuation_loss", loss_then_sigterm)
        with pytest.raises(SystemExit) as stop:
            train_opd.main(common + ["--out", str(tmp_path / "cut.pt")])
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"interrupted at step 2; checkpoint {tmp_path / 'cut.pt'}; continue with --resume"
    assert lora.load_checkpoint(str(tmp_path / "cut.pt"))["train_state"]["step"] == 2
    train_opd.main(common + ["--out", str(tmp_path / "cut.pt"), "--resume"])
    whole, cut = (lora.load_checkpoint(str(tmp_path / f"{n}.pt"))["adapter"] for n in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


# ----------------------------------------------------------------------------------------------
# --signal sampled-kl: the reverse KL sampled on the student's own tokens, as a per-token advantage


def test_sampled_kl_of_a_student_equal_to_its_teacher_has_zero_advantage_and_zero_gradient(world, tmp_path):
    out = str(tmp_path / "same.pt")
    train_opd.main(["--teacher", world.teacher, "--init", world.teacher, "--signal", "sampled-kl", "--out", out,
                    "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "16", "--lora-r", "4",
                    "--lora-alpha", "8", "--lora-dropout", "0", "--save-every", "0", "--locality-every", "1"])
    log = [json.loads(line) for line in open(str(tmp_path / "same.jsonl"))]
    for row in log:   # the sampler runs merged weights, the scorer unmerged ones: equal up to float32 rounding
        assert abs(row["reverse_kl_sampled"]) < 1e-5 and row["grad_norm"] < 1e-5, row
        assert row["kl_reverse"] < 1e-6 and all(abs(v) < 1e-5 for v in row["reverse_kl_by_position"])
    a, b = lora.load_checkpoint(out)["adapter"], lora.load_checkpoint(world.teacher)["adapter"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_sampled_kl_expected_gradient_is_the_exact_reverse_kl_gradient():
    """On a 6-token vocabulary: the mean policy-gradient (train_grpo.clipped_loss at ρ = 1) with advantage
    -(log π_S(y) - log π_T(y)), y ~ π_S, is a Monte Carlo estimate of ∇ KL(π_S || π_T)."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(6, generator=gen, dtype=torch.float64).log_softmax(-1)
    logp = theta.log_softmax(-1)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - teacher)).sum(), theta)

    n = 400_000
    y = torch.multinomial(logp.exp().detach(), n, replacement=True, generator=gen)
    grid = torch.zeros(n, 2, dtype=torch.float64)
    target = torch.zeros(n, 2, dtype=torch.bool)
    target[:, 1] = True                                        # one sampled token per row
    grid[target] = (logp[y] - teacher[y]).detach()
    adv = train_opd.sampled_kl_advantage(grid, discount=0.0)[target]
    new = theta.log_softmax(-1)[y]
    figures = {}
    train_grpo.ratio_figures(figures, new, new.detach(), adv, clip_eps=0.2, first=False)
    assert not figures["clip_frac"][0].any()
    (estimate,) = torch.autograd.grad(train_grpo.clipped_loss(new, new.detach(), adv, 1.0 / n, clip_eps=0.2), theta)
    # tolerance: 5 standard errors of the mean, from the per-sample gradients -A (onehot(y) - π_S)
    p = logp.exp().detach()
    per_sample = -adv[:, None] * (torch.nn.functional.one_hot(y, 6).double() - p)
    tolerance = 5 * per_sample.std(0).max().item() / n ** 0.5
    assert torch.allclose(estimate, exact, atol=tolerance), (estimate, exact, tolerance)
    assert exact.abs().max() > 10 * tolerance                  # the test can tell a wrong gradient apart


def test_discounted_advantage_sums_each_rows_future_tokens_only():
    rkl = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0], [0.0, 0.0, 8.0, 16.0, 0.0]])
    target = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    adv = train_opd.sampled_kl_advantage(rkl, discount=0.5)
    torch.testing.assert_close(adv[target], -torch.tensor([1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4, 8 + 0.5 * 16, 16]))
    assert torch.equal(train_opd.sampled_kl_advantage(rkl, 0.0), -rkl)


def test_sampled_kl_runs_from_the_command_line_and_needs_the_students_states(world, tmp_path):
    out = str(tmp_path / "skl.pt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_opd.py"), "--teacher", world.teacher, "--signal",
                        "sampled-kl", "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "12", "--out", out],
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(open(str(tmp_path / "skl.jsonl")).readline())
    for key in ("loss", "reverse_kl_sampled", "reverse_kl_by_position", "kl_reverse", "clip_frac", "state_nll_base"):
        assert key in record, key
    assert record["reverse_kl_sampled"] > 0 and lora.load_checkpoint(out)["meta"]["signal"] == "sampled-kl"
    with pytest.raises(SystemExit):
        train_opd.parse_args(["--teacher", world.teacher, "--signal", "sampled-kl", "--states", "teacher"])


def test_sampled_kl_trains_without_adapter_dropout_by_default(world, tmp_path):
    """Issue 27, bug 2: the policy-gradient ratio is taken against the dropout-free sampler, so the learner runs
    without dropout too (as GRPO does): on-policy, the first update's ratio is 1 and nothing is clipped."""
    out = str(tmp_path / "skl.pt")
    train_opd.main(["--teacher", world.teacher, "--signal", "sampled-kl", "--out", out, "--max-steps", "2",
                    "--batch-size", "2", "--max-new-tokens", "8", "--lora-r", "4", "--save-every", "0"])
    ckpt = lora.load_checkpoint(out)
    assert ckpt["lora"]["dropout"] == 0.0 and ckpt["meta"]["args"]["lora_dropout"] == 0.0
    with open(str(tmp_path / "skl.jsonl")) as f:
        assert json.loads(f.readline())["clip_frac"] == 0.0
    explicit = train_opd.parse_args(["--teacher", "t.pt", "--signal", "sampled-kl", "--lora-dropout", "0.1"])
    assert explicit.lora_dropout == 0.1 and train_opd.parse_args(["--teacher", "t.pt"]).lora_dropout == 0.05
