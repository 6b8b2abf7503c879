#!/bin/bash
# Generation-6 training, third run: 60 phantoms (seeds 1000-1059; 1000-1035 are g7's, the others made by
# the same generator; the last 7, 1053-1059, for validation), random zoom 0.85-1.2, bfloat16 + channels-last
# on a CPU with native bfloat16, from the bundled model (g7's best, epoch 67). Resumable: rerun this script
# (it adds --resume once runs/g8/last.pt exists; copy inference/weights/training/g8/last.pt there on a new machine).
cd "$(dirname "$0")/../../../.." || exit 1
run=runs/g8
mkdir -p $run
extra=""; [ -f $run/last.pt ] && extra="--resume"
exec .venv/bin/python -m node.cli train --phantoms 60 --phantom-seed 1000 --out $run \
  --init bundled --lr 1.5e-4 --patch 96,112,96 --batch-size 1 --iterations 50 \
  --validation-fraction 0.12 --zoom 0.85,1.2 --threads ${THREADS:-2} --epochs ${EPOCHS:-40} --no-progress $extra
