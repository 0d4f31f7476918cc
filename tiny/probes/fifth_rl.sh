#!/bin/bash
# World 5's Q8 (`grpo`) and Q9 (`opd`), tiny/probes/README.md "World 5": candidate_rl.sh with world 5's paths.
#   nohup bash tiny/probes/fifth_rl.sh grpo > /tmp/w5/grpo.log 2>&1 &
D=tiny/probes/fifth_world/data M=tiny/probes/fifth_world/model C=ckpt/w5 R=tiny/probes/results/world5 \
  bash tiny/probes/candidate_rl.sh "$@"
