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
     opd_stress, opd_mild            train_opd.py --teacher sft_stress | sft_mild learner states, teacher continuation
     opd_kl                          train_opd.py --teacher sft_stress --signal kl   one-step exact KL (collapsed in the paper)
     opd_stress_on_teacher_states,   train_opd.py --teacher sft_stress --states teacher | data:
     opd_stress_on_data_states         the state-source contrast: opd_stress's signal, other states
3. evaluate.py on every adapter, with the base as --baseline (forgetting and retention, Eq. 12).
4. drift.py of every adapter against the base: lexical features (the paper's) and the base model's hidden states.
5. results.json, results.md (Table 2 with the paper's numbers beside ours, drift, state locality, the paper's
   predictions P1-P4 checked against our numbers) and two plots (training curves; retention against drift).

Everything goes under --out: ckpt/, eval/, drift/, rollouts/ and the report. Rerunning is resumable: a finished
stage's output is reused (unless its input checkpoint is newer), an interrupted training run continues from its
last checkpoint (train_*.py --resume).

Settings. With a real model every stage runs the scripts' defaults, which are the paper's protocol
(evaluation on 500 GSM8K / 200 TruthfulQA / 500 MMLU items, the stress preset of 5 epochs at lr 5e-4 with
LoRA r 64). With `--model tiny` the evaluation and drift protocols stay the same and the trained runs are
shortened (PROFILES["tiny"]) so that the whole study fits in about a quarter of an hour on two CPU cores.
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
from dataclasses import dataclass

import torch

import drift
import evaluate
import train_grpo
import train_opd
import train_sft
from lora import load_checkpoint
from model import SIZE, FlagParser, LoadError, cli, output_dir, write_text
from training import NonFiniteLoss, finished

SCRIPTS = {"train_sft.py": train_sft, "train_grpo.py": train_grpo, "train_opd.py": train_opd}

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


def stages() -> list[Stage]:
    """The study's trained runs, in dependency order (a teacher before its students)."""
    return [
        Stage("sft_mild", "train_sft.py", ["--preset", "mild"], "SFT mild", "dataset", "gold tokens"),
        Stage("sft_stress", "train_sft.py", ["--preset", "stress"], "SFT stress", "dataset", "gold tokens"),
        Stage("grpo", "train_grpo.py", [], "GRPO", "learner", "exact-answer reward"),
        Stage("opd_stress", "train_opd.py", [], "OPD (stress teacher)", "learner", "teacher continuation", "sft_stress"),
        Stage("opd_mild", "train_opd.py", [], "OPD (mild teacher)", "learner", "teacher continuation", "sft_mild"),
        Stage("opd_kl", "train_opd.py", ["--signal", "kl"], "OPD one-step KL (stress teacher)", "learner",
              "teacher distribution (KL)", "sft_stress"),
        Stage("opd_stress_on_teacher_states", "train_opd.py", ["--states", "teacher"], "OPD signal on teacher states",
              "teacher", "teacher continuation", "sft_stress"),
        Stage("opd_stress_on_data_states", "train_opd.py", ["--states", "data"], "OPD signal on dataset states",
              "dataset", "teacher continuation", "sft_stress"),
    ]


# Per-setting flags added to the scripts' defaults. "paper": none (the scripts' defaults are the paper's).
# "tiny": the tiny world on 2 CPU cores, about a quarter of an hour in all; "quick": a smoke run.
PROFILES = {
    "paper": {"train": {}, "evaluate": [], "drift": []},
    "tiny": {
        # The SFT presets unchanged (mild: 1 epoch, lr 1e-4, r 16; stress: 5 epochs, lr 5e-4, r 64) on the first
        # 1,000 train problems in batches of 8 (125 and 625 steps). GRPO: 40 steps of 8 prompts x 8 samples; OPD:
        # 30 steps of 8 prompts; both at lr 2e-4 (the tiny model moves little at the 0.6B defaults of 5e-5 / 1e-4
        # in so few steps).
        "train": {
            "train_sft.py": ["--limit", "1000", "--batch-size", "8", "--save-every", "50"],
            "train_grpo.py": ["--max-steps", "40", "--batch-size", "4", "--grad-accum", "2", "--lr", "2e-4",
                              "--save-every", "10"],
            "train_opd.py": ["--max-steps", "30", "--lr", "2e-4", "--save-every", "10"],
        },
        "evaluate": ["--batch-size", "128"],      # the paper's protocol: 500 / 200 / 500 items, 256 new tokens
        "drift": ["--batch-size", "128", "--prompts", "64"],   # 64 prompts x 4 rollouts, a state every 16 tokens
    },
    "quick": {
        "train": {
            "train_sft.py": ["--limit", "32", "--max-steps", "3", "--batch-size", "8"],
            "train_grpo.py": ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--group-size", "4",
                              "--max-new-tokens", "64"],
            "train_opd.py": ["--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "24", "--cuts", "2",
                             "--continuation-tokens", "8"],
        },
        "evaluate": ["--limit", "12", "--max-new-tokens", "32"],
        "drift": ["--prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "24", "--bootstrap", "20",
                  "--state-stride", "4"],
    },
}


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="the base: tiny (the bundled world), an HF model directory or hub id")
    p.add_argument("--data-dir", default=None, help="local data (default: tiny/data for tiny, else the HF hub)")
    p.add_argument("--out", default=None, help="study directory (default: runs/<model name>)")
    p.add_argument("--seeds", type=SIZE, default=1, help="repeat every trained run with seeds 0..N-1")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps and examples per stage")
    p.add_argument("--only", default=None, help="comma-separated trained runs to do (default: all)")
    p.add_argument("--features", default="lexical,hidden", help="drift representations (drift.py --features)")
    p.add_argument("--extra", action="append", default=[], metavar='SCRIPT="FLAGS"',
                   help='flags appended to every call of a script, e.g. --extra train_grpo.py="--max-steps 50"')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
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
            ["--seed", str(seed), "--out", out, "--device", args.device] + (["--resume"] if os.path.exists(out) else []))
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


