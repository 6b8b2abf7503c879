#!/bin/bash
# Generation-6 fine-tune of the bundled model. Runs from a frozen checkout of 479bc38 (the
# generator that made its cache); resumable: rerun this script (adds --resume once last.pt exists).
#   git worktree add --detach /work/train-g6 479bc38 && runs/g6/run.sh
cd /work/train-g6 || exit 1
run=/work/main/runs/g6
extra=""; [ -f $run/last.pt ] && extra="--resume"
exec /work/main/.venv/bin/python -m node.cli train --phantoms 12 --phantom-seed 1000 --out $run \
  --init bundled --lr 3e-4 --patch 96,112,96 --batch-size 1 --iterations 50 --validation-fraction 0.17 \
  --threads 2 --epochs 8 --no-progress $extra
