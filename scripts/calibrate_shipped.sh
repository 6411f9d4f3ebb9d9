#!/usr/bin/env bash
# How the shipped INT8 range tables (gemx/checkpoints/NAME.int8.json) were made: each shipped checkpoint is
# exported with --int8 and calibrated on the training split's videos (by person: never the test split's
# retalk5_woman_glasses, liveportrait_d12_man_webcam, styletalk_feifeili_clip1), and the export's table is
# copied next to the checkpoint. A table holds ranges only (no frames) and names its checkpoint's sha256.
set -euo pipefail
videos=${1:-../shared/data/videos}
gemx=".venv/bin/gemx"
test_split="retalk5_woman_glasses liveportrait_d12_man_webcam styletalk_feifeili_clip1"
calib=()
for v in "$videos"/*.mp4; do
  name=$(basename "$v" .mp4)
  [[ " $test_split " == *" $name "* ]] || calib+=(--calib "$v")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for ckpt in gemx/checkpoints/*.pt; do
  $gemx export "$ckpt" --int8 "${calib[@]}" --out "$work/$(basename "$ckpt" .pt).export"
  cp "$work/$(basename "$ckpt" .pt).export/int8_ranges.json" "${ckpt%.pt}.int8.json"
done
