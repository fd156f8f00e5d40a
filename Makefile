# Two commands from a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs docs-notebooks docs-check wheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fmjax demo --overwrite

# Two processes, a file each at a time (module fixtures such as the quick experiments run once).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check fmjax tests benchmarks notebooks
	$(BIN)/ruff format --check fmjax tests benchmarks notebooks

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The documentation site, built strictly (a broken link or reference fails) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The same, with the quick-start notebook executed (quick settings) and rendered with its outputs.
docs-notebooks: $(STAMP)
	FMJAX_DOCS_EXECUTE=true FMJAX_QUICK=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Serve site/ on localhost and check it in headless Chromium (Debian's chromium package).
docs-check: docs
	$(BIN)/python tools/docs_check.py site

# The sdist and the wheel, into dist/ (install the wheel with pip install dist/fmjax-*.whl).
wheel: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) outputs site dist
