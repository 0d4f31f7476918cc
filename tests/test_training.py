"""training.py: resume is exact, a NaN stops cleanly, the schedule, token log-probs, batching, state locality."""
import math
import os

import pytest
import torch

import train_grpo
import train_sft
import training
from conftest import reference_logprobs
from lora import LoraConfig, add_lora, load_checkpoint, lora_layers, lora_parameters, save_checkpoint
from model import LoadError, load_model
from test_train_grpo import low_token_fraction
from trainer_helpers import gsm8k_dir, learnable_dir, one_thread, read_log, run_cli  # noqa: F401 (fixtures)


def trainer_argv(method, model_dir, data, out, steps=6):
    common = ["--model", model_dir, "--data-dir", data, "--out", out, "--max-steps", str(steps), "--lora-r", "4",
              "--lr", "1e-2", "--save-every", "2", "--seed", "3"]
    if method == "sft":
        return common + ["--batch-size", "2", "--lora-dropout", "0.1"]  # dropout: the RNG state must resume too
    return common + ["--batch-size", "2", "--group-size", "4", "--max-new-tokens", "6"]


class Crash(RuntimeError):
    pass


training_step = [0]  # the optimizer step being taken (0-based), kept up to date by the track_step fixture


def crash_at(module, name, step, monkeypatch, value=None):
    """Make module.name fail (or return a loss of `value`) on the micro-batches of optimizer step `step` (of a run
    started after this call)."""
    real = getattr(module, name)
    training_step[0] = 0

    def wrapped(*a, **k):
        loss = real(*a, **k)
        if training_step[0] + 1 == step:
            if value is None:
                raise Crash("interrupted")
            return loss * value
        return loss
    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture(autouse=True)
