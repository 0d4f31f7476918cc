"""The paper's whole study in one command: train every method, evaluate every model, measure every drift.

    python reproduce.py --model tiny                        # the bundled tiny world, 2 CPU cores (see README)
    python reproduce.py --model tiny --seeds 3              # trained runs repeated over seeds 0..2: mean ± std
    python reproduce.py --model Qwen/Qwen3-0.6B-Base        # the paper's setting, on a GPU
    python reproduce.py --model Qwen/Qwen3-0.6B-Base --data-dir ../shared/data   # the same, local data

What it runs, in order (each a call of the script that owns it, with the flags shown in results.json):
1. evaluate.py on the base model: GSM8K (target), TruthfulQA-MC and MMLU (retention).
2. The trained runs, each a LoRA adapter on the base:
     sft_mild, sft_stress            train_sft.py --preset mild | stress         dataset states, gold tokens
     grpo                            train_grpo.py                                learner states, reward
     sft_learner                     train_sft.py --states learner               learner states, own correct samples
     opd_stress, opd_mild            train_opd.py --teacher sft_stress | sft_mild learner states, teacher continuation
     opd_kl                          train_opd.py --teacher sft_stress --signal kl   one-step exact KL (collapsed in the paper)
     opd_sampled_kl                  train_opd.py --teacher sft_stress --signal sampled-kl   the sampled KL as a
                                                                   per-token advantage (OPD as the field runs it)
     opd_stress_on_teacher_states,   train_opd.py --teacher sft_stress --states teacher | data:
     opd_stress_on_data_states         the state-source contrast: opd_stress's signal, other states
3. evaluate.py on every adapter, with the base as --baseline (forgetting and retention, Eq. 12), and GSM8K pass@k
   of every model from 8 samples per problem (evaluate.py --samples 8, eval/<model>_passk.json).
4. drift.py of every adapter against the base: lexical features (the paper's) and the base model's hidden states.
5. results.json, results.md (Table 2 with the paper's numbers beside ours; every difference from the base with a
   95% interval, paired over items and hierarchical over seeds; drift and the policy KLs, and how each tracks
   forgetting; pass@k; the state-source x signal grid and state locality; the paper's conditions C1-C4 and
   predictions P1-P4, each decided from the interval of its difference)
   and plots (training curves; retention against each drift measure).
With --frontier every run also keeps its adapter after a quarter and half of its steps (train_*.py --snapshots),
which are evaluated too: frontier.png draws target accuracy against retention along each run, and results.md
gives each method's retention at the target accuracies the methods share (retention at matched gain).

Everything goes under --out: ckpt/, eval/, drift/, rollouts/ and the report. Rerunning is resumable: a finished
stage's output is reused (unless its input checkpoint is newer), an interrupted training run continues from its
last checkpoint (train_*.py --resume).

Settings. With a real model every stage runs the scripts' defaults, which are the paper's protocol
(evaluation on 500 GSM8K / 200 TruthfulQA / 500 MMLU items, the stress preset of 5 epochs at lr 5e-4 with
LoRA r 64). With `--model tiny` the evaluation and drift protocols stay the same and the trained runs are
set (PROFILES["tiny"]) to the paper's data regime: about half an hour for one seed on two CPU cores (estimated).
`--quick` shrinks everything to a smoke run (CI runs it as a test). Explicit per-script flags can be appended
with --extra SCRIPT="FLAGS" (they come last, so they override).
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distributed
import drift
import evaluate
import train_grpo
import train_opd
import train_sft
from lora import load_checkpoint
from cli import COUNT, SIZE, FlagParser, output_dir, run, write_text
from model import LoadError
from training import NonFiniteLoss, finished, snapshot_path, snapshot_steps

SCRIPTS = {"train_sft.py": train_sft, "train_grpo.py": train_grpo, "train_opd.py": train_opd}
FRONTIER = (0.25, 0.5)    # --frontier: the fractions of every run kept (train_*.py --snapshots) and evaluated
BOOTSTRAP = 2000          # resamples of every interval
SIMILAR = 0.25            # P4: "similar drift" = a difference interval around zero narrower than this x the drift
TASK_KEYS = ("gsm8k", "truthfulqa", "truthfulqa_mc2", "mmlu")
# the drift measures set against forgetting: MMD² of rollout states, and the policy KLs on target / retention prompts
MEASURES = {"mmd2_lexical": "MMD² lexical", "mmd2_hidden": "MMD² hidden",
            "kl_base_policy_target": "KL(π0‖π) target", "kl_policy_base_target": "KL(π‖π0) target",
            "kl_base_policy_retention": "KL(π0‖π) retention", "kl_policy_base_retention": "KL(π‖π0) retention"}

CURVE_LABELS = {"loss": "loss (nats per supervised token)", "reward": "mean exact-answer reward",
                "accepted": "fraction of samples correct", "reverse_kl_sampled": "sampled reverse KL per token"}

# The paper's Table 2 (GSM8K, TruthfulQA, MMLU) and the figures its text gives (MMD; the KL-OPD collapse).
PAPER = {
    "base": {"gsm8k": 0.448, "truthfulqa": 0.300, "mmlu": 0.436},
    "sft_mild": {"gsm8k": 0.512},
    "sft_stress": {"gsm8k": 0.420, "truthfulqa": 0.245, "mmlu": 0.364, "mmd2": 0.01093},
    "opd_stress": {"gsm8k": 0.466, "truthfulqa": 0.275, "mmlu": 0.430, "mmd2": 0.01092},
    "opd_kl": {"gsm8k": 0.040},
    "grpo": {"gsm8k": 0.472, "truthfulqa": 0.290, "mmlu": 0.442},
}


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
# "tiny": the tiny world on 2 CPU cores, about half an hour a seed; "quick": a smoke run.
PROFILES = {
    "paper": {"train": {}, "evaluate": [], "drift": [], "passk": ["--samples", "8"]},
    "tiny": {
        # The SFT presets unchanged (mild: 1 epoch, lr 1e-4, r 16; stress: 5 epochs, lr 5e-4, r 64) over all 7,473
        # train problems, as in the paper (mild in batches of 8: 935 steps; stress in batches of 16: 2,340 steps).
        # RFT: the first 1,000 problems (125 steps of 8 prompts x 8 samples). GRPO: 300 steps of 8 prompts x 8
        # samples at lr 3e-4; OPD: 50 steps of 8 prompts at lr 2e-4 (tiny/README.md: how these were chosen).
        "train": {
            "train_sft.py": ["--batch-size", "8", "--save-every", "100"],
            "sft_stress": ["--batch-size", "16"],
            "sft_learner": ["--limit", "1000"],
            "train_grpo.py": ["--max-steps", "300", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-4",
                              "--save-every", "50"],
            "train_opd.py": ["--max-steps", "50", "--lr", "2e-4", "--save-every", "10"],
        },
        # every target and retention item (1,319 / 817 / 535: narrower intervals, about 20 s a model); 256 new tokens
        "evaluate": ["--batch-size", "128", "--limit", "0"],
        "drift": ["--batch-size", "128", "--prompts", "64"],   # 64 prompts x 4 rollouts, a state every 16 tokens
        "passk": ["--batch-size", "256", "--limit", "200", "--samples", "8"],   # the first 200 problems x 8 samples
    },
    "quick": {
        "train": {
            "train_sft.py": ["--limit", "32", "--max-steps", "3", "--batch-size", "8"],
            "train_grpo.py": ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--group-size", "4",
                              "--max-new-tokens", "64"],
            "train_opd.py": ["--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "24", "--cuts", "2",
                             "--continuation-tokens", "8"],
            "sft_learner": ["--group-size", "4", "--max-new-tokens", "96"],   # tiny solutions: about 40 tokens
        },
        "evaluate": ["--limit", "12", "--max-new-tokens", "32"],
        "drift": ["--prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "24", "--bootstrap", "20",
                  "--state-stride", "4"],
        "passk": ["--limit", "4", "--samples", "2", "--max-new-tokens", "16"],
    },
}


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="the base: tiny (the bundled world), an HF model directory or hub id")
    p.add_argument("--data-dir", default=None, help="local data (default: tiny/data for tiny, else the HF hub)")
    p.add_argument("--out", default=None, help="study directory (default: runs/<model name>)")
    p.add_argument("--seeds", type=SIZE, default=1, help="repeat every trained run with seeds 0..N-1")
    p.add_argument("--first-seed", type=COUNT, default=0, help="train only seeds K..N-1 (a second process sharing --out "
                   "takes the last seeds; a final run without it reuses every stage and reports all seeds)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps and examples per stage")
    p.add_argument("--only", default=None, help="comma-separated trained runs to do (default: all)")
    p.add_argument("--frontier", action="store_true", help="also evaluate every run after "
                   f"{' and '.join(map(str, FRONTIER))} of its steps: retention against target accuracy, at matched gain")
    p.add_argument("--features", default="lexical,hidden", help="drift representations (drift.py --features)")
    p.add_argument("--extra", action="append", default=[], metavar='SCRIPT="FLAGS"',
                   help='flags appended to every call of a script, e.g. --extra train_grpo.py="--max-steps 50"')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.first_seed >= args.seeds:
        p.error(f"--first-seed {args.first_seed}: the seeds are 0..{args.seeds - 1}")
    args.profile = "quick" if args.quick else ("tiny" if args.model == "tiny" else "paper")
    args.out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.model)) +
                                        ("_quick" if args.quick else ""))
    extra = {}
    for item in args.extra:
        script, _, flags = item.partition("=")
        extra.setdefault(script, []).extend(shlex.split(flags))
    args.extra = extra
    return args


# ----------------------------------------------------------------------------------------------
# Running the stages (each skipped when its output is already there)


def _newer(path: str, than: list[str]) -> bool:
    """Whether `path` exists and is at least as new as every file in `than`."""
    return os.path.exists(path) and all(os.path.getmtime(path) >= os.path.getmtime(t) for t in than)


def _timed(costs: dict, key: str, fn):
    """Run a stage, recording its wall seconds and, on CUDA, its peak GPU memory (what the real run costs)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    costs["seconds"][key] = round(time.perf_counter() - t0, 1)
    if cuda:
        costs["peak_gpu_gib"][key] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _data_flag(args) -> list:
    """--data-dir for the scripts when given (without it they find tiny/data for --model tiny, else the hub)."""
    return ["--data-dir", args.data_dir] if args.data_dir else []


