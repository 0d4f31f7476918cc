#!/bin/bash
# World 3's probes on validation (tiny/probes/README.md, "World 3"): the base's (Q1-Q5), then mild SFT at seed 137
# and its probe (Q6). One thread; restartable (a finished step is skipped).
#   nohup bash tiny/probes/third.sh > /tmp/w37/third.log 2>&1 &
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M=${M:-tiny/probes/third/model}; D=${D:-tiny/probes/third/data}; C=${C:-ckpt/w3}; R=${R:-tiny/probes/results/world3}
mkdir -p $C $R
probe() { python tiny/probes/gold_facts3.py --model $M --data-dir $D "$@"; }
[ -f $R/base.json ] || (time probe --out $R/base.json)
if [ ! -f $C/mild_r16.done ]; then
  if [ -f $C/mild_r16.pt ]; then r=--resume; else r=; fi
  time python train_sft.py --preset mild --batch-size 8 --seed 137 --model $M --data-dir $D --out $C/mild_r16.pt \
    --locality-every 0 --eval-every 0 --save-every 100 --device cpu $r
  touch $C/mild_r16.done
fi
[ -f $R/mild_r16.json ] || (time probe --checkpoint $C/mild_r16.pt --baseline $R/base.json --out $R/mild_r16.json)
# Q7 (bash tiny/probes/third.sh stress): stress SFT at seed 137 and its probe against the base
if [ "$1" = stress ]; then
  if [ ! -f $C/stress_r64.done ]; then
    if [ -f $C/stress_r64.pt ]; then r=--resume; else r=; fi
    time python train_sft.py --preset stress --batch-size 16 --seed 137 --model $M --data-dir $D --out $C/stress_r64.pt \
      --locality-every 0 --eval-every 0 --save-every 100 --device cpu $r
    touch $C/stress_r64.done
  fi
  [ -f $R/stress_r64.json ] || (time probe --checkpoint $C/stress_r64.pt --baseline $R/base.json --out $R/stress_r64.json)
fi
