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

DEMO_DATA := data/synth
DEMO_CONFIG := demo

.PHONY: demo test test-all bench clean install

$(BIN)/ich: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[torch,jax,onnx,test,mlflow,dask]'
	touch $(BIN)/ich

install: $(BIN)/ich

demo: $(BIN)/ich
	test -f $(DEMO_DATA)/stage_2_train.csv || $(BIN)/ich synth $(DEMO_DATA) --patients 60 --slices 24 --seed 0
	$(BIN)/ich run --config $(DEMO_CONFIG)
	@$(BIN)/python -m ich.report_path --config $(DEMO_CONFIG)

test: $(BIN)/ich
	$(BIN)/python -m pytest -m "not slow and not tensorflow" -q

# Everything, the slow tests and the TensorFlow backend included.
test-all: $(BIN)/ich
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[torch,jax,tensorflow,onnx,test,mlflow,dask]'
	$(BIN)/python -m pytest -q

bench: $(BIN)/ich
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/loader.py

clean:
	rm -rf work/demo runs/demo data/synth .pytest_cache
