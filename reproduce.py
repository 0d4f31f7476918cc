"""The paper's study in one command: train its methods, evaluate every model, measure every drift.

    python reproduce.py --model tiny                        # the paper's five runs on the bundled tiny world
    python reproduce.py --model tiny --variants             # and the variants beside them, and pass@k
    python reproduce.py --model tiny --seeds 3              # trained runs repeated over seeds 0..2: mean ± std
    python reproduce.py --model Qwen/Qwen3-0.6B-Base        # the paper's setting, on a GPU
    python reproduce.py --model Qwen/Qwen3-0.6B-Base --data-dir ../shared/data   # the same, local data

What it runs (each stage a call of the script that owns it, with the flags shown in results.json):
1. evaluate.py on the base model: GSM8K (target), TruthfulQA-MC and MMLU (retention).
2. The trained runs, each a LoRA adapter on the base. The paper's five runs are the base and
     sft_mild, sft_stress            train_sft.py --preset mild | stress         dataset states, gold tokens
     grpo                            train_grpo.py                                learner states, reward
     opd_stress                      train_opd.py --teacher sft_stress            learner states, teacher continuation
   and --variants adds
     sft_learner                     train_sft.py --states learner               learner states, own correct samples
     opd_mild                        train_opd.py --teacher sft_mild              the mild teacher
     opd_kl                          train_opd.py --teacher sft_stress --signal kl   one-step exact KL (its collapse)
     opd_sampled_kl                  train_opd.py --teacher sft_stress --signal sampled-kl   the sampled KL as a
                                                                   per-token advantage (OPD as the field runs it)
     opd_stress_on_teacher_states,   train_opd.py --teacher sft_stress --states teacher | data:
     opd_stress_on_data_states         the state-source contrast: opd_stress's signal, other states
3. evaluate.py on every adapter, with the base as --baseline (forgetting and retention, Eq. 12); with --variants
   also GSM8K pass@k of every model from 8 samples per problem (evaluate.py --samples 8, eval/<model>_passk.json).
4. drift.py of every adapter against the base: lexical features (the paper's) and the base model's hidden states.
5. results.json, results.md (Table 2 with the paper's numbers beside ours; every difference from the base with a
   95% interval, paired over items and a t-interval over seeds; drift and the policy KLs, and how each tracks
   forgetting; pass@k; the state-source x signal grid and state locality; the paper's conditions C1-C4 and
   predictions P1-P4, each decided from the interval of its difference: the five runs decide them all)
   and plots (training curves; retention against each drift measure).
With --frontier every run also keeps its adapter after 1/16, 1/8, 1/4, 3/8, 1/2 and 3/4 of its steps
(train_*.py --snapshots), which are evaluated too: frontier.png draws target accuracy against retention along each
run, and results.md gives each method's retention at the target gains the methods share, and its paired difference
from another method's at the same gain (retention at matched gain).

Side by side. A stage starts once what it reads is there: a training at once (an OPD run once its teacher is
trained), an evaluation, drift or snapshots once its run is trained, a run's own stages before the next run's
training (a teacher before the others). With --jobs N (on the CPU, by default one per core) N stages run at a
time, each in a worker process on one CPU thread; on a GPU (and under torchrun) they run one after another in this
process, as --jobs 1 does anywhere. The numbers do not depend on N.

Everything goes under --out: ckpt/, eval/, drift/, rollouts/ and the report. Rerunning is resumable: a stage's
output is reused when the same command made it from the same inputs (each stage records both beside its output),
an interrupted training run continues from its last checkpoint (train_*.py --resume); a changed command or input
(another --extra, profile or teacher) runs the stage again. A finished run leaves a receipt beside its checkpoint
(ckpt/<run>.receipt.json: the sha256 of its checkpoint and snapshots), so that a study directory without its
checkpoints and rollouts (the committed tiny/results, or a study carried to another machine) still reuses every
stage they fed and reports again; only a stage still to run needs the checkpoint it reads.

Where it lives: study/stages.py (the runs, their settings and running them), study/summary.py (results.json),
study/stats.py (the intervals, conditions, predictions, correlations, frontier) and study/report.py
(results.md and the plots); this file is the command.

Settings. With a real model every stage runs the scripts' defaults, which are the paper's protocol
(evaluation on 500 GSM8K / 200 TruthfulQA / 500 MMLU items, the stress preset of 5 epochs at lr 5e-4 with
LoRA r 64). With `--model tiny` the evaluation and drift protocols stay the same and the trained runs are set
(study.stages.PROFILES["tiny"]) to the paper's data regime (its cost: README, tiny/README.md). `--quick` shrinks
everything to a smoke run (CI runs it as a test).
Explicit per-script flags can be appended with --extra SCRIPT="FLAGS" (they come last, so they override).
"""
import argparse
import json
import os
import shlex

