#!/usr/bin/env bash
# How the shipped default checkpoint (gemx/checkpoints/small_x4.pt) was made, on a 2-core CPU machine.
# Videos: ../shared/data/videos (train split by person; see gemx/train/data.py). Takes about 1.5 hours.
set -euo pipefail
out=${1:-runs}
mkdir -p "$out"
gemx=".venv/bin/gemx"

# 1. The paper-exact attention model and the SISR baseline.
$gemx train --arch attention --steps 3500 --out "$out/attention.pt" --threads 2
$gemx train --arch sisr --steps 2500 --out "$out/sisr.pt" --threads 2
# 2. The robust variant, warm-started from the paper-exact model (its new decoder inputs start at zero),
#    with 30% of the samples using references from another person.
$gemx train --arch attention --robust --mismatch 0.3 --lr 2.5e-4 --steps 1500 --init-from "$out/attention.pt" \
    --out "$out/robust.pt" --threads 2
# 3. The table (README model card).
$gemx eval "$out/attention.pt" "$out/robust.pt" "$out/sisr.pt" --json "$out/eval.json"