def ckpt_path(args, name: str, seed: int) -> str:
    return os.path.join(args.out, "ckpt", f"{name}_s{seed}.pt")


def train(args, stage: Stage, seed: int, costs: dict) -> dict:
    """Train one run (or resume it, or reuse it when finished). Returns its status."""
    out = ckpt_path(args, stage.name, seed)
    status = {"checkpoint": out, "log": os.path.splitext(out)[0] + ".jsonl"}
    if _finished(out):
        return status
    prof = PROFILES[args.profile]["train"]
    # OPD takes the base model and data from its teacher's checkpoint, as a user would run it.
    base = ["--teacher", ckpt_path(args, stage.teacher, seed)] if stage.teacher else ["--model", args.model] + _data_flag(args)
    argv = (base + stage.flags + prof.get(stage.script, []) + prof.get(stage.name, []) + args.extra.get(stage.script, []) +
            ["--seed", str(seed), "--out", out, "--device", args.device] + (["--resume"] if os.path.exists(out) else []) +
            (["--snapshots", ",".join(map(str, FRONTIER))] if args.frontier else []))
    status["argv"] = argv
    print(f"\n== {stage.name} (seed {seed}): python {stage.script} {shlex.join(argv)}", flush=True)
    try:
        _timed(costs, f"train/{stage.name}_s{seed}", lambda: SCRIPTS[stage.script].main(argv))
    except NonFiniteLoss as e:  # a collapse is a result: report it, go on with the other runs
        print(f"{stage.name}: {e}", file=sys.stderr)
        status["failed"] = str(e)
        return status
    except SystemExit as e:     # Ctrl-C or SIGTERM: the trainer checkpointed its last step
        if e.code in (130, 143):
            print(f"{stage.name} (seed {seed}) stopped: the same reproduce.py command resumes it", file=sys.stderr)
        raise
    if not _finished(out):  # e.g. --stop-after among the extra flags: nothing to evaluate yet
        status["failed"] = "stopped before its last step; rerun reproduce.py to resume it"
    return status


def _finished(ckpt: str) -> bool:
    return os.path.exists(ckpt) and finished(load_checkpoint(ckpt))   # read onto the CPU, wherever it was trained


def evaluate_model(args, name: str, checkpoint: str | None, costs: dict, passk: bool = False) -> str:
    """evaluate.py on every task with the base as --baseline, or (passk) GSM8K's pass@k from sampled completions."""
    out = os.path.join(args.out, "eval", f"{name}_passk.json" if passk else f"{name}.json")
    base_json = os.path.join(args.out, "eval", "base.json")
    if _newer(out, [checkpoint] if checkpoint else []):
        return out
    flags = ["--tasks", "gsm8k"] + PROFILES[args.profile]["passk"] if passk else PROFILES[args.profile]["evaluate"]
    argv = ["--model", args.model, "--out", out, "--device", args.device] + flags + _data_flag(args)
    argv += ["--checkpoint", checkpoint] + ([] if passk else ["--baseline", base_json]) if checkpoint else []
    argv += args.extra.get("evaluate.py", [])
    print(f"\n== evaluate {name}{' pass@k' * passk}: python evaluate.py {shlex.join(argv)}", flush=True)
    _timed(costs, f"{'passk' if passk else 'evaluate'}/{name}", lambda: evaluate.main(argv))
    return out


def snapshots(args, name: str, checkpoint: str, costs: dict) -> dict:
    """--frontier: {fraction: evaluation} of the run's snapshots (those kept: a run trained without --frontier
    has none, and is retrained only if its checkpoint is removed)."""
    total = load_checkpoint(checkpoint)["train_state"]["total_steps"]
    out = {}
    for f in FRONTIER:
        step = snapshot_steps([f], total)[0]
        path = snapshot_path(checkpoint, step)
        if os.path.exists(path):
            out[str(f)] = evaluate_model(args, f"{name}_at{step}", path, costs)
        else:
            print(f"--frontier: {path} is missing (trained without --frontier?): no point at {f} of {name}", file=sys.stderr)
    return out