def evaluate_model(args, name: str, checkpoint: str | None, costs: dict) -> str:
    out = os.path.join(args.out, "eval", f"{name}.json")
    base_json = os.path.join(args.out, "eval", "base.json")
    if _newer(out, [checkpoint] if checkpoint else []):
        return out
    argv = ["--model", args.model, "--out", out, "--device", args.device] + PROFILES[args.profile]["evaluate"]
    argv += _data_flag(args)
    argv += ["--checkpoint", checkpoint, "--baseline", base_json] if checkpoint else []
    argv += args.extra.get("evaluate.py", [])
    print(f"\n== evaluate {name}: python evaluate.py {shlex.join(argv)}", flush=True)
    _timed(costs, f"evaluate/{name}", lambda: evaluate.main(argv))
    return out


def measure_drift(args, name: str, checkpoint: str, features: str, costs: dict) -> str:
    out = os.path.join(args.out, "drift", f"{name}_{features}.json")
    if _newer(out, [checkpoint]):
        return out
    argv = ["--model", args.model, "--checkpoint", checkpoint, "--out", out, "--features", features, "--device",
            args.device, "--cache-dir", os.path.join(args.out, "rollouts")] + PROFILES[args.profile]["drift"]
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


def summarize(args, runs: dict, costs: dict) -> dict:
    """results.json: per model the scores, forgetting/retention, drift and state locality (mean ± std over seeds)."""
    base = _load(os.path.join(args.out, "eval", "base.json"))
    data = args.data_dir or ("tiny/data" if args.model == "tiny" else "huggingface hub")
    summary = {"model": args.model, "profile": args.profile, "seeds": args.seeds, "data_dir": data,
               "protocol": {t: v["protocol"] for t, v in base["tasks"].items()}, "models": {}, "costs": costs}
    summary["models"]["base"] = {"label": "Base", **{t: mean_std([base["tasks"][t]["score"]]) for t in evaluate.TASKS},
                                 "truthfulqa_mc2": mean_std([base["tasks"]["truthfulqa"]["mc2"]])}
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
        summary["models"][stage.name] = row
    summary["predictions"] = predictions(summary["models"])
    return summary


