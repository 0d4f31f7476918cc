"""The study's stages: the trained runs, the settings they run with, and running every stage (train, evaluate,
pass@k, drift, the --frontier snapshots' evaluations) as a call of the script that owns it, timed: each once the
stages it reads are done, --jobs of them side by side in single-threaded worker processes (run_stages, schedule).

A stage's output is reused only when the same command made it from the same inputs. Each stage writes beside its
output (`<output name>.command.json`) the script and flags it ran with and the sha256 of every checkpoint it read:
an OPD run its teacher, an evaluation or a drift the adapter it measures (and an evaluation the base's results it
compares with). Another command or another input runs the stage again: a finished run is trained anew, an
unfinished one resumes (train_*.py --resume) only under the same command (--stop-after aside: it says where an
invocation stops, not what the run is). Every reused stage says so in one line. Each stage's cost (wall seconds,
peak GPU memory) is recorded beside its output too (`<output name>.cost.json`), so that a reused stage reports it.
"""
import glob
import json
import multiprocessing
import os
import re
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import distributed
import drift
import evaluate
import train_grpo
import train_opd
import train_sft
from cli import output_dir, write_text
from lora import load_checkpoint
from model import LoadError
from training import NonFiniteLoss, finished, snapshot_path, snapshot_steps

SCRIPTS = {"train_sft.py": train_sft, "train_grpo.py": train_grpo, "train_opd.py": train_opd,
           "evaluate.py": evaluate, "drift.py": drift}
# --frontier: the fractions of every run kept (train_*.py --snapshots) and evaluated: six, the first at 1/16, so that
# a matched gain rests on measured points rather than on one straight segment from the base
FRONTIER = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
# the paper's five runs with the base (reproduce.py runs them; --variants adds the other runs and pass@k)
CORE = ("sft_mild", "sft_stress", "grpo", "opd_stress")


@dataclass
class Stage:
    """One trained run: its name, the script, the flags that make it this method, and its teacher (a run's name)."""
    name: str
    script: str
    flags: list
    label: str                      # the row name in the report
    states: str                     # state source
    signal: str
    teacher: str | None = None      # train_opd.py --teacher: that run's checkpoint of the same seed
    curve: str = "loss"             # the log's figure training_curves.png draws


def stages() -> list[Stage]:
    """The study's trained runs, in dependency order (a teacher before its students)."""
    return [
        Stage("sft_mild", "train_sft.py", ["--preset", "mild"], "SFT mild", "dataset", "gold tokens"),
        Stage("sft_stress", "train_sft.py", ["--preset", "stress"], "SFT stress", "dataset", "gold tokens"),
        Stage("grpo", "train_grpo.py", [], "GRPO", "learner", "exact-answer reward", curve="reward"),
        Stage("sft_learner", "train_sft.py", ["--states", "learner"], "SFT on own correct samples (RFT)", "learner",
              "own correct samples", curve="accepted"),
        Stage("opd_stress", "train_opd.py", [], "OPD (stress teacher)", "learner", "teacher continuation", "sft_stress"),
        Stage("opd_mild", "train_opd.py", [], "OPD (mild teacher)", "learner", "teacher continuation", "sft_mild"),
        Stage("opd_kl", "train_opd.py", ["--signal", "kl"], "OPD one-step KL (stress teacher)", "learner",
              "exact KL", "sft_stress"),
        Stage("opd_sampled_kl", "train_opd.py", ["--signal", "sampled-kl"], "OPD sampled KL (stress teacher)", "learner",
              "sampled KL", "sft_stress", curve="reverse_kl_sampled"),
        Stage("opd_stress_on_teacher_states", "train_opd.py", ["--states", "teacher"], "OPD signal on teacher states",
              "teacher", "teacher continuation", "sft_stress"),
        Stage("opd_stress_on_data_states", "train_opd.py", ["--states", "data"], "OPD signal on dataset states",
              "dataset", "teacher continuation", "sft_stress"),
    ]


