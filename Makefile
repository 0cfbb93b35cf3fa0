# The README's two commands: `make book` (build the site) and `make test` (run all tests).
# Both create or reuse the virtual environment .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Colab and most machines: plain torch. These offline build machines pin the wheels on disk.
TORCH_SPEC ?= torch torchvision
PYTEST_WORKERS ?= 2

.PHONY: book test test-fast notebooks-full bench clean help

help:
	@echo "make book   build the Jupyter Book into _build/html (warnings are errors)"
	@echo "make test   run every test: unit, notebooks (quick mode), book build, browser"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[book,test]"
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "Book built: open _build/html/index.html"

test: $(VENV)/.installed
	DDPM_QUICK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --nbmake --nbmake-timeout=900 \
		--durations=15 tests notebooks

test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -m "not book and not browser" tests

# Execute every chapter in its full preset (cpu or gpu by hardware) and keep the outputs.
notebooks-full: $(VENV)/.installed
	for nb in notebooks/*.ipynb; do \
		$(VENV)/bin/jupyter execute --inplace --timeout=-1 $$nb || exit 1; \
		$(PY) tools/finalize_notebooks.py $$nb; \
	done

bench: $(VENV)/.installed
	$(PY) bench/speed.py

clean:
	rm -rf _build
