#!/bin/bash
# A candidate world of issue 37 (tiny/probes/README.md, "World 4" and on): tiny/world.py with the candidate's flags,
# its base pretrained for one pass on one thread, then the probes on validation (Q1-Q5 the base's, Q6 mild SFT, and
# with `stress` Q7 stress SFT) through third.sh. Restartable: a finished step is skipped. Set by the caller:
#   D (data dir), M (model dir), C (checkpoints), R (results), FLAGS (tiny/world.py's flags; worlds 4-6 ran it as
#   tiny/world3.py: git show 2c1f4c5:tiny/world3.py)
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p $C $R
if [ ! -f $D/corpus.jsonl ]; then
  python -m tiny.world --out $D $FLAGS | tee $R/world.txt
fi
if [ ! -f $M/model.safetensors ]; then
  tokens=$(grep -o 'corpus [0-9]* documents / [0-9.]*M' $R/world.txt | grep -o '[0-9.]*M' | tr -d M)
  steps=$(python -c "import math; print(math.ceil($tokens * 1e6 / (32 * 256)))")   # one pass over the corpus
  echo "pretraining $steps steps"
  time python -m tiny.pretrain --data-dir $D --out $M --steps $steps --threads 1 --eval-every 0 --eval-n 100 \
    --eval-split validation
fi
M=$M D=$D C=$C R=$R bash tiny/probes/third.sh "$@"