def track_step(monkeypatch):
    """Expose the step being taken to the crash injector: count the optimizer's steps."""
    real = torch.optim.AdamW.step

    def wrapped(optimizer, *a, **k):
        training_step[0] += 1
        return real(optimizer, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", wrapped)


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_resume_ends_with_the_same_adapter_as_an_uninterrupted_run(method, learnable_dir, tmp_path, monkeypatch,
                                                                    one_thread):
    module, loss_name = (train_sft, "sft_loss") if method == "sft" else (train_grpo, "clipped_loss")
    main = module.main if method == "sft" else (lambda argv: train_grpo.main(argv, reward_fn=low_token_fraction))
    data = gsm8k_dir(str(tmp_path / "data"))
    whole = str(tmp_path / "whole.pt")
    main(trainer_argv(method, learnable_dir, data, whole) + ["--snapshots", "0.67"])   # keeps step 4 of 6

    cut = str(tmp_path / "cut.pt")
    with monkeypatch.context() as m:
        crash_at(module, loss_name, 5, m)  # dies in step 5: the checkpoint on disk is step 4's
        with pytest.raises(Crash):
            main(trainer_argv(method, learnable_dir, data, cut))
    assert load_checkpoint(cut)["meta"]["step"] == 4
    snapshot = load_checkpoint(training.snapshot_path(whole, 4))     # the whole run's adapter after step 4
    assert snapshot["train_state"] == {"step": 4, "total_steps": 6} and not training.finished(snapshot)
    assert all(torch.equal(t, load_checkpoint(cut)["adapter"][k]) for k, t in snapshot["adapter"].items())
    main(trainer_argv(method, learnable_dir, data, cut) + ["--resume"])

    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert b["meta"]["step"] == 6 and b["adapter"].keys() == a["adapter"].keys()
    moved = sum(float(t.abs().sum()) for k, t in a["adapter"].items() if k.endswith("lora_B"))
    assert moved > 0
    for k in a["adapter"]:
        assert torch.equal(a["adapter"][k], b["adapter"][k]), k
    # the resumed log holds each step once, and the same figures as the uninterrupted run
    assert [r["loss"] for r in read_log(str(tmp_path / "cut.jsonl"))] == [r["loss"] for r in read_log(str(tmp_path / "whole.jsonl"))]


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(learnable_dir, tmp_path, monkeypatch, one_thread):
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "nan.pt")
    crash_at(train_sft, "sft_loss", 3, monkeypatch, value=float("nan"))
    with pytest.raises(SystemExit, match=r"error: the loss is nan at step 3: .*last good checkpoint .*nan.pt \(step 2\)"):
        training.run(lambda: train_sft.main(trainer_argv("sft", learnable_dir, data, out)))
    ckpt = load_checkpoint(out)
    assert ckpt["meta"]["step"] == 2 and "optimizer" in ckpt["train_state"]  # resumable from the good state
    assert all(torch.isfinite(t).all() for t in ckpt["adapter"].values())
    assert [r["step"] for r in read_log(str(tmp_path / "nan.jsonl"))] == [1, 2]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    lrs = [training.lr_at(s, 100, 1.0, warmup=0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[55] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert training.lr_at(0, 100, 1.0, warmup=0) == 1.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_are_the_full_sequence_logprobs_at_the_masked_tokens(tiny_dir, temperature):
    model, _ = load_model(tiny_dir)
    ids = torch.randint(2, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(3, 9, dtype=torch.bool)
    attn[2, 6:] = False  # right padding
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:], mask[1, 1:3], mask[2, 3:6] = True, True, True
    with torch.no_grad():
        full = reference_logprobs(model, ids, attn, temperature=temperature)
        ours = training.token_logprobs(model, ids, attn, mask, temperature=temperature)
    torch.testing.assert_close(ours, full[mask[:, 1:]], rtol=1e-5, atol=1e-5)


def test_chunked_token_logprobs_give_the_same_values_and_gradients(tiny_dir):
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)   # the same adapter whichever tests ran before
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    ids = torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids, dtype=torch.bool)
    mask = attn.clone()
    mask[:, :3] = False

    def run(chunk):
        lp = training.token_logprobs(model, ids, attn, mask, temperature=0.8, chunk=chunk)
        (lp * torch.arange(lp.numel())).sum().backward()  # position-dependent weights: order matters
        grads = torch.cat([p.grad.flatten() for p in lora_parameters(model)])
        model.zero_grad()
        return lp.detach(), grads
    whole, chunked = run(chunk=10_000), run(chunk=5)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-4, atol=1e-5)  # summation order only


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = training.length_grouped_batches(lengths, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 8 would spread ~78
    assert batches != training.length_grouped_batches(lengths, 8, seed=1)


def test_state_locality_scores_states_under_the_base_and_targets_under_the_learner(tiny_dir, tmp_path):
    args = train_sft.parse_args(["--model", tiny_dir, "--data-dir", gsm8k_dir(str(tmp_path / "data")), "--device", "cpu",
                                 "--lora-r", "4", "--locality-every", "2", "--out", str(tmp_path / "x.pt")])
    run = training.Run(args, {"method": "sft"})
    ids = torch.randint(2, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    rows = training.Rows(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.bool),
                         torch.zeros(2, 8, dtype=torch.bool))
    rows.state[:, 3:7], rows.target[:, 5:] = True, True
    with torch.no_grad():
        base = -reference_logprobs(run.model, ids, rows.attn)[rows.state[:, 1:]].mean().item()
        for p in run.params:
            p.normal_(0, 0.2)
        learner = -reference_logprobs(run.model, ids, rows.attn)[rows.target[:, 1:]].mean().item()
    run.model.train()   # measured without dropout, whatever the mode of the loop
    run.step = 2
    micro = [training.Rows(*(t[:1] for t in rows)), training.Rows(*(t[1:] for t in rows))]   # two micro-batches
    stats = run.all_reduce(0.0, run.locality(micro))
    assert stats["state_nll_base"] == pytest.approx(base, rel=1e-5) != pytest.approx(learner, rel=1e-2)
    assert stats["target_nll"] == pytest.approx(learner, rel=1e-5)
    run.step = 3
    assert run.locality([rows]) == {}                          # only every --locality-every steps


def test_init_from_a_checkpoint_keeps_a_float32_adapter_exactly_on_a_bf16_base(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    save_checkpoint(str(tmp_path / "init.pt"), model, {"method": "sft"})
    args = train_sft.parse_args(["--model", tiny_dir, "--init", str(tmp_path / "init.pt"), "--dtype", "bfloat16",
                                 "--lora-r", "4", "--device", "cpu", "--out", str(tmp_path / "x.pt"),
                                 "--data-dir", gsm8k_dir(str(tmp_path / "data"))])
    run = training.Run(args, {"method": "sft"})
    model, params = run.model, run.params
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    saved = load_checkpoint(str(tmp_path / "init.pt"))["adapter"]
    for (name, t), p in zip(saved.items(), params):
        assert torch.equal(t, p.detach()), name  # lora_parameters and the checkpoint list tensors in one order


def test_init_keeps_the_checkpoints_weights_with_this_runs_dropout_and_refuses_another_rank(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05))   # an SFT adapter, trained with dropout
    init = str(tmp_path / "sft.pt")
    save_checkpoint(init, model, {"method": "sft"})
    argv = ["--model", tiny_dir, "--init", init, "--device", "cpu", "--out", str(tmp_path / "grpo.pt"),
            "--data-dir", gsm8k_dir(str(tmp_path / "data"))]
    # GRPO's premise (the learner scores tokens with the function that sampled them) needs its own dropout, 0
    args = train_grpo.parse_args(argv)
    run = training.Run(args, {"method": "grpo"})
    assert {layer.dropout["default"] for layer in lora_layers(run.model).values()} == {0.0}
    run.start([1, 2], 1)
    run.save(force=True)
    ckpt = load_checkpoint(args.out)
    assert ckpt["lora"]["dropout"] == 0.0 and ckpt["meta"]["args"]["lora_dropout"] == 0.0   # what ran
    with pytest.raises(LoadError, match=r"--lora-r is 8, but --init .*sft.pt holds an adapter with r 16"):
        training.Run(train_grpo.parse_args(argv + ["--lora-r", "8"]), {"method": "grpo"})


def test_logged_figures_weigh_every_token_of_the_step_alike(tiny_dir, tmp_path):
    args = train_sft.parse_args(["--model", tiny_dir, "--data-dir", gsm8k_dir(str(tmp_path / "data")), "--device", "cpu",
                                 "--lora-r", "2", "--out", str(tmp_path / "x.pt")])
    run = training.Run(args, {"method": "sft"})
    micro = [torch.tensor([4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]   # micro-batches of 1 and 6 tokens
    stats = run.all_reduce(2.5, {"state_nll_base": micro})
    assert stats == {"loss": 2.5, "state_nll_base": pytest.approx(10 / 7)}   # not the mean of the two means, 2.5


def test_resume_refuses_flags_or_data_that_differ_from_the_run(tiny_dir, tmp_path):
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "sft.pt")
    argv = ["--model", tiny_dir, "--data-dir", data, "--out", out, "--lora-r", "2", "--batch-size", "2",
            "--max-steps", "4", "--device", "cpu"]
    train_sft.main(argv + ["--stop-after", "2"])
    for flag, value in (("--lr", "3e-4"), ("--seed", "1"), ("--grad-accum", "2"), ("--limit", "6")):
        with pytest.raises(LoadError, match=f"--resume: {flag} is"):
            train_sft.main(argv + ["--resume", flag, value])
    with open(f"{data}/gsm8k/train.jsonl") as f:
        lines = f.readlines()
    with open(f"{data}/gsm8k/train.jsonl", "w") as f:   # the same count of examples, in another order
        f.writelines(lines[::-1])
    with pytest.raises(LoadError, match="the training examples are not those of the run"):
        train_sft.main(argv + ["--resume"])
    with open(f"{data}/gsm8k/train.jsonl", "w") as f:
        f.writelines(lines)
    train_sft.main(argv + ["--resume", "--save-every", "1"])     # where and how often it saves may change
    assert load_checkpoint(out)["meta"]["step"] == 4


def test_token_logprobs_at_temperature_zero_are_what_the_greedy_sampler_records(tiny_dir):
    from generate import generate
    model, tok = load_model(tiny_dir)
    [r] = generate(model, tok, [[5, 6, 7, 8]], max_new_tokens=6, temperature=0)
    ids = torch.tensor([r.prompt_ids + r.tokens])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(r.prompt_ids):] = True
    with torch.no_grad():
        ours = training.token_logprobs(model, ids, torch.ones_like(mask), mask, temperature=0)
    torch.testing.assert_close(ours, torch.tensor(r.logprobs), rtol=1e-5, atol=1e-5)


def test_grpo_mu_stopped_inside_a_cycle_finishes_the_cycle_and_resumes_exactly(learnable_dir, tmp_path, monkeypatch,
                                                                               one_thread, capsys):
    """Issue 27, bug 3: with --mu 2 the second step of a cycle learns on the cycle's rollouts. Ctrl-C during the
    first step used to checkpoint there, and --resume sampled a fresh batch; the run now finishes the cycle, then
    stops, and resuming ends with the uninterrupted run's adapter."""
    import signal
    data = gsm8k_dir(str(tmp_path / "data"))
    argv = lambda out: trainer_argv("grpo", learnable_dir, data, out, steps=4) + ["--mu", "2"]   # noqa: E731
    main = lambda a: train_grpo.main(a, reward_fn=low_token_fraction)   # noqa: E731
    whole, cut = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    main(argv(whole))
    real, calls = train_grpo.clipped_loss, []

    def interrupt_in_the_first_step(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(train_grpo, "clipped_loss", interrupt_in_the_first_step)
        with pytest.raises(SystemExit) as stop:
            main(argv(cut))
    assert stop.value.code == 130 and load_checkpoint(cut)["train_state"]["step"] == 2
    main(argv(cut) + ["--resume"])
    a, b = load_checkpoint(whole)["adapter"], load_checkpoint(cut)["adapter"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB filesystem (tmpfs), which a test fills up; mounting needs root, as on CI and these machines."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root (and mount)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def fill(disk, leave: int = 0):
    """Fill the filesystem, then free `leave` bytes."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    os.truncate(disk / "filler", max(0, os.path.getsize(disk / "filler") - leave))


@pytest.mark.parametrize("what", ["checkpoint", "log"])
def test_a_full_disk_is_one_line_and_leaves_every_file_whole(learnable_dir, tmp_path, small_disk, what):
    """Issue 36: a disk that fills during a checkpoint (or a log line) ends in one line naming the file, exit code 1;
    the previous checkpoint stays whole and the log keeps every line written before, on a real small filesystem."""
    data, out = gsm8k_dir(str(tmp_path / "data")), str(small_disk / "run.pt")
    argv = ["--model", learnable_dir, "--data-dir", data, "--out", out, "--max-steps", "40", "--batch-size", "2",
            "--lora-r", "4", "--save-every", "2", "--locality-every", "0"]
    assert run_cli("train_sft.py", *argv, "--stop-after", "2").returncode == 0
    fill(small_disk, leave=8192 if what == "checkpoint" else 0)   # room for log lines, not for a checkpoint
    r = run_cli("train_sft.py", *argv, "--resume")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: the disk is full (") and "Traceback" not in r.stderr
    assert lines[-1].startswith(f"error: the disk is full ({out if what == 'checkpoint' else out[:-3] + '.jsonl'})")
    ckpt = load_checkpoint(out)
    assert ckpt["meta"]["step"] == 2 and "optimizer" in ckpt["train_state"]   # the previous one, whole, resumable
    steps = [r["step"] for r in read_log(out[:-3] + ".jsonl")]               # every line whole JSON
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert not [p for p in os.listdir(small_disk) if ".tmp" in p]


def test_a_device_this_torch_lacks_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(SystemExit) as stop:
        train_sft.parse_args(["--device", "cuda", "--out", str(tmp_path / "x.pt")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == \
        f"error: argument --device: cuda: this torch ({torch.__version__}) sees no CUDA device (see --help)"


def test_lora_targets_choose_the_projections_and_init_or_resume_refuse_others(tiny_dir, tmp_path):
    """Issue 28: --lora-targets with PEFT's module names; the checkpoint records them; --init and --resume refuse a
    run that asks for other ones."""
    data, out = gsm8k_dir(str(tmp_path / "data")), str(tmp_path / "qv.pt")
    argv = ["--model", tiny_dir, "--data-dir", data, "--lora-r", "2", "--batch-size", "2", "--max-steps", "2",
            "--device", "cpu"]
    train_sft.main(argv + ["--out", out, "--lora-targets", "v_proj,q_proj", "--stop-after", "1"])
    ckpt = load_checkpoint(out)
    assert ckpt["lora"]["targets"] == ["q_proj", "v_proj"]
    assert {k.split(".")[-2] for k in ckpt["adapter"]} == {"q_proj", "v_proj"}
    with pytest.raises(LoadError, match=r"--lora-targets is q_proj.*--init .* holds an adapter with targets q_proj,v_proj"):
        train_sft.main(argv + ["--out", str(tmp_path / "x.pt"), "--init", out, "--lora-targets", "q_proj"])
    with pytest.raises(LoadError, match=r"--resume: --lora-targets is"):
        train_sft.main(argv + ["--out", out, "--resume"])       # the default, all seven, is not the run's
    train_sft.main(argv + ["--out", out, "--resume", "--lora-targets", "q_proj,v_proj"])
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--lora-targets", "q_proj,attn"])


def test_eval_every_logs_validation_accuracy_and_says_what_stands_in_for_a_missing_split(tiny_dir, tmp_path, capsys):
    """Issue 28: --eval-every N logs greedy accuracy on gsm8k/validation.jsonl after every N steps and the last;
    without a validation split the last train problems stand in, and the log says so."""
    import shutil
    data = gsm8k_dir(str(tmp_path / "data"), n=6)
    argv = ["--model", tiny_dir, "--data-dir", data, "--lora-r", "2", "--batch-size", "2", "--max-steps", "5",
            "--device", "cpu", "--eval-every", "2", "--eval-limit", "3"]
    train_sft.main(argv + ["--out", str(tmp_path / "a.pt")])
    assert "no gsm8k/validation.jsonl; val_accuracy is measured on the last 3 train problems" in capsys.readouterr().err
    log = read_log(str(tmp_path / "a.jsonl"))
    assert [r["step"] for r in log if "val_accuracy" in r] == [2, 4, 5]
    shutil.copy(f"{data}/gsm8k/train.jsonl", f"{data}/gsm8k/validation.jsonl")
    seen = []
    real = training.eval_gsm8k
    training.eval_gsm8k = lambda model, tok, problems, **k: (seen.append(problems), real(model, tok, problems, **k))[1]
    try:
        train_sft.main(argv + ["--out", str(tmp_path / "b.pt")])
    finally:
        training.eval_gsm8k = real
    assert "val_accuracy is measured on" not in capsys.readouterr().err
    assert seen[0] == load_gsm8k_first(data, 3) and all(0 <= r["val_accuracy"] <= 1 for r in
                                                          read_log(str(tmp_path / "b.jsonl")) if "val_accuracy" in r)


def load_gsm8k_first(data, n):
    from evaluate import load_gsm8k
    return load_gsm8k("validation", data)[:n]
