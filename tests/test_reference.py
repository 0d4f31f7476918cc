"""Behaviour kept to the bit: every trainer's final adapter and log, evaluate.py's records and drift.py's figures on
a committed random Qwen3 and fixed seeds, against what the code wrote when they were recorded.

    python tests/test_reference.py --record     # re-record (only in a commit that says why the behaviour moved)

A rewrite that moves code without changing what it computes passes unchanged. The random model and its tokenizer
are committed (tests/data/reference/model), so the reference does not depend on transformers' initialization.
Everything runs in float64 on one thread. CPUs differ in the last bits of their float kernels (AVX-512, AVX2 or none,
MKL's code paths), and a few AdamW steps amplify float32's 1e-7 into percents; float64's 1e-16 stays far below
the comparison's relative 1e-9, while a changed random stream or a 1% change in a formula's constant moves these
numbers by far more. `ATEN_CPU_CAPABILITY=default` and `MKL_CBWR=COMPATIBLE` run other kernels on one machine.
Timings are left out; keys may be added, never dropped.
"""
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from trainer_helpers import one_thread  # noqa: E402,F401 (fixture)
REFERENCE = os.path.join(HERE, "data", "reference")
MODEL = os.path.join(REFERENCE, "model")
EVAL_DATA = os.path.join(HERE, "data", "eval_data")
TIMINGS = {"step_s", "tokens_per_s", "sample_s", "learn_s", "seconds"}
PATHS = {"out", "log", "data_dir", "teacher", "init", "cache", "checkpoint", "predictions", "baseline", "cache_dir",
         "model", "data", "path", "sha256", "base_model"}


def write_model():
    """The committed model: trainer_helpers' learnable model (a random Qwen3 that can make peaked distributions)."""
    from trainer_helpers import learnable_model_dir
    learnable_model_dir(MODEL)


def data_dir(root: str) -> str:
    """Short addition problems to train on, the tests' real-data samples to evaluate on."""
    from trainer_helpers import gsm8k_dir
    d = os.path.join(root, "data")
    for task in ("truthfulqa", "mmlu"):
        shutil.copytree(os.path.join(EVAL_DATA, task), os.path.join(d, task))
    # drift.py's retention contexts: extra ones (the samples again), as a tiny world writes them
    shutil.copy(os.path.join(d, "truthfulqa", "mc_task.json"), os.path.join(d, "truthfulqa", "extra.json"))
    os.makedirs(os.path.join(d, "mmlu", "extra"))
    for f in os.listdir(os.path.join(d, "mmlu", "test")):
        shutil.copy(os.path.join(d, "mmlu", "test", f), os.path.join(d, "mmlu", "extra", f.replace("_test", "_extra")))
    gsm8k_dir(d, n=12, seed=3)
    shutil.copy(os.path.join(EVAL_DATA, "gsm8k", "test.jsonl"), os.path.join(d, "gsm8k", "test.jsonl"))
    return d


