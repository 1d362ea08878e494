# Two commands for a newcomer: `make run` and `make test`. Each installs what it
# needs into .venv first (once; again when setup.cfg changes).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
INSTALLED = $(VENV)/.installed
# The client's tests also run a LangChain retriever (langchain-classic) and build its wheel.
CLIENT_TEST = 'langchain-classic>=1,<2' 'setuptools>=68'

.PHONY: install run test test-fuzz test-load bench eval-quality clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet -e './client[langchain,llama-index,haystack]' $(CLIENT_TEST)
	touch $@

run: install
	$(BIN)/gunicorn -c gunicorn.conf.py

test: install
	$(BIN)/python -m pytest -q

test-fuzz: install
	$(BIN)/python -m pytest -q tests/fuzz_gunicorn.py

bench: install
	$(BIN)/python -m bench

test-load: install
	$(BIN)/python -m bench.load

eval-quality: install
	$(BIN)/python -m bench.quality

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