# Per-setting flags added to the scripts' defaults. "paper": none (the scripts' defaults are the paper's).
# "tiny": the tiny world on CPU cores (README: what a seed costs); "quick": a smoke run.
PROFILES = {
    "paper": {"train": {}, "evaluate": [], "drift": [], "passk": ["--samples", "8"],
              "settings": "the scripts' defaults: the paper's where it gives them, our stated choice where not (README)"},
    "tiny": {
        # where the settings below come from (results.md says it)
        "settings": "chosen on this world's validation split (tiny/probes/README.md, world 6: the SFT presets' probes "
                    "Q6 and Q7, GRPO's and OPD's budgets from their validation curves, Q8 and Q9); the test split is "
                    "touched only by the study; OPD's learning rate and RFT's 1,000 problems are carried over from the "
                    "first world, not re-tuned",
        # The SFT presets unchanged (mild: 1 epoch, lr 1e-4, r 16; stress: 5 epochs, lr 5e-4, r 64) over all 7,473
        # train problems, as in the paper (mild in batches of 8: 935 steps; stress in batches of 16: 2,340 steps).
        # RFT: the first 1,000 problems (125 steps of 8 prompts x 8 samples). GRPO: 250 steps of 8 prompts x 8
        # samples at lr 3e-4; OPD and its variants: 250 steps of 8 prompts at lr 2e-4, where both validation curves
        # peak or level off (tiny/README.md). Every run logs greedy accuracy on the first 200 validation problems
        # about ten times (--eval-every).
        "train": {
            "train_sft.py": ["--batch-size", "8", "--save-every", "100", "--eval-every", "100"],
            "sft_stress": ["--batch-size", "16", "--eval-every", "250"],
            "sft_learner": ["--limit", "1000", "--eval-every", "25"],
            "train_grpo.py": ["--max-steps", "250", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-4",
                              "--save-every", "50", "--eval-every", "25"],
            "train_opd.py": ["--max-steps", "250", "--lr", "2e-4", "--save-every", "50", "--eval-every", "25"],
        },
        # every target and retention item (1,319 / 2,000 / 904: narrower intervals); 256 new tokens
        "evaluate": ["--batch-size", "128", "--limit", "0"],
        # 64 prompts x 4 rollouts, a state every 16 tokens; the evaluations score every retention item (--limit 0), so
        # the policy KLs' retention contexts are only the data dir's extra ones
        "drift": ["--batch-size", "128", "--prompts", "64", "--evaluated", "all"],
        "passk": ["--batch-size", "256", "--limit", "200", "--samples", "8"],   # the first 200 problems x 8 samples
        # --frontier's six snapshots a run: every MMLU item, the first 1,000 TruthfulQA questions and the first 300
        # GSM8K problems (the matched-gain curves cut the base and the final adapter to the same items), so that the
        # snapshots cost less than the runs (TruthfulQA's 2,000 questions are most of an evaluation's time)
        "frontier": ["--batch-size", "128", "--limit", "0", "--limit-gsm8k", "300", "--limit-truthfulqa", "1000"],
    },
    "quick": {
        "settings": "a smoke run: a few steps and examples per stage",
        "train": {
            "train_sft.py": ["--limit", "32", "--max-steps", "3", "--batch-size", "8", "--eval-every", "1",
                             "--eval-limit", "4"],
            "train_grpo.py": ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--group-size", "4",
                              "--max-new-tokens", "64", "--eval-every", "1", "--eval-limit", "4"],
            "train_opd.py": ["--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "24", "--cuts", "2",
                             "--continuation-tokens", "8", "--eval-every", "1", "--eval-limit", "4"],
            "sft_learner": ["--group-size", "4", "--max-new-tokens", "96"],   # tiny solutions: about 40 tokens
        },
        "evaluate": ["--limit", "12", "--max-new-tokens", "32"],
        "drift": ["--prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "24", "--bootstrap", "20",
                  "--state-stride", "4", "--retention-prompts", "4", "--retention-tokens", "8"],
        "passk": ["--limit", "4", "--samples", "2", "--max-new-tokens", "16"],
    },
}


