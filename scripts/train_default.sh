#!/usr/bin/env bash
# How the shipped default checkpoint (gemx/checkpoints/small_x4.pt) and its baselines were trained, on a
# 2-core CPU machine (runs in parallel, one thread each, about 65 minutes of wall time for the longest).
# Videos: a folder of talking-head clips (here ../shared/data/videos), train split by person (gemx/train/data.py).
# Re-running a command resumes it.
set -euo pipefail
out=${1:-runs}
videos=${2:-../shared/data/videos}
gemx=".venv/bin/gemx"
mkdir -p "$out"

# The shipped model: robust variant (decoder also sees the target's own features, predicts a correction to
# bicubic), 30% of samples with references from another person.
$gemx train --videos "$videos" --robust --residual --mismatch 0.3 --steps 4000 --threads 1 --out "$out/robust.pt"
# The SISR baseline with the same decoder design and the same step budget.
$gemx train --videos "$videos" --arch sisr --residual --steps 4000 --threads 1 --out "$out/sisr-residual.pt"
# The paper-exact variant (decoder sees only attention outputs) and the paper's SISR, for the comparison table.
$gemx train --videos "$videos" --steps 3500 --threads 1 --out "$out/paper-exact.pt"
$gemx train --videos "$videos" --arch sisr --steps 2500 --threads 1 --out "$out/sisr-paper.pt"

# The x8 checkpoint (gemx/checkpoints/small_x8.pt).
$gemx train --videos "$videos" --robust --residual --mismatch 0.3 --scale 8 --steps 2500 --threads 2 --out "$out/robust-x8.pt"

$gemx eval --videos "$videos" "$out/robust.pt" "$out/paper-exact.pt" "$out/sisr-residual.pt" "$out/sisr-paper.pt" --json "$out/eval.json"
