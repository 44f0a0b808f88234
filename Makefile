# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the package with the torch pin in constraints.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install test demo demo-quick reproduce lock lint bench wordnet chromium clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e '.[dev]'
	@bash scripts/install_wordnet.sh $(VENV) || true
	@touch $(STAMP)

# Optional: WordNet for EDA synonyms from Debian packages; never fails the install.
wordnet: $(STAMP)
	@bash scripts/install_wordnet.sh $(VENV) || true

# Optional: Debian's chromium, for the test that opens the report in a headless browser (it skips
# without); installed where apt exists, never failing `make test`.
chromium:
	@bash scripts/install_chromium.sh || true

test: $(STAMP) chromium
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/clip-backdoor demo

demo-quick: $(STAMP)
	$(BIN)/clip-backdoor demo --quick

# The demo study over 10 training seeds (runs/reproduce): the project's reference result.
REPRODUCE_SEEDS ?= [0,1,2,3,4,5,6,7,8,9]
reproduce: $(STAMP)
	$(BIN)/clip-backdoor demo --out runs/reproduce name=reproduce "seeds=$(REPRODUCE_SEEDS)"

# Regenerate constraints.txt from a fresh temporary venv (needs the package index; see scripts/lock.py).
lock:
	$(PY) scripts/lock.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks  # style: ruff check only (hanging indents, no ruff format)

# Throughput numbers (JSON in benchmarks/results/); speed goals are reported, never asserted in tests.
bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/cost_growth.py --epochs 2

clean-venv:
	rm -rf $(VENV)
