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

# The in-browser demo's runtime: onnxruntime-web at the version package-lock.json pins, into
# node_modules/ (ignored by git); the book build copies the few files it needs into the site
# (book/demo/ddpm_demo.py). Without npm the book still builds and the "Try it" page says why.
node_modules/.package-lock.json: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --ignore-scripts --no-audit --no-fund; \
	else echo "npm not found: the book is built without its in-browser demo (book/try_it.md)"; fi

book: $(VENV)/.installed node_modules/.package-lock.json
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "Book built: open _build/html/index.html"

# --dist loadgroup: a chapter's execution and the tests that reuse its runs/ go to one worker, in
# order (tests/conftest.py); every other test goes to whichever worker is free.
test: $(VENV)/.installed node_modules/.package-lock.json
	DDPM_QUICK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --nbmake --nbmake-timeout=900 \
		--durations=15 tests notebooks

test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not book and not browser and not colab" tests

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
