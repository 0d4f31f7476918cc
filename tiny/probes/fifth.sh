#!/bin/bash
# World 5, the third candidate of issue 37 (tiny/probes/README.md, "World 5"): tiny/world3.py with new flags, its
# base pretrained on one thread, then the probes on validation (Q1-Q5 the base's, Q6 mild SFT, Q7 stress SFT).
# Restartable: a finished step is skipped.   nohup bash tiny/probes/fifth.sh > /tmp/fifth.log 2>&1 &
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=tiny/probes/fifth_world/data; M=tiny/probes/fifth_world/model; C=ckpt/w5; R=tiny/probes/results/world5
mkdir -p $C $R
if [ ! -f $D/corpus.jsonl ]; then
  python -m tiny.world3 --out $D --rare-weights 0.05,0.05,0.05,0.05 --mix 0.28,0.13,0.30,0.02,0.18,0.09 \
    --numeric-p 0.45 | tee $R/world.txt
fi
if [ ! -f $M/model.safetensors ]; then
  tokens=$(grep -o 'corpus [0-9]* documents / [0-9.]*M' $R/world.txt | grep -o '[0-9.]*M' | tr -d M)
  steps=$(python -c "import math; print(math.ceil($tokens * 1e6 / (32 * 256)))")   # one pass over the corpus
  echo "pretraining $steps steps"
  time python -m tiny.pretrain --data-dir $D --out $M --steps $steps --threads 1 --eval-every 0 --eval-n 100 \
    --eval-split validation
fi
M=$M D=$D C=$C R=$R bash tiny/probes/third.sh "$@"
