#!/bin/bash
# A candidate world's Q8 (`grpo`: GRPO) and Q9 (`opd`: OPD from Q7's stress teacher), tiny/probes/README.md "World 4":
# the study's tiny presets at seed 137, a snapshot every 25 steps; the budget is the step of the best val_accuracy
# (the first 200 validation problems, every 25 steps), and that snapshot is probed on all 1,000 validation problems.
# Set by the caller: D, M, C, R as for candidate.sh. `opd` waits for Q7's checkpoint.
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SNAP=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
best() {   # the checkpoint at the step of the best val_accuracy (the first such step), from the run's log
  python - "$1" <<'PY'
import json, os, sys
out = sys.argv[1]
log = [json.loads(l) for l in open(os.path.splitext(out)[0] + ".jsonl") if "val_accuracy" in l]
r = max(log, key=lambda r: (r["val_accuracy"], -r["step"]))
print(json.dumps([(x["step"], x["val_accuracy"]) for x in log]), file=sys.stderr)
print(out if r["step"] == log[-1]["step"] else f"{os.path.splitext(out)[0]}_at{r['step']}.pt")
PY
}
until [ -f $M/pretrain.json ]; do sleep 30; done   # written after the weights
LR=${LR:-3e-4}; G=grpo; [ $LR = 3e-4 ] || G=grpo_lr$LR   # LR=1e-4: a calibration run beside the preset's
if [ "$1" = grpo ]; then
  [ -f $C/$G.done ] || { time python train_grpo.py --model $M --data-dir $D --out $C/$G.pt --seed 137 \
    --max-steps 250 --batch-size 4 --grad-accum 2 --lr $LR --save-every 50 --eval-every 25 --snapshots $SNAP \
    --locality-every 0 --device cpu $( [ -f $C/$G.pt ] && echo --resume ); touch $C/$G.done; }
  [ -f $R/$G.json ] || python tiny/probes/gold_facts3.py --model $M --data-dir $D --checkpoint $(best $C/$G.pt) \
    --baseline $R/base.json --out $R/$G.json
fi
if [ "$1" = opd ]; then
  until [ -f $C/stress_r64.done ]; do sleep 30; done
  [ -f $C/opd.done ] || { time python train_opd.py --teacher $C/stress_r64.pt --out $C/opd.pt --seed 137 \
    --max-steps 250 --lr 2e-4 --save-every 50 --eval-every 25 --snapshots $SNAP --locality-every 0 --device cpu \
    $( [ -f $C/opd.pt ] && echo --resume ); touch $C/opd.done; }
  [ -f $R/opd.json ] || python tiny/probes/gold_facts3.py --model $M --data-dir $D --checkpoint $(best $C/opd.pt) \
    --baseline $R/base.json --out $R/opd.json
fi
