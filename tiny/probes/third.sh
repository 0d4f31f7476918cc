#!/bin/bash
# World 3's probes on validation (tiny/probes/README.md, "World 3"): the base's (Q1-Q5), then mild SFT at seed 137
# and its probe (Q6). One thread; restartable (a finished step is skipped).
#   nohup bash tiny/probes/third.sh > /tmp/w37/third.log 2>&1 &
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M=${M:-tiny/probes/third/model}; D=${D:-tiny/probes/third/data}; C=${C:-ckpt/w3}; R=${R:-tiny/probes/results/world3}
mkdir -p $C $R
probe() { python tiny/probes/gold_facts3.py --model $M --data-dir $D "$@"; }
sft() {   # sft NAME PRESET BATCH: train_sft.py at seed 137 (resumed if it was cut), then its probe against the base
  if [ ! -f $C/$1.done ]; then
    if [ -f $C/$1.pt ]; then r=--resume; else r=; fi
    time python train_sft.py --preset $2 --batch-size $3 --seed 137 --model $M --data-dir $D --out $C/$1.pt \
      --locality-every 0 --eval-every 0 --save-every 100 --device cpu $r
    touch $C/$1.done
  fi
  [ -f $R/$1.json ] || (time probe --checkpoint $C/$1.pt --baseline $R/base.json --out $R/$1.json)
}
if [ "$1" != stress-only ]; then                     # stress-only: Q7 alone, beside a process that runs the rest
  [ -f $R/base.json ] || (time probe --out $R/base.json)
  sft mild_r16 mild 8                                # Q6
fi
[ "${1#stress}" != "$1" ] && sft stress_r64 stress 16   # Q7 (bash tiny/probes/third.sh stress)
exit 0
