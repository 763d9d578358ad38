# make demo / make test: create or refresh .venv as needed, then run.
# TORCH_SPEC pins the CPU wheel that lies on these machines' disk; elsewhere pass any torch>=2.8,
# e.g. `make test TORCH_SPEC='torch>=2.8'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantkit-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	@! $(PY) -m pip show -q onnxruntime-gpu 2>/dev/null || { echo "onnxruntime-gpu is installed next to onnxruntime; remove one" >&2; exit 1; }
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quantize --recipe balanced --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
