#!/bin/bash
# World 4, the second candidate of issue 37 (tiny/probes/README.md, "World 4"): candidate.sh with its flags.
#   nohup bash tiny/probes/fourth.sh stress > /tmp/fourth.log 2>&1 &
D=tiny/probes/fourth/data M=tiny/probes/fourth/model C=ckpt/w4 R=tiny/probes/results/world4 \
  FLAGS="--rare-weights 0.05,0.05,0.05,0.05 --mix 0.26,0.13,0.30,0.05,0.18,0.08 --numeric-p 0.44 --split-rare-weight 1" \
  bash tiny/probes/candidate.sh "$@"
