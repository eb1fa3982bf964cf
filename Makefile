# make demo: set up a virtual environment and run the offline demo (tiny random model, CPU is fine).
# make test: set up and run the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU) is what CI and the dev machines have on disk; override for a CUDA build:
#   make setup TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[rtx,test,telemetry]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m zimage_trt.cli demo --out out/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf out engines/*.json engines/*.plan engines/*.bin engines/onnx
