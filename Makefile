# make demo: set up a virtual environment and run the offline demo (tiny random model, CPU is fine).
# make test: set up and run the test suite without the slow cases, two at a time (about 3 minutes on 2 cores).
# make test-slow: the slow cases (engine builds, compiles, fresh processes, browser, Ray), two at a time (~9 min).
# CI (.ci/run) runs both: every test counts there.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU) is what CI and the dev machines have on disk; override for a CUDA build:
#   make setup TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup browser demo test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[rtx,test,telemetry,serve,lora,ray]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m zimage_trt.cli demo --out out/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" -n 2 tests

# The dashboard's browser test drives Debian's chromium + chromedriver; installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

test-slow: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow -n 2 --dist loadfile tests

clean:
	rm -rf out engines/*.json engines/*.plan engines/*.bin engines/onnx
