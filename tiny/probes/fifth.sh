#!/bin/bash
# World 5, the third candidate of issue 37 (tiny/probes/README.md, "World 5"): candidate.sh with its flags.
#   nohup bash tiny/probes/fifth.sh stress > /tmp/fifth.log 2>&1 &
D=tiny/probes/fifth_world/data M=tiny/probes/fifth_world/model C=ckpt/w5 R=tiny/probes/results/world5 \
  FLAGS="--rare-weights 0.05,0.05,0.05,0.05 --mix 0.28,0.13,0.30,0.02,0.18,0.09 --numeric-p 0.45 --split-rare-weight 1" \
  bash tiny/probes/candidate.sh "$@"
