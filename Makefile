# The two commands a newcomer runs: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: demo test setup bench audit

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
