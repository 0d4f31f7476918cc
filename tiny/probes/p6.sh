#!/bin/bash
# P6 of tiny/probes/README.md: mild and stress SFT over world 2's whole train set, each then probed on validation
# (probe2.py). LoRA presets scaled to hidden 192 (r/hidden of the paper's r 16 and r 64 at hidden 1,024), and the
# unscaled stress preset (r 64) for comparison. Restartable: a stopped run resumes from its checkpoint, a finished
# run or probe is skipped.   nohup bash tiny/probes/p6.sh > /tmp/w2_p6.log 2>&1 &
# Another base: M=/tmp/w2cal/model D=/tmp/w2cal/data C=ckpt/w2cal R=/tmp/w2cal/results bash tiny/probes/p6.sh mild_r3 stress_r12
set -e
export OMP_NUM_THREADS=1
M=${M:-tiny/model}; D=${D:-tiny/data}; C=${C:-ckpt/w2}; R=${R:-tiny/probes/results}; mkdir -p $C $R
declare -A FLAGS=([mild_r16]="--preset mild --batch-size 8"
                  [mild_r3]="--preset mild --lora-r 3 --lora-alpha 6 --batch-size 8"
                  [stress_r12]="--preset stress --lora-r 12 --lora-alpha 24 --batch-size 16"
                  [stress_r64]="--preset stress --batch-size 16")
run() { name=$1
  if [ ! -f $C/$name.done ]; then
    if [ -f $C/$name.pt ]; then r=--resume; else r=; fi
    python train_sft.py --model $M --data-dir $D --out $C/$name.pt --locality-every 0 --save-every 100 --device cpu \
      $r ${FLAGS[$name]}
    touch $C/$name.done
  fi
  [ -f $R/$name.json ] || python tiny/probes/probe2.py --model $M --data-dir $D --checkpoint $C/$name.pt --out $R/$name.json
}
[ -f $R/base.json ] || python tiny/probes/probe2.py --model $M --data-dir $D --out $R/base.json
for name in ${@:-mild_r3 stress_r12 stress_r64}; do run $name; done