# ----------------------------------------------------------------------------------------------
# A stage's command, recorded beside its output: what decides whether the output is reused


def sha256(path: str) -> str | None:
    """evaluate.file_sha256 of a checkpoint; one that is gone has the hash its run's receipt keeps, if any."""
    if not os.path.exists(path):
        return receipt(re.sub(r"_at\d+(?=\.pt$)", "", path)).get("sha256", {}).get(os.path.basename(path))
    return evaluate.file_sha256(path)


def command(script: str, argv: list, inputs: list) -> dict:
    """The script, its flags but --stop-after N, and the sha256 of each checkpoint in `inputs` (None for one that is
    missing: the script says so)."""
    flags = [a for i, a in enumerate(argv) if not a.startswith("--stop-after") and argv[i - 1:i] != ["--stop-after"]]
    return {"script": script, "argv": flags, "inputs": {p: sha256(p) for p in inputs}}


def _beside(out: str, what: str) -> str:
    """Where a stage's record `what` (command, cost) is kept, beside its output."""
    return os.path.splitext(out)[0] + f".{what}.json"


def read_json(path: str, missing=None):
    """The JSON file at `path`; `missing` where there is none."""
    return json.loads(Path(path).read_text()) if os.path.exists(path) else missing


def same_command(out: str, cmd: dict) -> bool:
    """Whether `out` exists and was written by command `cmd` (its record says so)."""
    return bool(os.path.exists(out) or receipt(out)) and read_json(_beside(out, "command")) == cmd


def record(out: str, cmd: dict):
    if distributed.main_rank():
        write_text(output_dir(_beside(out, "command")), json.dumps(cmd, indent=1))


# ----------------------------------------------------------------------------------------------
# Running the stages


def _timed(args, script: str, argv: list, out: str, resumed: bool = False):
    """Run a stage, script's main(argv) (in this process with --jobs 1, else in a worker process of run_stages),
    recording its wall seconds and, on CUDA with --jobs 1, its peak GPU memory (what the real run costs) beside its
    output (`<output name>.cost.json`), where the study reads them (_cost) whether it ran the stage or reuses it: a
    study spread over processes or sessions reports every stage's cost. A resumed run adds its seconds to those its
    earlier invocations recorded (an invocation killed mid-run records none)."""
    cuda = torch.cuda.is_available() and args.jobs == 1
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.jobs == 1:
        SCRIPTS[script].main(argv)
    else:
        args.workers.submit(SCRIPTS[script].main, argv).result()
    earlier = read_json(_beside(out, "cost"), {}) if resumed else {}
    cost = {"seconds": round(time.perf_counter() - t0 + earlier.get("seconds", 0.0), 1)}
    if cuda:
        cost["peak_gpu_gib"] = round(max(torch.cuda.max_memory_allocated() / 2**30, earlier.get("peak_gpu_gib", 0)), 2)
    if distributed.main_rank():
        write_text(output_dir(_beside(out, "cost")), json.dumps(cost))


def _cost(costs: dict, key: str, out: str):
    """Into `costs`: the cost recorded beside a stage's output when it ran (none for a study from before the
    records)."""
    for k, v in read_json(_beside(out, "cost"), {}).items():
        costs[k][key] = v


def run_script(args, costs: dict, key: str, script: str, argv: list, out: str, inputs=()) -> str:
    """script's main(argv), which writes `out`, unless the same command made `out` from the same inputs."""
    cmd = command(script, argv, list(inputs))
    if same_command(out, cmd):
        print(f"reused {key}: {out} (the same command and inputs)", flush=True)
    else:
        again = " (its output was made by another command or from other inputs)" if os.path.exists(out) else ""
        print(f"\n== {key}: python {script} {shlex.join(argv)}{again}", flush=True)
        _timed(args, script, argv, out)
        record(out, cmd)
    _cost(costs, key, out)
    return out


