#!/usr/bin/env bash
# Trains the shipped video model (fastdiff/checkpoints/tiny-video): the `tiny` UNet
# with temporal attention (fastdiff.nn.video), its spatial layers initialised from
# fastdiff/checkpoints/tiny-shapes, fine-tuned on 16-frame moving-shapes clips with
# VideoTrainer.DEFAULTS as the recipe (3000 steps × 4 clips; ~50–60 min), on one CPU thread.
# Interrupted? Run it again: it resumes from runs/tiny-video and ends with the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python
exec "$py" -m fastdiff train --task video --output-dir runs/tiny-video --threads 1 \
  --export fastdiff/checkpoints/tiny-video "$@"
