# Two commands on a fresh machine (Python >= 3.10; creates .venv when missing):
#   make demo   install, then run the main job on the embedded default
#   make test   install, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/czsl-bench run cluspro --dataset all

test: install
	$(BIN)/python -m pytest -q --benchmark-disable

bench: install
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,mean,max,rounds

clean:
	rm -rf $(VENV) build *.egg-info