def _data_flag(args) -> list:
    """--data-dir for the scripts when given (without it they find tiny/data for --model tiny, else the hub)."""
    return ["--data-dir", args.data_dir] if args.data_dir else []


def ckpt_path(args, name: str, seed: int) -> str:
    return os.path.join(args.out, "ckpt", f"{name}_s{seed}.pt")


def receipt(ckpt: str) -> dict:
    """A finished run's receipt (<ckpt>.receipt.json): its steps and the sha256 of its checkpoint and snapshots. A
    study carried to another machine without its checkpoints (the committed study's stage outputs, README) reuses
    through it every stage they fed; a stage still to run needs the checkpoint itself."""
    return read_json(_beside(ckpt, "receipt"), {})


def write_receipt(ckpt: str):
    if distributed.main_rank() and os.path.exists(ckpt) and not receipt(ckpt):   # the first, with every snapshot
        files = [ckpt] + glob.glob(glob.escape(os.path.splitext(ckpt)[0]) + "_at*.pt")
        write_text(_beside(ckpt, "receipt"), json.dumps({"total_steps": load_checkpoint(ckpt)["train_state"][
            "total_steps"], "sha256": {os.path.basename(p): sha256(p) for p in files}}))


def _finished(ckpt: str) -> bool:   # read onto the CPU, wherever it was trained
    return finished(load_checkpoint(ckpt)) if os.path.exists(ckpt) else bool(receipt(ckpt))


def train(args, stage: Stage, seed: int, costs: dict) -> dict:
    """Train one run: reuse it when finished under the same command, resume it when unfinished under the same
    command, else train it anew. Returns its status."""
    out = ckpt_path(args, stage.name, seed)
    status = {"checkpoint": out, "log": os.path.splitext(out)[0] + ".jsonl"}
    prof = PROFILES[args.profile]["train"]
    # OPD takes the base model and data from its teacher's checkpoint, as a user would run it.
    teacher = [ckpt_path(args, stage.teacher, seed)] if stage.teacher else []
    base = ["--teacher", *teacher] if teacher else ["--model", args.model] + _data_flag(args)
    argv = (base + stage.flags + prof.get(stage.script, []) + prof.get(stage.name, []) + args.extra.get(stage.script, []) +
            ["--seed", str(seed), "--out", out, "--device", args.device] +
            (["--snapshots", ",".join(map(str, FRONTIER))] if args.frontier else []))
    cmd = command(stage.script, argv, teacher)
    same = same_command(out, cmd)
    status["argv"] = argv
    if same and _finished(out):
        print(f"reused train/{stage.name}_s{seed}: {out} (the same command and inputs)", flush=True)
        _cost(costs, f"train/{stage.name}_s{seed}", out)
        write_receipt(out)
        return status
    if same:
        status["argv"] = argv = argv + ["--resume"]
    else:   # another command's run, finished or not, and its snapshots make way for this one
        stale = [p for p in [out, _beside(out, "cost"), _beside(out, "receipt")] +
                 glob.glob(glob.escape(os.path.splitext(out)[0]) + "_at*.pt") if os.path.exists(p)]
        if stale:
            print(f"{out}: trained by another command or from other inputs; training it anew", flush=True)
        distributed.barrier()      # every rank has looked at it before rank 0 removes it
        if distributed.main_rank():
            for p in stale:
                os.remove(p)
        record(out, cmd)           # before training: an interrupted run resumes under this record
    print(f"\n== train/{stage.name}_s{seed}: python {stage.script} {shlex.join(argv)}", flush=True)
    try:
        _timed(args, stage.script, argv, out, resumed=same)
        _cost(costs, f"train/{stage.name}_s{seed}", out)
    except NonFiniteLoss as e:  # a collapse is a result: report it, go on with the other runs
        print(f"{stage.name}: {e}", file=sys.stderr)
        status["failed"] = str(e)
    except SystemExit as e:     # Ctrl-C or SIGTERM: the trainer checkpointed its last step
        if e.code in (130, 143):
            print(f"{stage.name} (seed {seed}) stopped: the same reproduce.py command resumes it", file=sys.stderr)
        raise
    if "failed" not in status and not _finished(out):  # e.g. --stop-after in the extra flags: nothing to evaluate yet
        status["failed"] = "stopped before its last step; rerun reproduce.py to resume it"
    elif "failed" not in status:
        write_receipt(out)
    return status


