#!/usr/bin/env bash
# GPU recipe for the brain model, for a session that is lent a device (the device tool's `run`):
#   once, here:  python scripts/prepare_brains.py
#                pip download --only-binary=:all: --python-version 3.12 --no-deps -d runs/wheels SimpleITK
#   run:         command "bash scripts/gpu_train_brain.sh", carry ["runs/brains", "runs/wheels", "runs/brain-train"],
#                timeout_s 540
# The device has PyTorch but no SimpleITK and no network: the wheel travels with the tree. Training
# resumes from runs/brain-train when it is carried, stops cleanly after 7 minutes (checkpointed),
# and the checkpoints and logs come back through $OUT; copy them into runs/brain-train here.
set -euo pipefail
python3 -m pip install -q --no-index --find-links runs/wheels SimpleITK
export PYTHONPATH="$PWD/MorphSeekCore"
# The similarity compares the pairs' noise-free images (--clean-similarity): its optimum is as well
# aligned as raw NCC's with a third of its blur reward; presmoothing (the shipped model's objective)
# costs 5.7 Dice points at the optimum (docs/QUALITY.md section 8).
python3 scripts/train_brain.py --device cuda --threads 8 --workers 12 --iterations 20000 --clean-similarity \
    --validate-every 250 --checkpoint-every 250 --max-minutes 7 --out runs/brain-train-gpu
mkdir -p "${OUT:-/tmp/out}"
cp runs/brain-train-gpu/best.* runs/brain-train-gpu/last.* runs/brain-train-gpu/log.csv "${OUT:-/tmp/out}/" 2>/dev/null || true
