#!/usr/bin/env bash
# Trains the shipped video model (fastdiff/checkpoints/tiny-video) in two legs, each
# resumable (run the script again after an interruption: it ends with the same weights).
#  1. `--task video`: the `tiny` UNet with temporal attention (fastdiff.nn.video), its
#     spatial layers initialised from fastdiff/checkpoints/tiny-shapes, fine-tuned on
#     16-frame moving-shapes clips with VideoTrainer.DEFAULTS (3000 steps × 4 clips;
#     ~50–60 min on one CPU thread).
#  2. `--task video-layout`: the per-frame layout maps read from the whitened prompt,
#     trained on top of leg 1 with every other weight frozen (VideoLayoutTrainer.DEFAULTS:
#     600 steps × 4 clips; ~5–6 min on two CPU threads), exported as the pipeline.
# Extra arguments go to leg 1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fastdiff.sh train --task video --output-dir runs/tiny-video --threads 1 "$@"
exec scripts/fastdiff.sh train --task video-layout --init-from "runs/tiny-video/$(cat runs/tiny-video/latest)" \
  --output-dir runs/tiny-video-layout --threads 2 --export fastdiff/checkpoints/tiny-video
