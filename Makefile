# Two commands for a newcomer: `make run` and `make test`. Each installs what it
# needs into .venv first (once; again when setup.cfg changes).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
INSTALLED = $(VENV)/.installed
# The client's tests also run a LangChain retriever (langchain-classic) and build its wheel.
CLIENT_TEST = 'langchain-classic>=1,<2' 'setuptools>=68'

.PHONY: install run test redis test-fuzz test-load bench eval-quality corpus clean image test-deploy docs docs-figures token-weights \
	docs-screenshot

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet -e './client[langchain,llama-index,haystack]' $(CLIENT_TEST)
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or
# anchor, a page missing from the nav or a missing picture. Open site/index.html.
DOCS_INSTALLED = $(VENV)/.docs-installed
$(DOCS_INSTALLED): $(INSTALLED) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

docs: $(DOCS_INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The plots in docs/images/, redrawn from the tables the benchmarks last recorded in
# bench/results/ (`make bench`, `make eval-quality`, or one `python -m bench.<name>`).
docs-figures: $(DOCS_INSTALLED)
	$(BIN)/python -m bench.figures

# The page's picture in docs/images/: Debian's Chromium on a real gunicorn.
docs-screenshot: install
	$(BIN)/python -m bench.screenshot

run: install
	$(BIN)/gunicorn -c gunicorn.conf.py

test: install redis
	$(BIN)/python -m pytest -q

# The shared embedding cache's tests start Debian's redis-server themselves.
redis:
	command -v redis-server >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

test-fuzz: install
	$(BIN)/python -m pytest -q tests/fuzz_gunicorn.py

bench: install corpus
	$(BIN)/python -m bench

test-load: install
	$(BIN)/python -m bench.load

eval-quality: install corpus
	$(BIN)/python -m bench.quality

# The idf table token coverage weighs words by (pipeline/data/), from the same corpus and STS-B train.
token-weights: install corpus
	$(BIN)/python -m bench.token_weights

# Long chunks for the quality table and the model-mode bench are cut from the Python
# documentation's sources (Debian's python3.11-doc, PSF licence).
corpus:
	test -d /usr/share/doc/python3.11/html/_sources || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc; }

# The container image, with docker or podman (whichever is installed; podman first).
# `make image BASE=...` builds on another Python 3.11 base.
ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGE ?= distill:latest
BASE ?=
image:
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) \
		$(if $(BASE),--build-arg BASE=$(BASE)) --tag $(IMAGE) .

# Three replicas of the image behind nginx, sharing a Redis container, on a local Debian base.
DEPLOY_BASE = localhost/distill-base:bookworm
DEPLOY_IMAGE = localhost/distill:test
DEPLOY_REDIS_IMAGE = localhost/distill-redis:test
test-deploy: export CONTAINERS_CONF = $(CURDIR)/deploy/podman/containers.conf
test-deploy: install
	BASE_IMAGE=$(DEPLOY_BASE) deploy/podman/setup.sh
	@started=$$(date +%s); \
	podman build --quiet --format docker --build-arg BASE=$(DEPLOY_BASE) --tag $(DEPLOY_IMAGE) . >/dev/null && \
	echo "image $(DEPLOY_IMAGE) built in $$(( $$(date +%s) - started )) s:" \
		"$$(podman image inspect --format '{{.Size}}' $(DEPLOY_IMAGE) | awk '{printf "%.0f MB", $$1 / 1e6}')," \
		"base $$(podman image inspect --format '{{.Size}}' $(DEPLOY_BASE) | awk '{printf "%.0f MB", $$1 / 1e6}')"
	podman build --quiet --format docker --build-arg BASE=$(DEPLOY_BASE) --tag $(DEPLOY_REDIS_IMAGE) \
		--file deploy/podman/redis.Containerfile deploy/podman >/dev/null
	DISTILL_IMAGE=$(DEPLOY_IMAGE) DISTILL_REDIS_IMAGE=$(DEPLOY_REDIS_IMAGE) $(BIN)/python -m pytest -q -s tests/deploy_replicas.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache site
