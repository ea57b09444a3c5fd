# Set up and run: `make demo` (end-to-end on synthetic cells, offline) and `make test` (the test suite).
# Both create .venv with the project installed (editable) on first use; pip's cache is reused.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: install
	$(BIN)/cytoretrieve demo

# the tests also run the optional detectors' wrappers on tiny models they train: Cellpose and StarDist (TensorFlow)
$(VENV)/.installed-extras: $(VENV)/.installed
	$(BIN)/python -m pip install -e '.[dev,cellpose,stardist]'
	touch $@

test: install $(VENV)/.installed-extras
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) indexes/*.lance indexes/*.faiss* indexes/.leases indexes/demo-cells