def evaluate_model(args, name: str, checkpoint: str | None, costs: dict, kind: str = "evaluate") -> str:
    """evaluate.py on every task: the final adapter's evaluation (kind "evaluate", with the base as --baseline), a
    --frontier snapshot's ("frontier": the profile's items for snapshots), or GSM8K's pass@k ("passk")."""
    out = os.path.join(args.out, "eval", f"{name}_passk.json" if kind == "passk" else f"{name}.json")
    base_json = os.path.join(args.out, "eval", "base.json")
    prof = PROFILES[args.profile]
    flags = ["--tasks", "gsm8k"] + prof["passk"] if kind == "passk" else prof.get(kind, prof["evaluate"])
    argv = ["--model", args.model, "--out", out, "--device", args.device] + flags + _data_flag(args)
    baseline = kind == "evaluate" and checkpoint
    argv += (["--checkpoint", checkpoint] if checkpoint else []) + (["--baseline", base_json] if baseline else [])
    argv += args.extra.get("evaluate.py", [])
    inputs = ([checkpoint] if checkpoint else []) + ([base_json] if baseline else [])
    return run_script(args, costs, f"{kind.replace('frontier', 'evaluate')}/{name}", "evaluate.py", argv, out, inputs)


def snapshots(args, name: str, checkpoint: str, costs: dict) -> dict:
    """--frontier: {fraction: evaluation} of the run's snapshots (a run trained without --frontier has none, and
    is trained anew with them: its command differs)."""
    out = {}
    for f in FRONTIER:
        step = snapshot_steps([f], receipt(checkpoint)["total_steps"])[0]
        path = snapshot_path(checkpoint, step)
        if sha256(path):
            out[str(f)] = evaluate_model(args, f"{name}_at{step}", path, costs, "frontier")
        else:
            print(f"--frontier: {path} is missing: no point at {f} of {name}", file=sys.stderr)
    return out


def measure_drift(args, name: str, checkpoint: str, costs: dict) -> dict:
    """{features: output} of drift.py against the base with each of --features, one after another: the later ones
    read the first one's rollouts (cached under --out/rollouts) and leave the policy KLs, which do not depend on the
    features, to it."""
    paths = {}
    for features in args.features.split(","):
        out = os.path.join(args.out, "drift", f"{name}_{features}.json")
        argv = ["--model", args.model, "--checkpoint", checkpoint, "--out", out, "--features", features, "--device",
                args.device, "--cache-dir", os.path.join(args.out, "rollouts")] + PROFILES[args.profile]["drift"]
        argv += (["--no-policy-kl"] if paths else []) + _data_flag(args) + args.extra.get("drift.py", [])
        paths[features] = run_script(args, costs, f"drift/{name}_{features}", "drift.py", argv, out, [checkpoint])
    return paths


def check_only(args, only: set):
    """--only names known runs, and each OPD run among them has its teacher: in --only too, or already trained."""
    unknown = sorted(only - {s.name for s in stages()})
    if unknown:
        raise LoadError(f"--only: no run named {', '.join(unknown)} (the runs: {', '.join(s.name for s in stages())})")
    for s in stages():
        if s.name in only and s.teacher and s.teacher not in only and not all(
                _finished(ckpt_path(args, s.teacher, seed)) for seed in range(args.seeds)):
            raise LoadError(f"--only: {s.name} learns from {s.teacher}, which is not trained under {args.out}: "
                            f"add {s.teacher} to --only")


