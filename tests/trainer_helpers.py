"""Small worlds for the trainer tests: a tiny Qwen3 that can actually learn, a GSM8K-layout data dir, a CLI runner."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CONFIGS, make_hf_model, write_byte_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def learnable_model_dir(path: str) -> str:
    """The `tiny_dir` architecture with a 10x larger init, so its tied head can make peaked distributions
    (the default 0.02 init keeps every next-token distribution near uniform, whatever the adapter does), and
    with a non-zero EOS embedding row (transformers zeroes the padding row, and here pad == EOS == 1, so a
    tied head could never raise EOS above the other tokens)."""
    os.makedirs(path, exist_ok=True)
    make_hf_model(path, initializer_range=0.2, **CONFIGS["gqa_tied"])
    write_byte_tokenizer(path)
    f = os.path.join(path, "model.safetensors")
    state = load_file(f)
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[key][1] = torch.randn(state[key].shape[1], generator=torch.Generator().manual_seed(1)) * 0.2
    save_file(state, f, metadata={"format": "pt"})
    return path


def gsm8k_dir(path: str, n: int = 8, seed: int = 0) -> str:
    """`path`/gsm8k/train.jsonl with n short addition problems in GSM8K's answer format."""
    os.makedirs(os.path.join(path, "gsm8k"), exist_ok=True)
    rng = random.Random(seed)
    with open(os.path.join(path, "gsm8k", "train.jsonl"), "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return path


def run_cli(script: str, *args: str):
    """Run a trainer from the command line (one thread: the test machine's cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def one_thread():
    """In-process training on one thread (import this fixture; the machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def learnable_dir(tmp_path_factory):
    return learnable_model_dir(str(tmp_path_factory.mktemp("learnable_qwen3")))
