#!/usr/bin/env bash
# `python -m fastdiff ARGS…` run from the repository root with the project's interpreter:
# $PYTHON if set, else .venv/bin/python, else the python on PATH.  The training scripts
# call it, so that they find the interpreter the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python
exec "$py" -m fastdiff "$@"
