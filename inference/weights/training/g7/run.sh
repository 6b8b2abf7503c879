#!/bin/bash
# Generation-6 training, second run: 36 phantoms (seeds 1000-1035, the last 4 for validation; 1000-1011 are g6's cache, made
# by 479bc38, the rest by this generator), random zoom 0.85-1.2, bfloat16 + channels-last on a CPU
# with native bfloat16, from g6's last checkpoint. Resumable: rerun this script (it adds --resume
# once runs/g7/last.pt exists; copy inference/weights/training/g7/last.pt there on a new machine).
cd "$(dirname "$0")/../../../.." || exit 1
run=runs/g7
mkdir -p $run
extra=""; [ -f $run/last.pt ] && extra="--resume"
exec .venv/bin/python -m node.cli train --phantoms 36 --phantom-seed 1000 --out $run \
  --init inference/weights/training/g6/last.pt --lr 3e-4 --patch 96,112,96 --batch-size 1 --iterations 50 \
  --validation-fraction 0.12 --zoom 0.85,1.2 --threads 2 --epochs ${EPOCHS:-72} --no-progress $extra
