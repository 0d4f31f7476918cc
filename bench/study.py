"""Benchmark: what the paper's study costs, stage by stage, at the exact Qwen3-0.6B-Base shape.

    python -m bench.study --cuda                # random weights of the 0.6B shape, bf16, the Qwen tokenizer
    python -m bench.study --shape small         # the same pipeline on a small random model (a CPU check)

Real weights are not needed to time a stage: the shapes, the tokenizer and the text lengths are the real ones.
The model is the config in configs/qwen3-0.6b-base.json with random weights (the Qwen tokenizer from
tests/data); the data are the real GSM8K, TruthfulQA and MMLU samples in tests/data/eval_data, GSM8K's test
questions standing in for its train split. Every stage of reproduce.py runs with the paper's settings (the
scripts' defaults: batch sizes, group size, cuts, LoRA ranks, 256-token rollouts) for --steps optimizer steps,
evaluation on --eval-n items per task and drift on --drift-prompts prompts. A random model never writes EOS,
so every rollout runs to its token limit: the figures are the worst case of a trained model's. (--max-new-tokens
shortens every rollout, only to check the pipeline on a CPU in minutes: `--shape small --steps 1 --eval-n 8
--drift-prompts 4 --max-new-tokens 16`.)

Reported per stage: wall seconds and peak GPU memory (reproduce.py measures both), seconds per optimizer step
(the median over the trainers' logged steps after the first) and the projection to the paper's full run:
seconds per step x the full run's steps, evaluation and drift scaled linearly from the items evaluated to
500 + 200 + 500 and from the prompts to 100. Writes --out/bench_study.json and prints a table.
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile

import torch

import reproduce
from bench.harness import QWEN_TOKENIZER, QWEN_VOCAB, ROOT, random_model, shape

EVAL_DATA = os.path.join(ROOT, "tests", "data", "eval_data")
# Optimizer steps of the paper's full runs with the scripts' defaults (GSM8K train has 7,473 problems).
FULL_STEPS = {"sft_mild": 468, "sft_stress": 2336, "grpo": 200, "sft_learner": 468, "opd_stress": 200, "opd_mild": 200,
              "opd_kl": 200, "opd_sampled_kl": 200, "opd_stress_on_teacher_states": 200, "opd_stress_on_data_states": 200}
FULL_EVAL = 500 + 200 + 500


def data_dir(out: str) -> str:
    """tests/data/eval_data with GSM8K's test questions copied in as the train split (lengths are what matter)."""
    shutil.copytree(EVAL_DATA, out)
    shutil.copy(os.path.join(out, "gsm8k", "test.jsonl"), os.path.join(out, "gsm8k", "train.jsonl"))
    return out


def per_step_seconds(log_path: str) -> float | None:
    with open(log_path) as f:
        steps = [json.loads(line)["step_s"] for line in f if line.strip()]
    return statistics.median(steps[1:] or steps) if steps else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true", help="run on the GPU in bf16 (default: CPU, float32)")
    p.add_argument("--shape", choices=["0.6b", "small"], default="0.6b", help="the Qwen3-0.6B shape or a small one")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per trained run")
    p.add_argument("--eval-n", type=int, default=64, help="items per evaluation task")
    p.add_argument("--drift-prompts", type=int, default=16, help="drift prompts (4 rollouts each)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="rollout and GSM8K generation length: the paper's 256; less only to check the pipeline quickly")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = p.parse_args(argv)
    device = "cuda" if args.cuda else "cpu"
    work = args.out or tempfile.mkdtemp(prefix="bench_study_")
    os.makedirs(work, exist_ok=True)
    model_dir = os.path.join(work, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        random_model(model_dir, shape(args.shape, vocab_size=QWEN_VOCAB), QWEN_TOKENIZER, eos_token_id=151643)
    data = os.path.join(work, "data")
    if not os.path.exists(data):
        data_dir(data)
    steps = f"--max-steps {args.steps} --save-every 0 --max-new-tokens {args.max_new_tokens}"   # GRPO, OPD
    # A random policy earns no reward, and groups without signal skip the learner pass; a tiny KL weight keeps
    # every completion in it, so the step costs what a step with signal costs (the KL's reference forward is
    # paid anyway: state locality is logged every step).
    tokens = f"--max-new-tokens {args.max_new_tokens}"
    study = reproduce.main(["--model", model_dir, "--data-dir", data, "--out", os.path.join(work, "study"),
                            "--device", device, "--variants", "--jobs", "1", "--extra", f"train_sft.py=--max-steps {args.steps} --save-every 0",
                            "--extra", f"train_grpo.py={steps} --beta 1e-6", "--extra", f"train_opd.py={steps}",
                            "--extra", f"evaluate.py=--limit {args.eval_n} {tokens}",
                            "--extra", f"drift.py=--prompts {args.drift_prompts} --bootstrap 50 {tokens}"])
    return report(study, args, work)


def report(study: dict, args, work: str) -> dict:
    """Per-stage costs of a finished study (its results.json) and their projection to the paper's full run."""
    seconds, memory = study["costs"]["seconds"], study["costs"]["peak_gpu_gib"]
    rows = []
    for name, row in study["models"].items():
        if name == "base":
            continue
        run = row["runs"][0]
        step_s = per_step_seconds(run["log"]) if os.path.exists(run["log"]) else None
        ev = seconds.get(f"evaluate/{name}_s0", 0.0)
        dr = sum(v for k, v in seconds.items() if k.startswith(f"drift/{name}_s0_"))
        mem = max([v for k, v in memory.items() if f"/{name}_s0" in k], default=None)
        with open(run["eval"]) as f:   # items actually evaluated (the bundled MMLU and TruthfulQA samples are small)
            items = sum(t["n"] for t in json.load(f)["tasks"].values())
        full = (step_s or 0.0) * FULL_STEPS[name] + ev * FULL_EVAL / items + dr * 100 / args.drift_prompts
        rows.append({"run": name, "step_s": step_s, "evaluate_s": ev, "drift_s": dr, "peak_gpu_gib": mem,
                     "full_steps": FULL_STEPS[name], "projected_full_run_h": full / 3600})
    result = {"device": torch.cuda.get_device_name() if args.cuda else "cpu", "shape": args.shape,
              "dtype": "bfloat16" if args.cuda else "float32", "torch": torch.__version__, "settings": vars(args),
              "base_evaluate_s": seconds.get("evaluate/base"), "runs": rows}
    with open(os.path.join(work, "bench_study.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, {args.shape} shape, {result['dtype']}; evaluation of {args.eval_n} items per task, "
          f"drift on {args.drift_prompts} prompts x 4 rollouts; {args.max_new_tokens}-token rollouts")
    print("| run | s / step | evaluate s | drift s | peak GPU GiB | full-run steps | projected full run (h) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        step = f"{r['step_s']:.2f}" if r["step_s"] else "–"
        mem = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "–"
        print(f"| {r['run']} | {step} | {r['evaluate_s']:.0f} | {r['drift_s']:.0f} | {mem} | {r['full_steps']} | "
              f"{r['projected_full_run_h']:.2f} |")
    print(f"-> {os.path.join(work, 'bench_study.json')}")
    return result


if __name__ == "__main__":
    main()