def schedule(tasks: dict, jobs: int) -> dict:
    """Run tasks {key: (the keys of the tasks it reads, fn)}, each once those it reads are done, up to `jobs` at a time
    (with 1, one after another in this thread), the first given first among the ready ones; a task is skipped when
    one it reads came to nothing (None). Returns {key: what its fn returned}."""
    done, running = {}, {}
    with ThreadPoolExecutor(jobs) as pool:
        while len(done) < len(tasks):
            for key, (reads, fn) in tasks.items():
                if key in done or key in running.values() or not all(r in done for r in reads):
                    continue
                if any(done[r] is None for r in reads):
                    done[key] = None
                elif jobs == 1:
                    done[key] = fn()
                elif len(running) < jobs:
                    running[pool.submit(fn)] = key
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                done[running.pop(future)] = future.result()
    return done


def run_stages(args, costs: dict) -> dict:
    """The base's evaluations, then every trained run of seeds --first-seed.. (the paper's five, the variants beside
    them with --variants, or --only's) with its evaluations, drift and snapshots: each stage a task that starts once
    the checkpoints and evaluations it reads are there, --jobs at a time, seed by seed, a run's own stages before the
    next run's training (the teachers' first, an OPD run after its teacher), so that a study cut short leaves whole
    runs. Returns {run: [status per seed]}."""
    names = args.only.split(",") if args.only else [s.name for s in stages() if args.variants or s.name in CORE]
    check_only(args, set(names))
    statuses, tasks = {}, {}

    def trained(s, seed):   # train() as a task: its status kept; the checkpoint, or None when it did not train
        status = statuses[s.name, seed] = {**train(args, s, seed, costs), "seed": seed}
        return None if "failed" in status else status["checkpoint"]

    tasks["eval", "base"] = [], partial(evaluate_model, args, "base", None, costs)
    if args.variants:
        tasks["passk", "base"] = [], partial(evaluate_model, args, "base", None, costs, "passk")
    students = [s.teacher for s in stages() if s.name in names]
    for seed in range(args.first_seed, args.seeds):   # a teacher's training first: its students wait for it
        for s in sorted((s for s in stages() if s.name in names), key=lambda s: -students.count(s.name)):
            model, ckpt = f"{s.name}_s{seed}", ckpt_path(args, s.name, seed)
            teacher = [("train", f"{s.teacher}_s{seed}")] if s.teacher in names else []
            tasks["train", model] = teacher, partial(trained, s, seed)
            reads = [("train", model)]        # its evaluations, drift and snapshots wait for its training
            tasks["eval", model] = reads + [("eval", "base")], partial(evaluate_model, args, model, ckpt, costs)
            if args.variants:
                tasks["passk", model] = reads, partial(evaluate_model, args, model, ckpt, costs, "passk")
            tasks["drift", model] = reads, partial(measure_drift, args, model, ckpt, costs)
            if args.frontier:
                tasks["snapshots", model] = reads, partial(snapshots, args, model, ckpt, costs)
    # --jobs > 1: the scripts run in --jobs worker processes on one CPU thread each, one stage at a time (_timed)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, spawn, initializer=torch.set_num_threads, initargs=(1,)) as args.workers:
        done = schedule(tasks, args.jobs)
    runs = {name: [] for name in names}
    for (name, seed), status in sorted(statuses.items(), key=lambda item: item[0][1]):   # seed by seed
        model = f"{name}_s{seed}"
        if "failed" not in status:    # what its tasks returned, where the summary reads it
            status.update({k: done[k, model] for k in ("eval", "passk", "drift", "snapshots") if (k, model) in done})
        runs[name].append(status)
    return runs
