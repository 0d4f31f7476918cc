#!/bin/bash
# World 4's Q8 (`grpo`) and Q9 (`opd`), tiny/probes/README.md "World 4": candidate_rl.sh with world 4's paths.
#   nohup bash tiny/probes/fourth_rl.sh grpo > /tmp/w4/grpo.log 2>&1 &
D=tiny/probes/fourth/data M=tiny/probes/fourth/model C=ckpt/w4 R=tiny/probes/results/world4 \
  bash tiny/probes/candidate_rl.sh "$@"