def _m(row: dict, key: str, sub: str | None = None):
    v = row.get(key) if sub is None else (row.get(key) or {}).get(sub)
    return v["mean"] if v else None


def predictions(models: dict) -> dict:
    """The paper's predictions P1-P4, each checked on our numbers with the criterion stated beside it.

    'Keeps retention' means a mean retention ratio of at least 0.95 (forgetting under 5% of the base's scores);
    'loses retention' means below 0.95. Two drifts are 'similar' when their MMD² differ by less than twice the
    larger bootstrap std; two retentions 'differ' when their ratios differ by more than 0.05."""
    def get(name, key, sub=None):
        return _m(models.get(name, {}), key, sub)

    out = {}
    r_mild, r_stress = get("sft_mild", "retention"), get("sft_stress", "retention")
    if None not in (r_mild, r_stress):
        out["P1"] = {"claim": "stress SFT loses retention while mild SFT does not",
                     "criterion": "retention(stress) < 0.95 <= retention(mild)",
                     "holds": r_stress < 0.95 <= r_mild, "retention_mild": r_mild, "retention_stress": r_stress}
    r_grpo, r_opd = get("grpo", "retention"), get("opd_stress", "retention")
    if None not in (r_grpo, r_opd):
        out["P2"] = {"claim": "GRPO and OPD keep retention", "criterion": "retention >= 0.95 for both",
                     "holds": r_grpo >= 0.95 and r_opd >= 0.95, "retention_grpo": r_grpo, "retention_opd": r_opd}
    g_opd, g_stress = get("opd_stress", "gsm8k"), get("sft_stress", "gsm8k")
    if None not in (g_opd, g_stress, r_opd, r_stress):
        out["P3"] = {"claim": "OPD from the degraded stress teacher beats that teacher",
                     "criterion": "GSM8K(OPD) > GSM8K(stress SFT) and retention(OPD) > retention(stress SFT)",
                     "holds": g_opd > g_stress and r_opd > r_stress, "gsm8k_opd": g_opd, "gsm8k_stress": g_stress}
    for feat in ("lexical", "hidden"):
        m_opd, m_stress = get("opd_stress", f"drift_{feat}", "mmd2"), get("sft_stress", f"drift_{feat}", "mmd2")
        s_opd = get("opd_stress", f"drift_{feat}", "mmd2_bootstrap_std")
        s_stress = get("sft_stress", f"drift_{feat}", "mmd2_bootstrap_std")
        if None in (m_opd, m_stress, s_opd, s_stress, r_opd, r_stress):
            continue
        similar = abs(m_opd - m_stress) < 2 * max(s_opd, s_stress)
        out[f"P4_{feat}"] = {"claim": "similar drift with different retention (stress SFT vs OPD)",
                             "criterion": "|MMD² difference| < 2 x the larger bootstrap std, "
                                          "and retention differs by more than 0.05",
                             "holds": similar and abs(r_opd - r_stress) > 0.05, "mmd2_opd": m_opd,
                             "mmd2_stress": m_stress, "mmd2_bootstrap_std": max(s_opd, s_stress)}
    return out


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
    lines += ["", "## The paper's predictions, checked", "", predictions.__doc__.split("\n\n")[1].strip().replace("\n    ", " "), ""]
    for key, p in summary["predictions"].items():
        figures = ", ".join(f"{k} {v:.4g}" for k, v in p.items() if isinstance(v, float))
        lines.append(f"- **{key}** {p['claim']}: **{'holds' if p['holds'] else 'does not hold'}** "
                     f"({p['criterion']}; {figures})")
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    lines += cost_table(summary["costs"])
    path = os.path.join(out_dir, "results.md")
    write_text(path, "\n".join(lines) + "\n")
    return path


