"""Bad input and interruption, through the real command lines: every user mistake below ends in one line,
`error: ...`, that names the file or flag, a non-zero exit code and no file written; Ctrl-C in a trainer
checkpoints the steps done, and --resume then ends with the uninterrupted run's adapter."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
from lora import LoraConfig, add_lora, load_checkpoint, save_checkpoint
from cli import run as cli
from model import load_model
from trainer_helpers import REPO, gsm8k_dir, learnable_dir, read_log, run_cli  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Good and broken inputs side by side: model directories, checkpoints and data directories."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {"model": tiny_dir, "data": gsm8k_dir(str(root / "data"))}
    shutil.copy(os.path.join(paths["data"], "gsm8k", "train.jsonl"), os.path.join(paths["data"], "gsm8k", "test.jsonl"))

    def model_copy(name, edit):
        path = str(root / name)
        shutil.copytree(tiny_dir, path)
        edit(path)
        return path

    def truncate(path):
        with open(os.path.join(path, "model.safetensors"), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(path, "model.safetensors")) // 2)
    paths["bad_json"] = model_copy("bad_json", lambda p: open(os.path.join(p, "config.json"), "w").write('{"model_type": '))
    paths["truncated"] = model_copy("truncated", truncate)
    paths["bad_tokenizer"] = model_copy("bad_tokenizer", lambda p: open(os.path.join(p, "tokenizer.json"), "w").write("x"))
    other = model_copy("other_base", lambda p: None)

    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=2))
    state = {"step": 1, "total_steps": 2, "optimizer": {}, "data": {"epoch": 0, "index": 1}, "rng": {}}
    paths["sft_unfinished"] = str(root / "sft_unfinished.pt")
    save_checkpoint(paths["sft_unfinished"], model, {"method": "sft"}, train_state=state)
    paths["sft_finished"] = str(root / "sft_finished.pt")
    save_checkpoint(paths["sft_finished"], model, {"method": "sft"}, train_state={"step": 2, "total_steps": 2})
    model.name_or_path = other
    paths["other_base_ckpt"] = str(root / "other_base.pt")
    save_checkpoint(paths["other_base_ckpt"], model, {"method": "sft"})
    paths["text_file"] = str(root / "notes.pt")
    with open(paths["text_file"], "w") as f:
        f.write("not a checkpoint\n")
    paths["tensors_file"] = str(root / "tensors.pt")
    torch.save({"weight": torch.zeros(2)}, paths["tensors_file"])

    def data_copy(name, lines):
        path = gsm8k_dir(str(root / name))
        with open(os.path.join(path, "gsm8k", "train.jsonl"), "w") as f:
            f.writelines(lines)
        return path
    good = open(os.path.join(paths["data"], "gsm8k", "train.jsonl")).readlines()
    paths["broken_line"] = data_copy("broken_line", good[:2] + ['{"question": "Tom has"\n'] + good[3:])
    paths["missing_field"] = data_copy("missing_field", good[:1] + [json.dumps({"question": "Tom?"}) + "\n"])
    paths["empty"] = data_copy("empty", [])
    paths["a_file"] = str(root / "a_file")
    open(paths["a_file"], "w").close()
    return paths


SFT = ["train_sft.py", "--model", "{model}", "--data-dir", "{data}", "--max-steps", "1", "--lora-r", "2"]
GRPO = ["train_grpo.py", "--model", "{model}", "--data-dir", "{data}", "--max-steps", "1"]
EVAL = ["evaluate.py", "--model", "{model}", "--data-dir", "{data}", "--tasks", "gsm8k", "--limit", "2"]
DRIFT = ["drift.py", "--model", "{model}", "--data-dir", "{data}", "--prompts", "2", "--retention-prompts", "0"]

# name: (command line, a fragment of the one error line). {out} is a fresh directory that must stay empty.
CASES = {
    "config.json is not JSON": (SFT + ["--model", "{bad_json}"], "config.json is not valid JSON"),
    "truncated safetensors": (EVAL + ["--model", "{truncated}"], "model.safetensors is not a readable safetensors file"),
    "broken tokenizer.json": (["generate.py", "--model", "{bad_tokenizer}"], "tokenizer.json could not be read"),
    "a text file as checkpoint": (EVAL + ["--checkpoint", "{text_file}"], "is not a LoRA checkpoint of this project"),
    "a tensor file as checkpoint": (DRIFT + ["--checkpoint", "{tensors_file}"], "is not a LoRA checkpoint of this project"),
    "a checkpoint of another base": (DRIFT + ["--checkpoint", "{other_base_ckpt}"], "was trained on"),
    "resume another method's run": (GRPO + ["--resume", "--out", "{sft_unfinished}"], "is a 'sft' run, not 'grpo'"),
    "resume a finished run": (SFT + ["--resume", "--out", "{sft_finished}"], "is a finished run"),
    "resume without a checkpoint": (SFT + ["--resume"], "does not exist (nothing to resume"),
    "unreadable JSONL line": (SFT + ["--data-dir", "{broken_line}"], "train.jsonl line 3 is not valid JSON"),
    "a row without its field": (SFT + ["--data-dir", "{missing_field}"], "line 2 has no field 'answer'"),
    "an empty training set": (SFT + ["--data-dir", "{empty}"], "train.jsonl holds no examples"),
    "batch size 0": (SFT + ["--batch-size", "0"], "argument --batch-size: 0 is below 1"),
    "learning rate nan": (SFT + ["--lr", "nan"], "argument --lr: nan is not a finite number"),
    "negative learning rate": (GRPO + ["--lr=-1e-4"], "argument --lr: -1e-4 must be greater than 0"),
    "negative limit": (EVAL + ["--limit", "-5"], "argument --limit: -5 is below 0"),
    "group of one": (GRPO + ["--group-size", "1"], "argument --group-size: 1 is below 2"),
    "temperature 0 for GRPO": (GRPO + ["--temperature", "0"], "argument --temperature: 0 must be greater than 0"),
    "dropout above 1": (SFT + ["--lora-dropout", "1.5"], "argument --lora-dropout: 1.5 is above 1"),
    "top-p above 1": (["generate.py", "--model", "{model}", "--top-p", "2"], "argument --top-p: 2 is above 1"),
    "a device this torch lacks": (EVAL + ["--device", "cuda:7" if torch.cuda.is_available() else "cuda"],
                                  "argument --device: cuda"),
    "lora targets misspelt": (SFT + ["--lora-targets", "q_proj,qv_proj"], "argument --lora-targets: 'q_proj,qv_proj'"),
    "no rollouts per prompt": (DRIFT + ["--checkpoint", "{sft_finished}", "--samples-per-prompt", "0"],
                               "argument --samples-per-prompt: 0 is below 1"),
    "not an integer": (SFT + ["--max-steps", "ten"], "argument --max-steps: 'ten' is not an integer"),
    "zero seeds": (["reproduce.py", "--seeds", "0"], "argument --seeds: 0 is below 1"),
    "a snapshot at the end": (SFT + ["--snapshots", "0.5,1"], "argument --snapshots: each fraction must lie strictly"),
    "drift without retention data": (DRIFT + ["--checkpoint", "{sft_finished}", "--retention-prompts", "4"],
                                     "truthfulqa/mc_task.json does not exist"),
    "unknown task": (EVAL + ["--tasks", "gsm8k,arc"], "unknown task(s) arc"),
    "an --out that cannot be made": (SFT + ["--out", "{a_file}/sub/sft.pt"], "cannot make its directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_ends_in_one_line_and_writes_nothing(world, case, tmp_path):
    argv, fragment = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(out=out, **world) for a in argv]
    if "--out" not in argv and argv[0] != "generate.py":
        argv += ["--out", str(out / ("result.json" if argv[0] in ("evaluate.py", "drift.py") else "run.pt"))]
    if argv[0] == "drift.py":
        argv += ["--cache-dir", str(out / "rollouts")]
    if argv[0] == "reproduce.py":
        argv += ["--out", str(out / "study")]
    before = {p: os.path.getmtime(world[p]) for p in ("sft_unfinished", "sft_finished")}
    r = run_cli(*argv)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, (case, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (case, r.stderr)
    assert "weights_only" not in r.stderr          # never a hint to unpickle an untrusted file
    assert not os.listdir(out), (case, os.listdir(out))
    assert before == {p: os.path.getmtime(world[p]) for p in before}   # a checkpoint that was read stays as it was


def test_ctrl_c_checkpoints_the_steps_done_and_resume_ends_with_the_uninterrupted_adapter(learnable_dir, tmp_path):
    data = gsm8k_dir(str(tmp_path / "data"))
    argv = ["--model", learnable_dir, "--data-dir", data, "--lora-r", "4", "--batch-size", "2", "--max-steps", "150",
            "--lr", "1e-2", "--lora-dropout", "0.1", "--save-every", "0", "--seed", "3", "--device", "cpu"]
    whole, cut = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    assert run_cli("train_sft.py", *argv, "--out", whole).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_sft.py"), *argv, "--out", cut], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log = str(tmp_path / "cut.jsonl")
    while not (os.path.exists(log) and len(read_log(log)) >= 3):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    step = load_checkpoint(cut)["train_state"]["step"]
    assert 3 <= step < 150
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == f"interrupted at step {step}; checkpoint {cut}; continue with --resume"
    assert [r["step"] for r in read_log(log)] == list(range(1, step + 1))
    resumed = run_cli("train_sft.py", *argv, "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(whole)["adapter"], load_checkpoint(cut)["adapter"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_evaluation_leaves_no_output_file(world, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "eval_gsm8k", ctrl_c)        # Ctrl-C in the middle of the evaluation
    argv = ["--model", world["model"], "--data-dir", world["data"], "--tasks", "gsm8k", "--limit", "2",
            "--out", str(tmp_path / "eval.json")]
    with pytest.raises(SystemExit) as stop:
        cli(lambda: evaluate.main(argv))
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().startswith("interrupted")
    assert not os.listdir(tmp_path)
