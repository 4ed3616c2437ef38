#!/usr/bin/env bash
# Trains the shipped model (fastdiff/checkpoints/tiny-shapes): the `tiny` UNet on the
# synthetic shapes set, with TrainConfig's defaults as the recipe, on one CPU thread
# (on a small CPU a second OpenMP thread costs more than it gains on these tensors).
# Interrupted? Run it again: it resumes from runs/tiny-shapes and ends with the same weights.
set -euo pipefail
exec "$(dirname "$0")/fastdiff.sh" train --data shapes --output-dir runs/tiny-shapes --threads 1 \
  --export fastdiff/checkpoints/tiny-shapes "$@"