def cost_table(costs: dict) -> list[str]:
    """Seconds per run and stage kind (per seed, averaged), and the peak GPU memory: what a study costs."""
    seconds, memory = costs["seconds"], costs["peak_gpu_gib"]
    if not seconds:
        return ["", "Every stage was reused from an earlier invocation: no costs measured this time."]
    total, seeds, peak = {}, {}, {}
    for key, sec in seconds.items():
        kind, name = key.split("/", 1)            # train/grpo_s0, evaluate/grpo_s0, drift/grpo_s0_lexical
        if kind == "drift":
            name = name.rsplit("_", 1)[0]
        run, _, seed = name.rpartition("_s") if name != "base" else ("base", "", "0")
        total[(run, kind)] = total.get((run, kind), 0.0) + sec
        seeds.setdefault(run, set()).add(seed)
        peak[run] = max(peak.get(run, 0.0), memory.get(key, 0.0))
    out = ["", f"## Cost (this invocation: {sum(seconds.values()) / 60:.1f} min of stages)", "",
           "Wall seconds per seed (drift: all feature sets)" + ("; peak GPU memory, GiB." if memory else "."), "",
           "| run | train s | evaluate s | drift s |" + (" peak GPU GiB |" if memory else ""),
           "| --- | --- | --- | --- |" + (" --- |" if memory else "")]
    for run in seeds:
        cells = [f"{total[(run, k)] / len(seeds[run]):.0f}" if (run, k) in total else "–"
                 for k in ("train", "evaluate", "drift")]
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
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (name, row) in zip(axes.flat, trained.items()):
        key = "reward" if name == "grpo" else "loss"
        for r, color in zip(row["runs"], ("C0", "C1", "C2", "C3", "C4")):
            log = [x for x in _log(r["log"]) if key in x]
            x, y = [e["step"] for e in log], [e[key] for e in log]
            ax.plot(x, y, color=color, lw=0.6, alpha=0.25)       # every step, faint: mostly noise
            ax.plot(x, ema(y), color=color, lw=1.8, label=f"seed {r['seed']}" if "seed" in r else None)
        ax.set_title(row["label"], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean exact-answer reward" if key == "reward" else "loss (nats per supervised token)")
        if len(row["runs"]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    curves = "training_curves.png"
    fig.savefig(os.path.join(out_dir, curves), dpi=110)
    plt.close(fig)

    feats = [f for f in ("lexical", "hidden") if any(f"drift_{f}" in r for r in trained.values())]
    fig, axes = plt.subplots(1, len(feats), figsize=(6 * len(feats), 4.5), squeeze=False)
    for ax, feat in zip(axes[0], feats):
        for (name, row), marker in zip(trained.items(), "osD^v<>p"):
            x, y = row.get(f"drift_{feat}", {}).get("mmd2"), row.get("retention")
            if x and y:
                ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=marker, capsize=3, label=row["label"])
        ax.axhline(1.0, color="grey", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel(f"drift: MMD² of rollout states vs base ({feat})")
        ax.set_ylabel("mean retention ratio (post / base)")
    fig.tight_layout()
    scatter = "retention_vs_drift.png"
    fig.savefig(os.path.join(out_dir, scatter), dpi=110)
    plt.close(fig)
    return [curves, scatter]


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
    output_dir(os.path.join(args.out, "results.json"))
    only = set(args.only.split(",")) if args.only else None
    if only:
        check_only(args, only)
    costs = {"seconds": {}, "peak_gpu_gib": {}}   # per stage, this invocation
    evaluate_model(args, "base", None, costs)
    runs = {}
    for seed in range(args.seeds):
        for stage in stages():
            if only and stage.name not in only:
                continue
            if stage.teacher and any("failed" in r for r in runs.get(stage.teacher, []) if r["seed"] == seed):
                continue  # its teacher did not train
            status = train(args, stage, seed, costs)
            status["seed"] = seed
            if "failed" not in status:
                status["eval"] = evaluate_model(args, f"{stage.name}_s{seed}", status["checkpoint"], costs)
                status["drift"] = {f: measure_drift(args, f"{stage.name}_s{seed}", status["checkpoint"], f, costs)
                                   for f in args.features.split(",")}
            runs.setdefault(stage.name, []).append(status)
    summary = summarize(args, runs, costs)
    plots = plot(summary, args.out)
    write_text(os.path.join(args.out, "results.json"), json.dumps(summary, indent=1))
    path = report(summary, args.out, plots)
    print(f"\nstudy done in {sum(costs['seconds'].values()) / 60:.1f} min of stages -> {path}")
    return summary


if __name__ == "__main__":
    cli(main)
