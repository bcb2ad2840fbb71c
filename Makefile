# Convenience targets; the README's two commands are the supported set-up.
.PHONY: help build test bench clean

help:
	@echo "make build | test | bench | clean"

build:
	pip install -e . -q

test: build
	python -m pytest -q tests

bench: build
	python -m moe bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_cpu.py

clean:
	rm -rf build dist *.egg-info moe/_C*.so .pytest_cache