def plain(obj):
    """JSON-like values with timings and machine-specific paths dropped."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if k not in TIMINGS and k not in PATHS}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trained(path: str) -> dict:
    """What a trainer leaves: its adapter, its log and the keys of its checkpoint."""
    ckpt = torch.load(path, weights_only=True)
    return {"adapter": ckpt["adapter"], "log": plain(read_jsonl(os.path.splitext(path)[0] + ".jsonl")),
            "keys": {"meta": sorted(ckpt["meta"]), "train_state": sorted(ckpt.get("train_state", {}))}}


def behaviour(root: str) -> dict:
    """Run every scenario in `root` and return what they computed."""
    import drift
    import evaluate
    import train_grpo
    import train_opd
    import train_sft
    data = data_dir(root)
    out = lambda name: os.path.join(root, name)   # noqa: E731
    common = ["--model", MODEL, "--data-dir", data, "--device", "cpu", "--dtype", "float64", "--seed", "3"]
    sampled = ["--max-new-tokens", "12", "--sample-batch-size", "5"]
    runs = {
        "sft": (train_sft, ["--max-steps", "4", "--batch-size", "3", "--grad-accum", "2", "--lr", "2e-3",
                            "--snapshots", "0.5", "--save-every", "3"]),
        "sft_learner": (train_sft, ["--states", "learner", "--max-steps", "2", "--batch-size", "2", "--group-size", "3",
                                    "--keep", "2", "--lr", "2e-3", *sampled]),
        "grpo": (train_grpo, ["--max-steps", "4", "--mu", "2", "--batch-size", "2", "--grad-accum", "2",
                              "--group-size", "3", "--beta", "0.05", "--lr", "2e-3", "--save-every", "2", *sampled]),
    }
    # A random model never solves a problem: accept and reward by a fixed rule of the sampled tokens instead, so that
    # the learner-state SFT and GRPO have something to learn from.
    rule = lambda tokens: sum(tokens) % 3 == 0   # noqa: E731
    real, train_sft.is_correct = train_sft.is_correct, lambda completion, gold: rule(completion.encode())
    result = {}
    try:
        for name, (script, argv) in runs.items():
            extra = {"reward_fn": lambda rollout, example: float(rule(rollout.tokens))} if script is train_grpo else {}
            script.main(common + ["--out", out(f"{name}.pt")] + argv, **extra)
            result[name] = trained(out(f"{name}.pt"))
    finally:
        train_sft.is_correct = real   # the other tests' learner-state SFT accepts by the real rule
    result["sft"]["snapshot"] = torch.load(out("sft_at2.pt"), weights_only=True)["adapter"]
    teacher = out("sft.pt")
    opd = {"opd_continuation": ["--cuts", "2", "--continuation-tokens", "6"],
           "opd_teacher_states": ["--states", "teacher", "--cuts", "2", "--continuation-tokens", "6",
                                  "--teacher-temperature", "1"],
           "opd_data_states": ["--states", "data", "--cuts", "2", "--continuation-tokens", "6"],
           "opd_kl": ["--signal", "kl", "--kl", "reverse", "--logit-chunk", "7"],
           "opd_sampled_kl": ["--signal", "sampled-kl", "--discount", "0.5"]}
    for name, argv in opd.items():
        train_opd.main(["--teacher", teacher, "--data-dir", data, "--device", "cpu", "--dtype", "float64", "--seed", "3",
                        "--out", out(f"{name}.pt"), "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2",
                        "--lr", "2e-3", *sampled, *argv])
        result[name] = trained(out(f"{name}.pt"))
    ev = evaluate.main(["--model", MODEL, "--checkpoint", teacher, "--data-dir", data, "--device", "cpu",
                        "--dtype", "float64", "--limit-gsm8k", "6", "--limit-truthfulqa", "8", "--limit-mmlu", "8",
                        "--max-new-tokens", "24", "--samples", "3", "--batch-size", "4", "--out", out("eval.json")])
    result["evaluate"] = {"result": plain(ev), "records": plain(read_jsonl(out("eval.jsonl")))}
    for features in ("lexical", "hidden"):
        d = drift.main(["--checkpoint", out("grpo.pt"), "--baseline-checkpoint", teacher, "--data-dir", data,
                        "--device", "cpu", "--dtype", "float64", "--prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "16",
                        "--bootstrap", "20", "--projections", "16", "--retention-prompts", "2",
                        "--retention-tokens", "6", "--state-stride", "3", "--features", features, "--cache-dir", out("rollouts"),
                        "--out", out(f"drift_{features}.json")])
        result[f"drift_{features}"] = plain(d)
    return result


def compare(got, want, where="reference"):
    """Equal up to a relative 1e-9 (floats, tensors); dict keys of `want` must all be there."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        missing = sorted(set(want) - set(got))
        assert not missing, f"{where}: keys {missing} are gone"
        for k in want:
            compare(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{where}[{i}]")
    elif torch.is_tensor(want):
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max() or 1), msg=where)
    elif isinstance(want, float):
        assert isinstance(got, (int, float)) and abs(got - want) <= 1e-9 * max(1.0, abs(want)), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def exact(got, want) -> bool:
    """Whether the two are equal to the bit (for the record: the test itself allows 1e-9)."""
    if isinstance(want, dict):
        return set(want) <= set(got) and all(exact(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(exact(g, w) for g, w in zip(got, want))
    if torch.is_tensor(want):
        return torch.equal(got, want)
    return got == want


def test_behaviour_is_the_recorded_one(tmp_path, one_thread):
    want = torch.load(os.path.join(REFERENCE, "behaviour.pt"), weights_only=False)
    got = behaviour(str(tmp_path))
    assert sorted(got) == sorted(want)
    compare(got, want)
    print("bit for bit" if exact(got, want) else "equal within 1e-9, not bit for bit")


if __name__ == "__main__":
    import tempfile
    torch.set_num_threads(1)
    if "--record" in sys.argv:
        if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
            write_model()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(behaviour(tmp), os.path.join(REFERENCE, "behaviour.pt"))
        print(f"recorded {os.path.join(REFERENCE, 'behaviour.pt')}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            want = torch.load(os.path.join(REFERENCE, "behaviour.pt"), weights_only=False)
            got = behaviour(tmp)
            compare(got, want)
            print("bit for bit" if exact(got, want) else "equal within 1e-9, not bit for bit")
