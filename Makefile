# `make demo` and `make test` each build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KERAS_BACKEND ?= torch
# Quiet TensorFlow/JAX start-up chatter; nothing here needs a GPU.
export TF_CPP_MIN_LOG_LEVEL ?= 2

# The CPU torch wheel lies in /opt/wheels on the project's machines; elsewhere pip uses PyPI.
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif

# pip's byte-compiling of every module it installs (all of torch and jax) is over a minute of a
# 2-core install; with --no-compile Python compiles only what is imported, on first import, and
# keeps it. That needs bytecode writing on, so it is allowed here even where the environment sets
# PYTHONDONTWRITEBYTECODE (each process would recompile torch): the .pyc go to .venv and src,
# both ignored by git.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e

DEMO_DATA := data/synth
DEMO_CONFIG := demo
FULL := $(VENV)/.installed-full
DEMO_DEPS := $(VENV)/.installed-demo

.PHONY: demo test test-all bench clean install

# Everything the tests and benchmarks use: both fast backends, ONNX, MLflow, Dask.
$(FULL): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) '.[torch,jax,onnx,test,mlflow,dask]'
	touch $(FULL) $(DEMO_DEPS)

# The demo needs only the torch backend: the other extras are imported by commands it never runs.
$(DEMO_DEPS): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) '.[torch]'
	touch $(DEMO_DEPS)

install: $(FULL)

demo: $(DEMO_DEPS)
	test -f $(DEMO_DATA)/stage_2_train.csv || $(BIN)/ich synth $(DEMO_DATA) --patients 60 --slices 24 --seed 0
	$(BIN)/ich run --config $(DEMO_CONFIG)
	@$(BIN)/python -m ich.report_path --config $(DEMO_CONFIG)

test: $(FULL)
	$(BIN)/python -m pytest -m "not slow and not tensorflow" -q

# Everything, the slow tests and the TensorFlow backend included.
test-all: $(FULL)
	$(PIP_INSTALL) '.[torch,jax,tensorflow,onnx,test,mlflow,dask]'
	$(BIN)/python -m pytest -q

bench: $(FULL)
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/loader.py

clean:
	rm -rf work/demo runs/demo data/synth .pytest_cache