def measure_drift(args, name: str, checkpoint: str, features: str, costs: dict) -> str:
    out = os.path.join(args.out, "drift", f"{name}_{features}.json")
    if _newer(out, [checkpoint]):
        return out
    argv = ["--model", args.model, "--checkpoint", checkpoint, "--out", out, "--features", features, "--device",
            args.device, "--cache-dir", os.path.join(args.out, "rollouts")] + PROFILES[args.profile]["drift"]
    if features != args.features.split(",")[0]:
        argv.append("--no-policy-kl")     # the policy KLs do not depend on the features: measured in the first run
    argv += _data_flag(args) + args.extra.get("drift.py", [])
    print(f"\n== drift {name} ({features}): python drift.py {shlex.join(argv)}", flush=True)
    _timed(costs, f"drift/{name}_{features}", lambda: drift.main(argv))
    return out


# ----------------------------------------------------------------------------------------------
# Summaries


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def locality(log: list[dict]) -> dict:
    """State locality over a run: the mean state NLL under the base, and the target NLL at start and end."""
    def series(key):
        return [r[key] for r in log if key in r]
    state, target = series("state_nll_base"), series("target_nll")
    tenth = max(1, len(target) // 10)
    return {"state_nll_base": statistics.fmean(state) if state else None,
            "target_nll_start": statistics.fmean(target[:tenth]) if target else None,
            "target_nll_end": statistics.fmean(target[-tenth:]) if target else None}


def seed_scores(paths: list[str], keys=TASK_KEYS) -> dict:
    """{task: [seeds, items]} per-item scores of evaluations (their predictions JSONL beside each JSON)."""
    tables = [evaluate.item_scores(_log(os.path.splitext(p)[0] + ".jsonl")) for p in paths]
    return {t: np.stack([tb[t] for tb in tables]) for t in keys if all(t in tb for tb in tables)}


def pass_scores(paths: list[str]) -> dict:
    """{gsm8k_pass@k: [seeds, items]} from pass@k evaluations."""
    return seed_scores(paths, [k for k in evaluate.item_scores(_log(os.path.splitext(paths[0])[0] + ".jsonl"))
                               if k.startswith("gsm8k_pass@")])


def pass_at_k(paths: list[str]) -> dict:
    """{k: mean ± std over seeds} of GSM8K pass@k from pass@k evaluations."""
    runs = [_load(p)["tasks"]["gsm8k"]["pass_at_k"] for p in paths]
    return {k: mean_std([r[k]["score"] for r in runs]) for k in runs[0]}


def drift_measures(drift_paths: list[dict]) -> dict:
    """{measure: [per seed {value, and replicates (MMD²) or per_prompt (KL)}]} from a run's drift JSONs."""
    out = {}
    for paths in drift_paths:
        for feat, path in paths.items():
            d = _load(path)
            if "replicates" in d.get("mmd2_bootstrap", {}):
                out.setdefault(f"mmd2_{feat}", []).append({"value": d["mmd2"], "replicates": d["mmd2_bootstrap"]["replicates"]})
            for where, kl in d.get("policy_kl", {}).items():
                for k in ("kl_base_policy", "kl_policy_base"):
                    out.setdefault(f"{k}_{where}", []).append({"value": kl[k], "per_prompt": kl["per_prompt"][k]})
    return {k: out[k] for k in MEASURES if k in out and len(out[k]) == len(drift_paths)}


def summarize(args, runs: dict, costs: dict) -> dict:
    """results.json: per model the scores, forgetting/retention, drift and state locality (mean ± std over seeds),
    the intervals of every difference from the base, the predictions, the drift measures' correlations with
    forgetting and, with --frontier, retention along each run."""
    base_path = os.path.join(args.out, "eval", "base.json")
    base = _load(base_path)
    data = args.data_dir or ("tiny/data" if args.model == "tiny" else "huggingface hub")
    summary = {"model": args.model, "profile": args.profile, "seeds": args.seeds, "data_dir": data,
               "protocol": {t: v["protocol"] for t, v in base["tasks"].items()}, "models": {}, "costs": costs}
    summary["models"]["base"] = {"label": "Base", **{t: mean_std([base["tasks"][t]["score"]]) for t in evaluate.TASKS},
                                 "truthfulqa_mc2": mean_std([base["tasks"]["truthfulqa"]["mc2"]]),
                                 "stderr": {t: v["stderr"] for t, v in base["tasks"].items()}}
    scores, measures, points = {"base": seed_scores([base_path])}, {}, []
    base_pass = os.path.join(args.out, "eval", "base_passk.json")
    passes = {"base": pass_scores([base_pass])} if os.path.exists(base_pass) else {}
    if passes:
        summary["models"]["base"]["pass_at_k"] = pass_at_k([base_pass])
        gsm8k = _load(base_pass)["tasks"]["gsm8k"]
        summary["pass_protocol"] = {**gsm8k["protocol"]["pass_at_k"], "problems": gsm8k["n"]}
    for stage in stages():
        per_seed = [r for r in runs.get(stage.name, []) if "failed" not in r]
        row = {"label": stage.label, "states": stage.states, "signal": stage.signal,
               "runs": runs.get(stage.name, []), "failed": [r["failed"] for r in runs.get(stage.name, []) if "failed" in r]}
        evals = [_load(r["eval"]) for r in per_seed if "eval" in r]
        for task in evaluate.TASKS:
            row[task] = mean_std([e["tasks"][task]["score"] for e in evals if task in e["tasks"]])
        row["truthfulqa_mc2"] = mean_std([e["tasks"]["truthfulqa"]["mc2"] for e in evals if "truthfulqa" in e["tasks"]])
        row["forgetting"] = mean_std([e["forgetting"]["mean"]["forgetting"] for e in evals if "forgetting" in e])
        row["retention"] = mean_std([e["forgetting"]["mean"]["retention"] for e in evals if "forgetting" in e])
        for feat in args.features.split(","):
            drifts = [_load(r["drift"][feat]) for r in per_seed if feat in r.get("drift", {})]
            row[f"drift_{feat}"] = {k: mean_std([d[k] for d in drifts]) for k in
                                    ("mmd2", "centroid_l2", "sliced_wasserstein", "jaccard")}
            row[f"drift_{feat}"]["mmd2_bootstrap_std"] = mean_std([d["mmd2_bootstrap"]["std"] for d in drifts
                                                                   if "mmd2_bootstrap" in d])
        locs = [locality(_log(r["log"])) for r in per_seed]
        row["locality"] = {k: mean_std([loc[k] for loc in locs]) for k in
                           ("state_nll_base", "target_nll_start", "target_nll_end")}
        if len(evals) == len(per_seed) and evals:
            scores[stage.name] = seed_scores([r["eval"] for r in per_seed])
            row["intervals"] = differences(scores, stage.name)
            for f in FRONTIER:
                if all(str(f) in r.get("snapshots", {}) for r in per_seed):
                    scores[f"{stage.name}@{f}"] = seed_scores([r["snapshots"][str(f)] for r in per_seed])
            if passes and all("passk" in r for r in per_seed):
                row["pass_at_k"] = pass_at_k([r["passk"] for r in per_seed])
                passes[stage.name] = pass_scores([r["passk"] for r in per_seed])
                row["pass_intervals"] = {k: interval(passes, [stage.name], lambda m, k=k: m[stage.name][k] - m["base"][k],
                                                     [k]) for k in passes["base"]}
            measures[stage.name] = drift_measures([r.get("drift", {}) for r in per_seed])
            row["measures"] = {k: mean_std([d["value"] for d in v]) for k, v in measures[stage.name].items()}
            points += [{"run": stage.name, **{k: v[i]["value"] for k, v in measures[stage.name].items()},
                        **{k: e["forgetting"]["mean"][k] for k in ("forgetting", "retention")}} for i, e in enumerate(evals)]
        summary["models"][stage.name] = row
    summary["conditions"] = conditions(scores)
    summary["predictions"] = predictions(scores, measures)
    summary["correlations"] = {k: correlation([p[k] for p in points], [p["forgetting"] for p in points])
                               for k in MEASURES if points and all(k in p for p in points)}
    summary["points"] = points
    if args.frontier:
        summary["frontier"] = frontier(scores, [s.name for s in stages() if s.name in scores])
    return summary


# ----------------------------------------------------------------------------------------------
# The study as a test: intervals of differences (paired over items, hierarchical over seeds), the predictions
# decided from them, drift measures against forgetting, and retention at matched target gain

def eq12(m: dict, name: str):
    """Mean forgetting F and mean retention R of model `name` (Eq. 12) from per-task means (arrays over resamples)."""
    F = np.mean([m["base"][t] - m[name][t] for t in evaluate.RETENTION_TASKS], 0)
    R = np.mean([m[name][t] / m["base"][t] for t in evaluate.RETENTION_TASKS], 0)
    return F, R


def interval(scores: dict, names, statistic, tasks=TASK_KEYS) -> dict:
    """evaluate.bootstrap of statistic over the base and models `names` (only `tasks` resampled)."""
    chosen = {n: {t: scores[n][t] for t in tasks} for n in dict.fromkeys(["base", *names])}
    return evaluate.bootstrap(chosen, statistic, BOOTSTRAP)


def differences(scores: dict, name: str) -> dict:
    """A model against the base: each task's gain, and F and R of Eq. 12, with their intervals."""
    out = {f"gain_{t}": interval(scores, [name], lambda m, t=t: m[name][t] - m["base"][t], [t]) for t in TASK_KEYS}
    out["forgetting"] = interval(scores, [name], lambda m: eq12(m, name)[0], evaluate.RETENTION_TASKS)
    out["retention"] = interval(scores, [name], lambda m: eq12(m, name)[1], evaluate.RETENTION_TASKS)
    return out


def replicate_interval(a: np.ndarray, b: np.ndarray, estimate: float, seed: int = 0) -> dict:
    """Interval of mean(a) - mean(b) for per-seed bootstrap replicates a, b [seeds, B] of an MMD² (drift.py
    resamples rollouts with the same draws for every model): each resample draws seeds with replacement and
    one replicate index, shared by both models."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(a), (BOOTSTRAP, len(a)))
    j = rng.integers(0, a.shape[1], (BOOTSTRAP, 1))
    boot = a[seeds, j].mean(1) - b[seeds, j].mean(1)
    return {"estimate": estimate, "ci95": np.quantile(boot, [0.025, 0.975]).tolist(), "std": float(boot.std(ddof=1)),
            "resamples": BOOTSTRAP}


def drift_interval(measures: dict, a: str, b: str, key: str) -> dict:
    """Interval of drift measure `key` of run a minus run b (seed s with seed s)."""
    if key.startswith("mmd2"):
        ra, rb = (np.array([d["replicates"] for d in measures[n][key]]) for n in (a, b))
        est = np.mean([d["value"] for d in measures[a][key]]) - np.mean([d["value"] for d in measures[b][key]])
        return replicate_interval(ra, rb, float(est))
    per_prompt = {n: {key: np.array([d["per_prompt"] for d in measures[n][key]])} for n in (a, b)}
    return evaluate.bootstrap(per_prompt, lambda m: m[a][key] - m[b][key], BOOTSTRAP)


def combined(parts: list[dict]) -> str:
    """A prediction of several parts holds when all hold, is contradicted when any is, else undecided."""
    verdicts = [p["verdict"] for p in parts]
    return "contradicted" if "contradicted" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "undecided"


def decided(text: str, iv: dict, digits: int = 3) -> dict:
    """One difference of a prediction or condition: its interval and the verdict read from it."""
    return {"difference": text, "interval": iv, "verdict": evaluate.verdict(iv), "digits": digits}


def predictions(scores: dict, measures: dict) -> dict:
    """The paper's predictions P1-P4, each decided from the 95% intervals of the differences it is about.

    A difference predicted positive *holds* when its interval lies above zero, is *contradicted* when it lies
    below, and is *undecided* when it includes zero; a prediction of several differences holds when all hold
    and is contradicted when any is. P1: stress SFT forgets (F > 0) and mild SFT keeps more (R mild - R stress
    > 0). P2: the on-policy runs, GRPO and OPD from the stress teacher, keep more than stress SFT
    (R - R stress > 0). P3: the OPD student beats its degraded teacher on the target and on retention.
    P4, per drift measure: stress SFT and OPD have similar drift (the interval of the difference includes zero
    and its half-width is under a quarter of the larger drift, so a difference that large would have shown)
    and different retention; a measure whose difference interval excludes zero separates the two runs and
    contradicts P4 for that measure."""
    part = decided

    def R_minus(a, b, text):
        return part(text, interval(scores, [a, b], lambda m: eq12(m, a)[1] - eq12(m, b)[1], evaluate.RETENTION_TASKS))

    claims = {"P1": "stress SFT forgets, mild SFT does not", "P2": "the on-policy runs retain more than stress SFT",
              "P3": "the OPD student beats its degraded teacher", "P4": "similar drift can come with different retention"}
    out = {}
    if {"sft_mild", "sft_stress"} <= set(scores):
        out["P1"] = [part("F(SFT stress)", interval(scores, ["sft_stress"], lambda m: eq12(m, "sft_stress")[0],
                                                    evaluate.RETENTION_TASKS)),
                     R_minus("sft_mild", "sft_stress", "R(SFT mild) - R(SFT stress)")]
    if {"grpo", "opd_stress", "sft_stress"} <= set(scores):
        out["P2"] = [R_minus("grpo", "sft_stress", "R(GRPO) - R(SFT stress)"),
                     R_minus("opd_stress", "sft_stress", "R(OPD) - R(SFT stress)")]
    if {"opd_stress", "sft_stress"} <= set(scores):
        out["P3"] = [part("GSM8K(OPD) - GSM8K(SFT stress)", interval(
                         scores, ["opd_stress", "sft_stress"], lambda m: m["opd_stress"]["gsm8k"] - m["sft_stress"]["gsm8k"],
                         ["gsm8k"])),
                     R_minus("opd_stress", "sft_stress", "R(OPD) - R(SFT stress)")]
    result = {k: {"claim": claims[k], "parts": v, "verdict": combined(v)} for k, v in out.items()}
    if {"opd_stress", "sft_stress"} <= set(measures):
        retention = out["P3"][1]
        for key in measures["sft_stress"]:
            d = drift_interval(measures, "opd_stress", "sft_stress", key)
            scale = max(abs(np.mean([x["value"] for x in measures[n][key]])) for n in ("opd_stress", "sft_stress"))
            width = (d["ci95"][1] - d["ci95"][0]) / 2
            similar = bool(d["ci95"][0] <= 0 <= d["ci95"][1] and width < SIMILAR * scale)
            verdict = ("contradicted" if evaluate.verdict(d) != "undecided" else
                       "holds" if similar and retention["verdict"] != "undecided" else "undecided")
            result[f"P4 {key}"] = {"claim": claims["P4"], "verdict": verdict, "similar": similar,
                                   "half_width_over_drift": width / scale if scale else None,
                                   "parts": [part(f"{MEASURES[key]}(OPD) - {MEASURES[key]}(SFT stress)", d, 5), retention]}
    return result


def conditions(scores: dict) -> dict:
    """The four conditions of the paper's experiment that a world must meet before P1-P4 test anything, each
    decided like a prediction (every difference's interval above zero). C1: the base's target accuracy is within
    [0.30, 0.60] and its retention scores above chance (0.25: four choices). C2: mild SFT raises the target with
    mean retention R of at least 0.98. C3: stress SFT is a degraded teacher, below mild SFT on the target and on
    retention; C3b: below the base on the target too, as the paper's was. C4: GRPO and OPD from the stress
    teacher train long enough to raise the target."""
    def part(text, names, statistic, tasks):
        return decided(text, interval(scores, names, statistic, tasks))

    def gain(name, label):
        return part(f"GSM8K({label}) - GSM8K(base)", [name], lambda m: m[name]["gsm8k"] - m["base"]["gsm8k"], ["gsm8k"])

    retention = evaluate.RETENTION_TASKS
    out = {"C1": [part("GSM8K(base) - 0.30", [], lambda m: m["base"]["gsm8k"] - 0.30, ["gsm8k"]),
                  part("0.60 - GSM8K(base)", [], lambda m: 0.60 - m["base"]["gsm8k"], ["gsm8k"])] +
                 [part(f"{t}(base) - 0.25", [], lambda m, t=t: m["base"][t] - 0.25, [t]) for t in ("truthfulqa", "mmlu")]}
    if "sft_mild" in scores:
        out["C2"] = [gain("sft_mild", "SFT mild"),
                     part("R(SFT mild) - 0.98", ["sft_mild"], lambda m: eq12(m, "sft_mild")[1] - 0.98, retention)]
    if {"sft_mild", "sft_stress"} <= set(scores):
        pair = ["sft_mild", "sft_stress"]
        out["C3"] = [part("GSM8K(SFT mild) - GSM8K(SFT stress)", pair,
                          lambda m: m["sft_mild"]["gsm8k"] - m["sft_stress"]["gsm8k"], ["gsm8k"]),
                     part("R(SFT mild) - R(SFT stress)", pair,
                          lambda m: eq12(m, "sft_mild")[1] - eq12(m, "sft_stress")[1], retention)]
        out["C3b"] = [part("GSM8K(base) - GSM8K(SFT stress)", ["sft_stress"],
                           lambda m: m["base"]["gsm8k"] - m["sft_stress"]["gsm8k"], ["gsm8k"])]
    if {"grpo", "opd_stress"} <= set(scores):
        out["C4"] = [gain("grpo", "GRPO"), gain("opd_stress", "OPD")]
    return {k: {"parts": v, "verdict": combined(v)} for k, v in out.items()}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank (Spearman's convention)."""
    r = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
    for v in np.unique(x)[np.unique(x, return_counts=True)[1] > 1]:
        r[x == v] = r[x == v].mean()
    return r


def correlation(x, y, seed: int = 0) -> dict:
    """Pearson and Spearman correlation of x with y, each with a 95% bootstrap interval over the points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    draws = np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP, len(x)))
    out = {"n": len(x)}
    with warnings.catch_warnings():   # a resample of one repeated point has no correlation: NaN, dropped
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, f in (("pearson", lambda a, b: np.corrcoef(a, b)[0, 1]),
                        ("spearman", lambda a, b: np.corrcoef(_ranks(a), _ranks(b))[0, 1])):
            boot = np.array([f(x[d], y[d]) for d in draws])
            boot = boot[np.isfinite(boot)]
            out[name] = {"estimate": float(f(x, y)), "ci95": np.quantile(boot, [0.025, 0.975]).tolist() if len(boot)
                         else [float("nan")] * 2}
    return out


def along(acc: list, ret: list, level: float) -> np.ndarray:
    """Retention where a curve through points (acc_k, ret_k), k = 0, 1, .. (arrays over resamples) first reaches
    target accuracy `level`, linear between points; NaN where it never does."""
    out = np.full(np.shape(acc[0]), np.nan)
    for a0, a1, r0, r1 in zip(acc, acc[1:], ret, ret[1:]):
        moved = a0 != a1
        hit = np.isnan(out) & moved & (np.minimum(a0, a1) <= level) & (level <= np.maximum(a0, a1))
        w = (level - a0) / np.where(moved, a1 - a0, 1)
        out = np.where(hit, r0 + w * (r1 - r0), out)
    return out


def frontier(scores: dict, names: list[str]) -> dict:
    """Each method's trajectory (base, the --frontier snapshots, the final adapter) as target accuracy against
    mean retention, per seed and in the mean; and each method's retention at the target accuracies at least
    two methods reach, with intervals (retention at matched target gain)."""
    curves = {}
    for name in names:
        points = [f"{name}@{f}" for f in FRONTIER if f"{name}@{f}" in scores] + [name]
        if len(points) == 1:
            continue
        means = {n: {t: scores[n][t].mean(1) for t in TASK_KEYS} for n in ["base", *points]}   # per seed
        curves[name] = {"fractions": [0.0] + [float(p.split("@")[1]) for p in points[:-1]] + [1.0], "points": points,
                        "gsm8k": [float(scores["base"]["gsm8k"].mean())] + [float(means[p]["gsm8k"].mean()) for p in points],
                        "retention": [1.0] + [float(eq12(means, p)[1].mean()) for p in points],
                        "per_seed": {"gsm8k": [means[p]["gsm8k"].tolist() for p in points],
                                     "retention": [eq12(means, p)[1].tolist() for p in points]}}
    base_acc = float(scores["base"]["gsm8k"].mean())
    ranges = [(min(c["gsm8k"]), max(c["gsm8k"])) for c in curves.values()]
    levels = [lv for lv in np.round(np.arange(min([base_acc] + [r[0] for r in ranges]), max([base_acc] + [r[1] for r in ranges]),
                                              0.01), 2)
              if abs(lv - base_acc) >= 0.005 and sum(lo <= lv <= hi for lo, hi in ranges) >= 2]
    levels = [levels[i] for i in np.linspace(0, len(levels) - 1, min(len(levels), 8)).round().astype(int)] if levels else []
    table = {}
    for lv in levels:
        table[f"{lv:.2f}"] = {}
        for name, c in curves.items():
            if not min(c["gsm8k"]) <= lv <= max(c["gsm8k"]):
                continue
            def statistic(m, c=c, lv=lv):
                return along([m["base"]["gsm8k"]] + [m[p]["gsm8k"] for p in c["points"]],
                             [np.ones_like(m["base"]["gsm8k"])] + [eq12(m, p)[1] for p in c["points"]], lv)
            table[f"{lv:.2f}"][name] = interval(scores, c["points"], statistic, ("gsm8k", *evaluate.RETENTION_TASKS))
    return {"curves": curves, "base_gsm8k": base_acc, "matched": table}


def fmt(v: dict | None, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    s = f"{v['mean']:+.{digits}f}" if signed else f"{v['mean']:.{digits}f}"
    return s + (f" ± {v['std']:.{digits}f}" if v["n"] > 1 else "")


def report(summary: dict, out_dir: str, plots: list[str]) -> str:
    """results.md: Table 2's layout with the paper's numbers in parentheses, then drift, locality, predictions."""
    models = summary["models"]
    n = summary["seeds"]
    lines = [f"# The study on `{summary['model']}` ({summary['profile']} settings, {n} seed{'s' * (n > 1)})", "",
             "Written by `reproduce.py`; every number below is in results.json beside this file. "
             + ("Mean ± std over seeds (the base is evaluated once: greedy decoding and scoring are deterministic). "
                if n > 1 else "") + "The paper's numbers (Qwen3-0.6B-Base on the real tasks) are in parentheses where it gives them; on "
             "another model or world, compare directions and gaps, not levels.",
             "", "## Table 2: target accuracy, retention, drift", "",
             "| model | GSM8K | TruthfulQA MC1 | MMLU | mean forgetting F | mean retention R | MMD² (lexical) | MMD² (hidden) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(name, value, paper_key=None, digits=3, signed=False):
        paper = PAPER.get(name, {}).get(paper_key)
        return fmt(value, digits, signed) + (f" ({paper:.{digits}f})" if paper is not None else "")

    for name, row in models.items():
        label = row["label"] + (" — failed: " + "; ".join(row["failed"]) if row.get("failed") else "")
        lex, hid = row.get("drift_lexical", {}).get("mmd2"), row.get("drift_hidden", {}).get("mmd2")
        lines.append(f"| {label} | {cell(name, row['gsm8k'], 'gsm8k')} | {cell(name, row['truthfulqa'], 'truthfulqa')} | "
                     f"{cell(name, row['mmlu'], 'mmlu')} | {cell(name, row.get('forgetting'), signed=True)} | "
                     f"{cell(name, row.get('retention'))} | {cell(name, lex, 'mmd2', 5)} | {cell(name, hid, digits=4)} |")
    lines += ["", "F = base − post and R = post / base per retention task, averaged over TruthfulQA (MC1) and MMLU "
              "(Eq. 12). MMD² is the unbiased RBF-kernel estimate between the model's rollout states and the base "
              "model's (drift.py). The paper's drift figures are quoted from its text, which calls them MMD without saying "
              "whether squared; its KL-OPD GSM8K figure (0.040) too.", "",
              "## Drift in detail", "",
              "| model | features | MMD² | bootstrap std | centroid L2 | sliced Wasserstein | Jaccard |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in models.items():
        for key in [k for k in row if k.startswith("drift_")]:
            d = row[key]
            lines.append(f"| {row['label']} | {key[6:]} | {fmt(d['mmd2'], 5)} | {fmt(d['mmd2_bootstrap_std'], 5)} | "
                         f"{fmt(d['centroid_l2'], 4)} | {fmt(d['sliced_wasserstein'], 4)} | {fmt(d['jaccard'], 4)} |")
    lines += intervals_tables(summary) + pass_table(summary) + grid_table(summary)
    lines += ["", "## State locality (logged by every trainer at every step)", "",
              "state NLL: the mean per-token NLL, under the frozen base policy, of the state tokens where the step "
              "applied supervision (high = off-policy states). target NLL: the learner's NLL of its supervision "
              "targets, over the first and the last tenth of the run.", "",
              "| run | state source | signal | state NLL under base | target NLL start | target NLL end |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, row in models.items():
        if "locality" in row:
            loc = row["locality"]
            lines.append(f"| {row['label']} | {row['states']} | {row['signal']} | {fmt(loc['state_nll_base'])} | "
                         f"{fmt(loc['target_nll_start'])} | {fmt(loc['target_nll_end'])} |")
    lines += ["", "## The paper's conditions: is this the paper's experiment?", "",
              " ".join(line.strip() for line in conditions.__doc__.split("\n")), ""]
    for key, c in summary.get("conditions", {}).items():
        lines.append(f"- **{key}**: **{c['verdict']}** (" + "; ".join(
            f"{q['difference']} {ci(q['interval'], q['digits'])} {q['verdict']}" for q in c["parts"]) + ")")
    lines += ["", "## The paper's predictions, decided from intervals", "",
              predictions.__doc__.split("\n\n")[1].strip().replace("\n    ", " "), ""]
    for key, p in summary["predictions"].items():
        width = (f"; half-width {p['half_width_over_drift']:.2f} x the drift" if p.get("half_width_over_drift") is not None
                 else "")
        lines.append(f"- **{key}** {p['claim']}: **{p['verdict']}** (" + "; ".join(
            f"{q['difference']} {ci(q['interval'], q['digits'])}"
            f" {q['verdict']}" for q in p["parts"]) + width + ")")
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    lines += cost_table(summary["costs"])
    path = os.path.join(out_dir, "results.md")
    write_text(path, "\n".join(lines) + "\n")
    return path


def ci(iv: dict | None, digits: int = 3, signed: bool = True) -> str:
    """An estimate with its 95% interval: +0.012 [+0.003, +0.021] (a difference), 0.990 [0.981, 0.998] (a ratio)."""
    if iv is None:
        return "–"
    f = f"{'+' if signed else ''}.{digits}f"
    return f"{iv['estimate']:{f}} [{iv['ci95'][0]:{f}}, {iv['ci95'][1]:{f}}]"


def intervals_tables(summary: dict) -> list[str]:
    """results.md's tables of differences from the base, policy KLs, correlations and retention at matched gain."""
    models = {k: v for k, v in summary["models"].items() if "intervals" in v}
    base = summary["models"]["base"]
    out = ["", "## Differences from the base, with 95% intervals", "",
           f"Paired over the same items and hierarchical over seeds (evaluate.bootstrap, {BOOTSTRAP} resamples). "
           "The base's standard errors (lm-evaluation-harness's sample std / √n): " +
           ", ".join(f"{t} {base[t]['mean']:.3f} ± {v:.3f}" for t, v in base["stderr"].items()) + ".", "",
           "| model | Δ GSM8K | Δ TruthfulQA MC1 | Δ TruthfulQA MC2 | Δ MMLU | mean forgetting F | mean retention R |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in models.values():
        iv = row["intervals"]
        out.append(f"| {row['label']} | " + " | ".join(ci(iv[f"gain_{t}"]) for t in TASK_KEYS) +
                   f" | {ci(iv['forgetting'])} | {ci(iv['retention'], signed=False)} |")
    kls = [k for k in MEASURES if k.startswith("kl") and any(k in r.get("measures", {}) for r in models.values())]
    if kls:
        out += ["", "## Policy KL (drift.py): per token, exact over the vocabulary, mean over states and prompts", "",
                "KL(π0‖π) at the base's own rollout states (RL's Razor's quantity), KL(π‖π0) at the post-trained "
                "policy's; target: the GSM8K drift prompts, retention: TruthfulQA and MMLU contexts.", "",
                "| model | " + " | ".join(MEASURES[k] for k in kls) + " |", "| --- |" + " --- |" * len(kls)]
        for row in models.values():
            out.append(f"| {row['label']} | " + " | ".join(fmt(row["measures"].get(k), 4) for k in kls) + " |")
    if summary["correlations"]:
        out += ["", "## Which drift measure tracks forgetting", "",
                f"Correlation of each measure with the mean forgetting F across all trained runs and seeds "
                f"({len(summary['points'])} points), 95% bootstrap intervals over the points.", "",
                "| measure | Pearson r | Spearman ρ |", "| --- | --- | --- |"]
        for k, c in summary["correlations"].items():
            out.append(f"| {MEASURES[k]} | {ci(c['pearson'], 2)} | {ci(c['spearman'], 2)} |")
    fr = summary.get("frontier")
    if fr and fr["matched"]:
        names = list(fr["curves"])
        out += ["", "## Retention at matched target gain (--frontier)", "",
                f"Each method's mean retention R where its trajectory (base, {', '.join(map(str, FRONTIER))} and all of "
                f"its steps; the mean over seeds) reaches a GSM8K accuracy, linear between points; base accuracy "
                f"{fr['base_gsm8k']:.3f}. Intervals resample items and seeds; – where the method does not reach it.", "",
                "| GSM8K accuracy | " + " | ".join(summary["models"][n]["label"] for n in names) + " |",
                "| --- |" + " --- |" * len(names)]
        for level, cells in fr["matched"].items():
            out.append(f"| {level} | " + " | ".join(ci(cells[n], signed=False) if n in cells else "–" for n in names) + " |")
    return out


def pass_table(summary: dict) -> list[str]:
    """GSM8K pass@k of every model, and its difference from the base's with a 95% interval (paired over problems)."""
    models = {k: v for k, v in summary["models"].items() if "pass_at_k" in v}
    if "base" not in models:
        return []
    ks = list(models["base"]["pass_at_k"])
    p = summary["pass_protocol"]
    out = ["", "## pass@k on GSM8K (evaluate.py --samples)", "",
           f"From n = {p['samples']} samples per problem at temperature {p['temperature']} on the first {p['problems']} "
           "test problems, by Chen et al. (2021)'s unbiased estimator; the greedy accuracy of Table 2 stays the target "
           "score. A method that teaches new solutions raises pass@k at every k; one that sharpens what the base could "
           "already sample raises pass@1 and not pass@k at the largest k. Δ: against the base, paired over problems.", "",
           "| model | " + " | ".join(f"pass@{k}" for k in ks) + " | " + " | ".join(f"Δ pass@{k}" for k in (ks[0], ks[-1])) + " |",
           "| --- |" + " --- |" * (len(ks) + 2)]
    for row in models.values():
        iv = row.get("pass_intervals", {})
        out.append(f"| {row['label']} | " + " | ".join(fmt(row["pass_at_k"][k]) for k in ks) + " | " +
                   " | ".join(ci(iv.get(f"gsm8k_pass@{k}")) for k in (ks[0], ks[-1])) + " |")
    return out


def grid_table(summary: dict) -> list[str]:
    """The paper's two axes: every trained run in its cell of state source x signal, with ΔGSM8K and R."""
    runs = [(name, row) for name, row in summary["models"].items() if name != "base"]
    order = ["dataset", "learner", "teacher", "gold tokens", "own correct samples", "teacher continuation", "exact KL",
             "sampled KL", "exact-answer reward"]            # dense signals first, the sparse reward last
    rank = lambda x: order.index(x) if x in order else len(order)   # noqa: E731
    sources = sorted(dict.fromkeys(row["states"] for _, row in runs), key=rank)
    signals = sorted(dict.fromkeys(row["signal"] for _, row in runs), key=rank)

    def cell(source, signal):
        return "<br>".join(f"{row['label']}: Δ {row['intervals']['gain_gsm8k']['estimate']:+.3f}, "
                           f"R {row['intervals']['retention']['estimate']:.3f}" if "intervals" in row else row["label"]
                           for _, row in runs if row["states"] == source and row["signal"] == signal) or "·"
    return ["", "## The two axes: state source x signal", "",
            "Every trained run in its cell, with its GSM8K gain over the base and its mean retention R (the intervals are "
            "in the tables above); · = a cell no run fills.", "",
            "| state source \\ signal | " + " | ".join(signals) + " |", "| --- |" + " --- |" * len(signals)] + \
           [f"| {source} | " + " | ".join(cell(source, signal) for signal in signals) + " |" for source in sources]


def cost_table(costs: dict) -> list[str]:
    """Seconds per run and stage kind (per seed, averaged), and the peak GPU memory: what a study costs."""
    seconds, memory = costs["seconds"], costs["peak_gpu_gib"]
    if not seconds:
        return ["", "No stage's cost was measured (each was reused from a study without a results.json)."]
    total, seeds, peak = {}, {}, {}
    for key, sec in seconds.items():
        kind, name = key.split("/", 1)     # train/grpo_s0, evaluate/grpo_s0, evaluate/grpo_s0_at10, drift/grpo_s0_lexical,
                                           # passk/grpo_s0
        if kind == "drift":
            name = name.rsplit("_", 1)[0]
        elif "_at" in name:                # a --frontier snapshot
            kind, name = "frontier", name.rsplit("_at", 1)[0]
        run, _, seed = name.rpartition("_s") if name != "base" else ("base", "", "0")
        total[(run, kind)] = total.get((run, kind), 0.0) + sec
        seeds.setdefault(run, set()).add(seed)
        peak[run] = max(peak.get(run, 0.0), memory.get(key, 0.0))
    kinds = ["train", "evaluate", "drift"] + [k for k in ("passk", "frontier") if any(kind == k for _, kind in total)]
    out = ["", f"## Cost ({sum(seconds.values()) / 60:.1f} min of stages, each measured when it ran)", "",
           "Wall seconds per seed (drift: all feature sets; frontier: evaluating the run's snapshots)" +
           ("; peak GPU memory, GiB." if memory else "."), "",
           "| run | " + " | ".join(f"{k} s" for k in kinds) + " |" + (" peak GPU GiB |" if memory else ""),
           "| --- |" + " --- |" * len(kinds) + (" --- |" if memory else "")]
    for run in seeds:
        cells = [f"{total[(run, k)] / len(seeds[run]):.0f}" if (run, k) in total else "–" for k in kinds]
        out.append(f"| {run} | " + " | ".join(cells) + " |" + (f" {peak[run]:.1f} |" if memory else ""))
    return out


def ema(values: list, span: float | None = None) -> list:
    """Exponential moving average, decay 1 - 2 / (span + 1) with span a tenth of the run by default,
    bias-corrected so that the first steps are not pulled toward zero: the trend a curve's noise hides."""
    span = span or max(2.0, len(values) / 10)
    decay, avg, out = 1 - 2 / (span + 1), 0.0, []
    for t, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** t))
    return out


def plot(summary: dict, out_dir: str) -> list[str]:
    """training_curves.png (each run's loss or reward per step, with its moving average) and retention_vs_drift.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    trained = {k: v for k, v in summary["models"].items() if k != "base"}
    curves = {s.name: s.curve for s in stages()}
    cols = 4
    fig, axes = plt.subplots(-(-len(trained) // cols), cols, figsize=(16, 3.5 * -(-len(trained) // cols)), squeeze=False)
    for ax in list(axes.flat)[len(trained):]:
        ax.axis("off")
    for ax, (name, row) in zip(axes.flat, trained.items()):
        key = curves.get(name, "loss")
        for r, color in zip(row["runs"], ("C0", "C1", "C2", "C3", "C4")):
            log = [x for x in _log(r["log"]) if key in x]
            x, y = [e["step"] for e in log], [e[key] for e in log]
            ax.plot(x, y, color=color, lw=0.6, alpha=0.25)       # every step, faint: mostly noise
            ax.plot(x, ema(y), color=color, lw=1.8, label=f"seed {r['seed']}" if "seed" in r else None)
        ax.set_title(row["label"], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(CURVE_LABELS.get(key, key), fontsize=8)
        if len(row["runs"]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    curves = "training_curves.png"
    fig.savefig(os.path.join(out_dir, curves), dpi=110)
    plt.close(fig)

    keys = [k for k in MEASURES if k in summary["correlations"]]
    cols = min(3, len(keys)) or 1
    fig, axes = plt.subplots(-(-len(keys) // cols) or 1, cols, figsize=(5.5 * cols, 4.2 * (-(-len(keys) // cols) or 1)),
                             squeeze=False)
    runs = list(dict.fromkeys(p["run"] for p in summary["points"]))
    for ax, key in zip(axes.flat, keys):
        for name, marker in zip(runs, "osD^v<>pPX*h"):
            pts = [p for p in summary["points"] if p["run"] == name]
            ax.plot([p[key] for p in pts], [p["retention"] for p in pts], marker, alpha=0.8, label=summary["models"][name]["label"])
        c = summary["correlations"][key]["pearson"]
        ax.set_title(f"{MEASURES[key]}: Pearson r with F {c['estimate']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]",
                     fontsize=9)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(MEASURES[key] + (" (nats per token)" if key.startswith("kl") else ""))
        ax.set_ylabel("mean retention ratio (post / base)")
    if keys:
        axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    scatter = "retention_vs_drift.png"
    fig.savefig(os.path.join(out_dir, scatter), dpi=110)
    plt.close(fig)
    plots = [curves, scatter]
    if summary.get("frontier", {}).get("curves"):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for (name, c), color in zip(summary["frontier"]["curves"].items(), [f"C{i}" for i in range(10)]):
            for acc, ret in zip(c["per_seed"]["gsm8k"], c["per_seed"]["retention"]):
                ax.plot(acc, ret, "o", color=color, alpha=0.3, ms=4)
            ax.plot(c["gsm8k"], c["retention"], "-o", color=color, lw=1.5, ms=5, label=summary["models"][name]["label"])
        ax.axvline(summary["frontier"]["base_gsm8k"], color="grey", lw=0.5)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("GSM8K accuracy (target)")
        ax.set_ylabel("mean retention ratio (post / base)")
        ax.set_title(f"Each run after {', '.join(map(str, FRONTIER))} and all of its steps (faint: one seed; line: "
                     "the mean, from the base)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=110)
        plt.close(fig)
        plots.append("frontier.png")
    return plots


# ----------------------------------------------------------------------------------------------


def check_only(args, only: set):
    """--only names known runs, and each OPD run among them has its teacher: in --only too, or already trained."""
    names = [s.name for s in stages()]
    unknown = sorted(only - set(names))
    if unknown:
        raise LoadError(f"--only: no run named {', '.join(unknown)} (the runs: {', '.join(names)})")
    for s in stages():
        if s.name in only and s.teacher and s.teacher not in only and not all(
                _finished(ckpt_path(args, s.teacher, seed)) for seed in range(args.seeds)):
            raise LoadError(f"--only: {s.name} learns from {s.teacher}, which is not trained under {args.out}: "
                            f"add {s.teacher} to --only")


def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed.init(args.device)     # under torchrun: join the group before any stage touches a GPU
    output_dir(os.path.join(args.out, "results.json"))
    only = set(args.only.split(",")) if args.only else None
    if only:
        check_only(args, only)
    previous = os.path.join(args.out, "results.json")   # a reused stage keeps the cost measured when it ran
    costs = _load(previous)["costs"] if os.path.exists(previous) else {"seconds": {}, "peak_gpu_gib": {}}
    evaluate_model(args, "base", None, costs)
    evaluate_model(args, "base", None, costs, passk=True)
    runs = {}
    for seed in range(args.first_seed, args.seeds):
        for stage in stages():
            if only and stage.name not in only:
                continue
            if stage.teacher and any("failed" in r for r in runs.get(stage.teacher, []) if r["seed"] == seed):
                continue  # its teacher did not train
            status = train(args, stage, seed, costs)
            status["seed"] = seed
            if "failed" not in status:
                status["eval"] = evaluate_model(args, f"{stage.name}_s{seed}", status["checkpoint"], costs)
                status["passk"] = evaluate_model(args, f"{stage.name}_s{seed}", status["checkpoint"], costs, passk=True)
                status["drift"] = {f: measure_drift(args, f"{stage.name}_s{seed}", status["checkpoint"], f, costs)
                                   for f in args.features.split(",")}
                if args.frontier:
                    status["snapshots"] = snapshots(args, f"{stage.name}_s{seed}", status["checkpoint"], costs)
            runs.setdefault(stage.name, []).append(status)
    if not distributed.main_rank():   # under torchrun (README: More GPUs) rank 0 writes the report
        return {}
    if os.path.exists(previous):      # stages that another process sharing --out ran in the meantime
        for kind, measured in _load(previous)["costs"].items():
            costs[kind] = {**measured, **costs[kind]}
    summary = summarize(args, runs, costs)
    plots = plot(summary, args.out)
    write_text(os.path.join(args.out, "results.json"), json.dumps(summary, indent=1))
    path = report(summary, args.out, plots)
    print(f"\nstudy done: {sum(costs['seconds'].values()) / 60:.1f} min of stages in all -> {path}")
    return summary


if __name__ == "__main__":
    run(main)
