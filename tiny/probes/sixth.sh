#!/bin/bash
# World 6, the fourth candidate of issue 37 (tiny/probes/README.md, "World 6"): world 5's corpus, tokenizer and base,
# the target splits redrawn with each rare kind weighted 2.5 (candidate.sh skips the pretraining: M is world 5's base).
#   nohup bash tiny/probes/sixth.sh > /tmp/w6/sixth.log 2>&1 &          # Q1-Q6
#   nohup bash tiny/probes/sixth.sh stress-only > /tmp/w6/stress.log 2>&1 &   # Q7 beside it
D=tiny/probes/sixth_world/data M=tiny/probes/fifth_world/model C=ckpt/w6 R=tiny/probes/results/world6 \
  FLAGS="--rare-weights 0.05,0.05,0.05,0.05 --mix 0.28,0.13,0.30,0.02,0.18,0.09 --numeric-p 0.45 --split-rare-weight 2.5" \
  bash tiny/probes/candidate.sh "$@"
