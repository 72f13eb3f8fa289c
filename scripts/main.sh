#!/usr/bin/env bash
# The main job: set up, distill the bundled digits data with DM (IPC 10) and evaluate it against its
# real-image initialisation.  A few minutes on 2 CPU cores.  Writes runs/digits_dm_ipc10/{synset.*,grid.png,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
OUT="${OUT:-runs/digits_dm_ipc10}"
.venv/bin/ddkit distill --method dm --dataset digits --ipc 10 --iterations 150 --seed 0 --out "$OUT" --set method.batch_real=64 \
    --overwrite  # the main job may run again: it replaces its own earlier runs (README: Run folders)
.venv/bin/ddkit distill --method random --dataset digits --ipc 10 --seed 0 --out "$OUT-random" --no-progress --overwrite
echo "== random real images (the kind of set DM starts from), 3 ConvNets x 300 epochs =="
.venv/bin/ddkit evaluate "$OUT-random" --runs 3 --epochs 300 --json "$OUT-random/eval.json"
echo "== DM, 150 iterations (64 real images per class per iteration), 3 ConvNets x 300 epochs =="
.venv/bin/ddkit evaluate "$OUT" --runs 3 --epochs 300 --json "$OUT/eval.json"
echo "image grid: $OUT/grid.png"
