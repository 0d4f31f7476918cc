#!/bin/bash
# World 6's Q8 (`grpo`; LR=1e-4 for Q8b) and Q9 (`opd`), tiny/probes/README.md "World 6": candidate_rl.sh with its paths.
#   nohup bash tiny/probes/sixth_rl.sh grpo > /tmp/w6/grpo.log 2>&1 &
D=tiny/probes/sixth_world/data M=tiny/probes/fifth_world/model C=ckpt/w6 R=tiny/probes/results/world6 \
  bash tiny/probes/candidate_rl.sh "$@"
