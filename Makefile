# sipcluster: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench sweep clean

# Creates .venv and installs the project with its test extras.  The stamp file
# makes the install run again only when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/sipcluster run

# pytest exits 5 when it collects no test; make treats every non-zero exit as a
# failure, so an empty run can never pass.
test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m loadtest.bench_core

# The SIPp load sweeps against sipcluster and Kamailio (REGISTER without and with
# digest, calls over UDP and over TCP; about 45 minutes), a step at half of each
# maximum, and a new worker's warm-up of 100,000 bindings; the tables go into
# docs/performance.md between its "sweep tables" markers.
sweep: install
	$(BIN)/python -m loadtest.sweep --target both --half-max --cache-bindings 100000 \
		--workloads register,register-digest,calls,calls-tcp \
		--write-docs docs/performance.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
