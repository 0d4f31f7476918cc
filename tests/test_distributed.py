"""Data parallel under torchrun (distributed.py), on CPU with 2 gloo processes: the same adapter, gradients and
scores as one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lora import load_checkpoint
from trainer_helpers import REPO, gsm8k_dir, learnable_dir, read_log  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def launch(nproc: int, script: str, *args: str, cwd=REPO):
    """`torchrun --standalone --nproc_per_node nproc script args` on CPU (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def same_adapter(a: str, b: str, atol=1e-6):
    x, y = load_checkpoint(a)["adapter"], load_checkpoint(b)["adapter"]
    assert x.keys() == y.keys()
    worst = max(float((x[k] - y[k]).abs().max()) for k in x)
    assert worst <= atol, worst
    return worst


def test_sft_on_two_ranks_ends_with_the_one_process_adapter_and_resumes_from_a_one_process_checkpoint(
        learnable_dir, tmp_path):
    data = gsm8k_dir(str(tmp_path / "data"), n=12)
    flags = ["--model", learnable_dir, "--data-dir", data, "--batch-size", "4", "--max-steps", "5", "--lr", "1e-3",
             "--lora-r", "4", "--lora-dropout", "0", "--warmup", "0", "--save-every", "0"]
    one, two, cut = (str(tmp_path / f"{n}.pt") for n in ("one", "two", "cut"))
    launch(1, "train_sft.py", *flags, "--out", one)
    launch(2, "train_sft.py", *flags, "--out", two)
    launch(1, "train_sft.py", *flags, "--out", cut, "--stop-after", "2", "--save-every", "1")
    assert load_checkpoint(cut)["meta"]["step"] == 2
    launch(2, "train_sft.py", *flags, "--out", cut, "--resume", "--save-every", "1")
    moved = sum(float(t.abs().sum()) for k, t in load_checkpoint(one)["adapter"].items() if k.endswith("lora_B"))
    assert moved > 0
    same_adapter(one, two)
    same_adapter(one, cut)
    logs = [read_log(str(tmp_path / f"{n}.jsonl")) for n in ("one", "two", "cut")]
    for a, b, c in zip(*logs):   # one line per step, written by rank 0, with the whole step's loss
        assert a["step"] == b["step"] == c["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert c["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert len(logs[1]) == len(logs[2]) == 5


@pytest.mark.parametrize("method", ["grpo", "opd:sampled-kl", "opd:kl"])
def test_a_fixed_steps_gradient_on_two_ranks_is_the_one_process_gradient(tiny_dir, tmp_path, method):
    outs = []
    for nproc in (1, 2):
        outs.append(str(tmp_path / f"{nproc}.pt"))
        launch(nproc, os.path.join("tests", "dp_worker.py"), method, tiny_dir, outs[-1])
    one, two = (torch.load(p) for p in outs)
    assert sum(float(g.abs().sum()) for g in one) > 0
    for a, b in zip(one, two):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_evaluate_on_two_ranks_writes_the_scores_and_predictions_of_one(tiny_dir, tmp_path):
    data = os.path.join(REPO, "tests", "data", "eval_data")
    common = ["evaluate.py", "--model", tiny_dir, "--data-dir", data, "--limit", "5", "--max-new-tokens", "8"]
    launch(1, *common, "--out", str(tmp_path / "one.json"))
    launch(2, *common, "--out", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for task in one["tasks"]:
        for key in ("score", "n", "stderr"):
            assert one["tasks"][task][key] == pytest.approx(two["tasks"][task][key], abs=1e-9), (task, key)
    preds = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("one", "two")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "lls"} for r in rows]   # noqa: E731
    assert strip(preds[0]) == strip(preds[1])


def test_grpo_runs_on_a_world_size_that_does_not_divide_the_batch(learnable_dir, tmp_path):
    """Issue 27, bug 1: at world 3, batch 4 and grad-accum 4, a rank's prompts were gathered as if they were one
    share (8 items into a slice of 6). Every world size works."""
    data = gsm8k_dir(str(tmp_path / "data"), n=16)
    launch(3, "train_grpo.py", "--model", learnable_dir, "--data-dir", data, "--out", str(tmp_path / "g.pt"),
           "--batch-size", "4", "--grad-accum", "4", "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "1")
    [record] = read_log(str(tmp_path / "g.jsonl"))
    assert record["groups"] == 16


def test_a_two_rank_run_with_dropout_resumes_to_the_uninterrupted_adapter(learnable_dir, tmp_path):
    """Issue 27, bug 4: every rank's random state (adapter dropout) is saved and restored; ranks above 0 used to
    reseed on resume where the uninterrupted run drew on."""
    data = gsm8k_dir(str(tmp_path / "data"), n=12)
    flags = ["--model", learnable_dir, "--data-dir", data, "--batch-size", "4", "--max-steps", "4", "--lr", "1e-2",
             "--lora-r", "4", "--lora-dropout", "0.3", "--save-every", "0"]
    whole, cut = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    launch(2, "train_sft.py", *flags, "--out", whole)
    launch(2, "train_sft.py", *flags, "--out", cut, "--stop-after", "2")
    launch(2, "train_sft.py", *flags, "--out", cut, "--resume")
    same_adapter(whole, cut, atol=0)
