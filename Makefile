# The two commands a newcomer runs: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: demo test setup bench audit kernels

setup:
	bash scripts/setup.sh test,text,video

demo: setup
	$(PY) -m fastdiff demo

test: setup
	$(PY) -m pytest -q -n 2

audit: setup
	$(PY) -m fastdiff.audit

bench: setup
	$(PY) -m benchmarks.run

# libfastdiff_kernels and the C example into build/ (pip install -e . also builds and installs it)
kernels: setup
	cmake -S . -B build -DFASTDIFF_PYTHON=$(CURDIR)/$(PY) && cmake --build build