import torch

import distributed
from cli import COUNT, SIZE, FlagParser, device, output_dir, run, write_text
from study import report, summary
from study.stages import FRONTIER, run_stages


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="the base: tiny (the bundled world), an HF directory or hub id")
    p.add_argument("--data-dir", default=None, help="local data (default: tiny/data for tiny, else the HF hub)")
    p.add_argument("--out", default=None, help="study directory (default: runs/<model name>)")
    p.add_argument("--seeds", type=SIZE, default=1, help="repeat every trained run with seeds 0..N-1")
    p.add_argument("--first-seed", type=COUNT, default=0, help="train only seeds K..N-1 (a second process sharing "
                   "--out takes the last seeds; a final run without it reuses every stage and reports all seeds)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps and examples per stage")
    p.add_argument("--only", default=None, help="comma-separated trained runs to do (default: the paper's five)")
    p.add_argument("--frontier", action="store_true", help="also evaluate every run after "
                   f"{', '.join(f'{f:g}' for f in FRONTIER)} of its steps: retention at matched target gain")
    p.add_argument("--variants", action="store_true", help="also RFT, the mild teacher, the KL signals, OPD on "
                   "teacher and dataset states, and pass@k (the runs: study.stages.stages)")
    p.add_argument("--jobs", type=SIZE, default=None, help="stages side by side, each a process on one CPU thread "
                   "(default: the CPU's cores; 1 on a GPU and under torchrun: one by one, in this process)")
    p.add_argument("--features", default="lexical,hidden", help="drift representations (drift.py --features)")
    p.add_argument("--extra", action="append", default=[], metavar='SCRIPT="FLAGS"',
                   help='flags appended to every call of a script, e.g. --extra train_grpo.py="--max-steps 50"')
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.first_seed >= args.seeds:
        p.error(f"--first-seed {args.first_seed}: the seeds are 0..{args.seeds - 1}")
    # under torchrun (WORLD_SIZE set) every rank runs every stage in its own process, one after another
    args.jobs = 1 if "WORLD_SIZE" in os.environ else args.jobs or ((os.cpu_count() or 1) if args.device == "cpu" else 1)
    args.profile = "quick" if args.quick else ("tiny" if args.model == "tiny" else "paper")
    args.out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.model)) +
                                        ("_quick" if args.quick else ""))
    extra, args.extra = args.extra, {}
    for script, _, flags in (item.partition("=") for item in extra):
        args.extra.setdefault(script, []).extend(shlex.split(flags))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed.init(args.device)     # under torchrun: join the group before any stage touches a GPU
    # a reused stage reports the cost recorded beside its output; results.json's, for a study from before those records
    previous = output_dir(os.path.join(args.out, "results.json"))
    costs = summary.read_json(previous)["costs"] if os.path.exists(previous) else {"seconds": {}, "peak_gpu_gib": {}}
    runs = run_stages(args, costs)
    if not distributed.main_rank():   # under torchrun (README: More GPUs) rank 0 writes the report
        return {}
    # the stages that another process sharing --out ran in the meantime
    for kind, measured in summary.read_json(previous, {"costs": {}})["costs"].items():
        costs[kind] = {**measured, **costs[kind]}
    result = summary.summarize(args, runs, costs)
    plots = report.plot(result, args.out)
    write_text(previous, json.dumps(result, indent=1))
    path = report.report(result, args.out, plots)
    print(f"\nstudy done: {sum(costs['seconds'].values()) / 60:.1f} min of stages in all -> {path}")
    return result


if __name__ == "__main__":
    run(main)
