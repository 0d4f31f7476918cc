#!/bin/bash
# The tiny profile's budgets for GRPO and OPD in the world under $D/$M, chosen on the validation split (issue 30):
# each run logs greedy accuracy on the first 200 validation problems (--eval-every) along a run longer than the
# profile's, and the profile takes the budget where that curve levels off. OPD learns from the stress SFT run of
# p6.sh (stress_r64). One thread each; restartable like p6.sh.   nohup bash tiny/probes/calibrate.sh grpo opd &
set -e
export OMP_NUM_THREADS=1
M=${M:-tiny/model}; D=${D:-tiny/data}; C=${C:-ckpt/w2}
declare -A CMD=([grpo]="train_grpo.py --model $M --data-dir $D --max-steps 400 --batch-size 4 --grad-accum 2 --lr 3e-4 --eval-every 25"
                [opd]="train_opd.py --teacher $C/stress_r64.pt --max-steps 400 --lr 2e-4 --eval-every 25")
for name in ${@:-grpo opd}; do
  [ -f $C/cal_$name.done ] && continue
  if [ -f $C/cal_$name.pt ]; then r=--resume; else r=; fi
  python ${CMD[$name]} --out $C/cal_$name.pt --save-every 25 --locality-every 0 --device cpu $r
  touch $C/cal_$name.done
done
