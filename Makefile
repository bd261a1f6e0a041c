# quantbench: `make demo` runs the comparison on the bundled sample model; `make test` runs
# every test. Both create .venv if missing and install torch==2.13.0 (the CPU wheel) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.quantbench-installed

.PHONY: demo demo-full test test-fast venv llamacpp clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# a short tour (RTN vs GPTQ at 4 and 3 bits, NF4, GGUF Q4_K_M; about 2 minutes alone here)
demo: $(STAMP)
	$(BIN)/quantbench run examples/demo.yaml

# the full comparison: four methods at 4 and 3 bits, 16k evaluation tokens (see README "Demo")
demo-full: $(STAMP)
	mkdir -p demo-results
	$(BIN)/quantbench compare sample:smollm2 --method absmax,zeropoint,gptq,awq --bits 4,3 \
		--group-size 64 --calib-samples 16 --calib-len 256 --static-groups \
		--json demo-results/compare.json --plot demo-results/compare.png

llamacpp: $(STAMP)
	$(BIN)/python -m quantbench.runtimes.llamacpp || echo "llama.cpp could not be built here; the tests that need it skip"

# two pytest workers (one compute thread each; tests/conftest.py schedules the long tests first)
XDIST := -n 2 --dist loadscope --no-loadscope-reorder

test: $(STAMP) llamacpp
	$(BIN)/python -m pytest -q $(XDIST) --durations=30

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

clean:
	rm -rf $(VENV) demo-results .pytest_cache
