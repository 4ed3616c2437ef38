#!/usr/bin/env bash
# Trains the shipped style model (fastdiff/checkpoints/tiny-style): a StyleUNet fine-tuned
# from fastdiff/checkpoints/tiny-shapes on style pairs of the synthetic shapes set
# (StyleTrainer.DEFAULTS is the recipe), on one CPU thread.
# Interrupted? Run it again: it resumes from runs/tiny-style and ends with the same weights.
set -euo pipefail
exec "$(dirname "$0")/fastdiff.sh" train --task style --output-dir runs/tiny-style --threads 1 \
  --export fastdiff/checkpoints/tiny-style "$@"
