# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-core test-slicer benchmark clean

$(STAMP): MorphSeekCore/pyproject.toml Testing/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e MorphSeekCore -r Testing/requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/morphseek demo --out demo-output --overwrite

test: $(STAMP)
	$(PY) -m pytest Testing

test-core: $(STAMP)
	$(PY) -m pytest Testing/core

test-slicer: $(STAMP)
	$(PY) -m pytest Testing/slicer

benchmark: $(STAMP)
	$(PY) benchmarks/speed_memory.py

clean:
	rm -rf $(VENV) demo-output
