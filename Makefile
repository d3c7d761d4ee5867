# The two commands of the README. Both run scripts/setup.sh first (idempotent).
VENV ?= .venv

.PHONY: setup measure test bench

setup:
	@bash scripts/setup.sh

measure: setup
	$(VENV)/bin/manifold-lab measure

test: setup
	$(VENV)/bin/pytest

bench: setup
	$(VENV)/bin/python benchmarks/bench_ssc.py
	$(VENV)/bin/python benchmarks/bench_gsq.py
	$(VENV)/bin/python benchmarks/bench_measure.py
	$(VENV)/bin/python benchmarks/bench_dit_train.py
	$(VENV)/bin/python benchmarks/bench_sampling.py
