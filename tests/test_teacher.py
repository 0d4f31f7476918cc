"""On-policy distillation from a model of another size (train_opd.py --model S --teacher T): every signal and state
source, the exact KL over the ids both tokenizers define, resume, and the one-line refusals.

The pair: trainer_helpers' learnable student (hidden 64, 2 layers, 1,000 embedding rows) and a larger random teacher
(hidden 96, 3 layers, untied head, 1,024 rows: padded further than the student), sharing one byte-level tokenizer
of 300 ids. The teacher's generation_config lists a second EOS id, as a post-trained Qwen3 adds <|im_end|>.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import export
import lora
import train_opd
import training
from conftest import make_hf_model
from model import LoadError, load_model
from test_distributed import launch
from trainer_helpers import REPO, gsm8k_dir, learnable_model_dir, one_thread, read_log  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_pair")
    student = learnable_model_dir(str(root / "student"))
    teacher = str(root / "teacher")
    make_hf_model(teacher, vocab_size=1024, seed=5, initializer_range=0.2, **TEACHER)
    shutil.copy(os.path.join(student, "tokenizer.json"), teacher)
    with open(os.path.join(teacher, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 2], "pad_token_id": 1}, f)
    return student, teacher, gsm8k_dir(str(root / "data"), n=16)


def opd(pair, out, *flags):
    student, teacher, data = pair
    return train_opd.main(["--model", student, "--teacher", teacher, "--data-dir", data, "--out", str(out),
                           "--batch-size", "4", "--max-new-tokens", "12", "--continuation-tokens", "4", "--cuts", "2",
                           "--lora-r", "4", "--lora-alpha", "8", "--save-every", "0", *flags])


def run_for(pair, tmp_path, *flags):
    """A training.Run as train_opd builds it (its teacher loaded), without training."""
    student, teacher, data = pair
    args = train_opd.parse_args(["--model", student, "--teacher", teacher, "--data-dir", data,
                                 "--out", str(tmp_path / "r.pt"), *flags])
    return training.Run(args, {"method": "opd"}, teacher=teacher)


def test_the_teacher_is_frozen_in_the_students_dtype_with_its_own_head_cut_to_the_shared_ids(pair, tmp_path):
    run = run_for(pair, tmp_path, "--dtype", "bfloat16")
    teacher = run.teacher
    assert teacher.model is not run.model and teacher.adapter is None
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.model.parameters()}          # no optimizer state for the teacher
    assert teacher.model.lm_head.weight.shape == (300, 96) and run.model.lm_head.weight.shape == (300, 64)
    assert run.model.embed_tokens.weight.shape == (1000, 64)                  # the embedding keeps its rows
    assert teacher.tok.eos_ids == [1, 2] and run.tok.eos_ids == [1]           # continuations stop at either
    assert run.meta["teacher"]["kind"] == "model" and len(run.meta["teacher"]["sha256"]) == 64


@pytest.mark.parametrize("signal,states", [("continuation", "student"), ("kl", "student"), ("sampled-kl", "student"),
                                           ("continuation", "teacher"), ("kl", "data"), ("kl", "teacher")])
def test_every_signal_and_state_source_runs_and_its_adapter_loads_on_the_student_and_exports(
        pair, tmp_path, signal, states):
    out = tmp_path / "s.pt"
    opd(pair, out, "--signal", signal, "--states", states, "--max-steps", "2", "--locality-every", "1")
    records = read_log(str(tmp_path / "s.jsonl"))
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["kl_forward"] > 0 and records[0]["kl_reverse"] > 0
    model, _ = load_model(pair[0])
    lora.load_adapter(model, str(out))                                   # the student's base takes it
    if signal == "continuation" and states == "student":
        export.main(["export", str(out), "--merged", str(tmp_path / "merged"), "--peft", str(tmp_path / "peft")])
        merged, _ = load_model(str(tmp_path / "merged"))
        ids = torch.tensor([[5, 40, 41, 42, 7]])
        with torch.no_grad(), lora.merged(model):
            torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def kl_on_student_states(student, tok, teacher, seed=1234):
    """Mean exact KL(teacher || student) over every state of 8 fresh student rollouts (not the training ones)."""
    args = train_opd.parse_args(["--teacher", "t", "--max-new-tokens", "16"])
    examples = [{"question": f"Sam has {i} pens and gets {i + 2} more. How many pens?", "answer": "#### 0"}
                for i in range(8)]
    prompts = [x for x, _ in training.gold_solutions(tok, examples, 1024)]
    sup = train_opd.kl_signal(args, student, teacher, train_opd.collect_states(args, student, tok, teacher, prompts,
                                                                               None, seed), seed)
    return train_opd.divergences(student, teacher, sup.rows, 1024)[:, 0].mean().item()


@pytest.mark.parametrize("signal", ["kl", "continuation", "sampled-kl"])
def test_each_signal_lowers_the_students_divergence_from_a_larger_teacher(pair, tmp_path, signal):
    run = run_for(pair, tmp_path)
    before = kl_on_student_states(run.model, run.tok, run.teacher)
    out = tmp_path / f"{signal}.pt"
    extra = ["--teacher-temperature", "1", "--continuation-tokens", "8"] if signal == "continuation" else []
    opd(pair, out, "--signal", signal, "--max-steps", "40", "--max-new-tokens", "16", "--lr", "3e-2", "--warmup", "0",
        "--lora-dropout", "0", "--locality-every", "0", "--lora-r", "16", "--lora-alpha", "32", *extra)
    student, tok = load_model(pair[0])
    lora.load_adapter(student, str(out))
    student.lm_head.weight = torch.nn.Parameter(student.lm_head.weight[:300], requires_grad=False)   # as Run cuts it
    after = kl_on_student_states(student, tok, run.teacher)
    # A random teacher of another shape is far from the student (about 3.4 nats) and LoRA closes part of it: after
    # 40 steps the three signals measured 0.65, 0.65 and 0.78 x before.
    assert before > 1 and after < 0.85 * before, (before, after)


def test_the_exact_kl_runs_over_the_shared_ids_and_equals_a_full_softmax_with_the_two_models(pair, tmp_path):
    """Reference: each trajectory alone, the two models' whole logits (the teacher freshly loaded, its head uncut),
    float64, state by state, over the 300 ids the tokenizer defines: the student has 1,000 rows and the teacher
    1,024, and the padded rows never get probability."""
    run = run_for(pair, tmp_path)
    with torch.no_grad():
        for p in lora.lora_parameters(run.model):   # a student that is not its base
            p.normal_(0, 0.1)
    trajectories = [train_opd.Trajectory([3, 40, 41, 42], [50, 51, 52, 53, 54, 1]),
                    train_opd.Trajectory([3, 60], [70, 71, 1])]
    args = train_opd.parse_args(["--teacher", "t", "--logit-chunk", "4"])   # chunks split rows across the batch
    sup = train_opd.kl_signal(args, run.model, run.teacher, trajectories, seed=0)
    kl = train_opd.divergences(run.model, run.teacher, sup.rows, 4).double()
    teacher, _ = load_model(pair[1], dtype=torch.float64)
    student, _ = load_model(pair[0], dtype=torch.float64)   # the same student, its head uncut
    lora.save_checkpoint(str(tmp_path / "student.pt"), run.model, {"method": "opd"})
    lora.load_adapter(student, str(tmp_path / "student.pt"), dtype=torch.float64)
    reference, whole = [], []
    for tr in trajectories:
        ids = torch.tensor([tr.prompt + tr.response])
        with torch.no_grad():
            s, t = student(ids)[0], teacher(ids)[0]
        assert s.shape[-1] == 1000 and t.shape[-1] == 1024
        for pos in range(len(tr.prompt) - 1, len(tr.prompt) + len(tr.response) - 1):
            p, q = t[pos, :300].log_softmax(-1), s[pos, :300].log_softmax(-1)
            reference.append(torch.stack([(p.exp() * (p - q)).sum(), (q.exp() * (q - p)).sum()]))
            p, q = t[pos, :1000].log_softmax(-1), s[pos].log_softmax(-1)
            whole.append((p.exp() * (p - q)).sum())
    reference = torch.stack(reference)
    torch.testing.assert_close(kl, reference, rtol=1e-4, atol=1e-6)
    assert (reference[:, 0] - torch.stack(whole)).abs().max() > 1e-3   # the padded rows would have changed it


def test_resume_with_a_model_teacher_ends_with_the_same_student_and_refuses_another_teacher(pair, tmp_path):
    flags = ["--max-steps", "4", "--lr", "1e-2"]
    opd(pair, tmp_path / "whole.pt", *flags)
    opd(pair, tmp_path / "parts.pt", *flags, "--stop-after", "2")
    opd(pair, tmp_path / "parts.pt", *flags, "--resume")
    whole, parts = (lora.load_checkpoint(str(tmp_path / f"{n}.pt")) for n in ("whole", "parts"))
    assert parts["meta"]["step"] == 4 and parts["meta"]["teacher"] == whole["meta"]["teacher"]
    for key, t in whole["adapter"].items():
        assert torch.equal(t, parts["adapter"][key]), key
    # The same path, other weights: the record's sha256 tells them apart.
    other = str(tmp_path / "teacher")
    shutil.copytree(pair[1], other)
    moved = (pair[0], other, pair[2])
    opd(moved, tmp_path / "cut.pt", *flags, "--stop-after", "2")
    make_hf_model(other, vocab_size=1024, seed=6, initializer_range=0.2, **TEACHER)
    with pytest.raises(LoadError, match="the teacher is not the run's"):
        opd(moved, tmp_path / "cut.pt", *flags, "--resume")


def test_two_ranks_with_a_model_teacher_resume_to_the_uninterrupted_student(pair, tmp_path):
    student, teacher, data = pair
    flags = ["--model", student, "--teacher", teacher, "--data-dir", data, "--batch-size", "4", "--max-steps", "4",
             "--max-new-tokens", "8", "--continuation-tokens", "4", "--lora-r", "4", "--save-every", "0"]
    whole, cut = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    launch(2, "train_opd.py", *flags, "--out", whole)
    launch(2, "train_opd.py", *flags, "--out", cut, "--stop-after", "2")
    launch(2, "train_opd.py", *flags, "--out", cut, "--resume")
    a, b = (lora.load_checkpoint(p)["adapter"] for p in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, os.path.join(REPO, "train_opd.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_refusals_are_one_line_before_anything_is_written(pair, tmp_path):
    student, teacher, data = pair
    other = str(tmp_path / "other_vocab")   # the teacher's weights, another tokenizer (trained on other text)
    shutil.copytree(teacher, other)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Sam buys 12 pens; each costs $3."] * 20, trainer)
    tok.save(os.path.join(other, "tokenizer.json"))
    adapter = str(tmp_path / "adapter_of_teacher.pt")   # an adapter of another base than --model's
    t, _ = load_model(teacher)
    lora.add_lora(t, lora.LoraConfig(r=2, alpha=4))
    lora.save_checkpoint(adapter, t, {"method": "sft", "base_model": teacher, "data_dir": data})
    out = tmp_path / "new" / "opd.pt"
    for flags, says in [(["--model", student, "--teacher", other], "does not share the tokenizer"),
                        (["--teacher", teacher], "name the student with --model"),
                        (["--model", student, "--teacher", adapter], "is an adapter of"),
                        (["--teacher", str(tmp_path / "missing.pt")], "does not exist")]:
        r = cli(*flags, "--data-dir", data, "--out", str(out), "--max-steps", "1")
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(f in r.stderr for f in flags[1::2]) and not os.path.exists(out.parent)   # names both models
