# `make demo` and `make test` work on a fresh machine: each creates the virtual environment and installs
# what it needs first. Only the package index is needed (torch, a test-time reference, is pinned to a CPU build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.demo: $(VENV)/bin/activate setup.py
	$(PIP) install -q -e ".[demo]"
	touch $@

$(VENV)/.test: $(VENV)/bin/activate setup.py
	$(PIP) install -q -e ".[demo,test,hf]"
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo  ## the main job: tokenizer + tiny LM on the built-in corpora, offline, CPU
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m jaxllm quickstart --workdir runs/quickstart

# Two pytest workers: most tests are single-threaded Python and XLA compilation, so two keep both CI cores busy.
test: $(VENV)/.test  ## the test suite (tiny models, CPU)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q -n $${PYTEST_WORKERS:-2} --dist loadfile --durations=25 tests $(PYTEST_ARGS)

bench: $(VENV)/.demo  ## step time / MFU of the tiny preset on this machine
	$(PY) benchmarks/train_step.py --preset=tiny --seq_len=256 --batch=8

clean:
	rm -rf $(VENV) runs
